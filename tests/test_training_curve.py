"""`selfmtp train --plot-only` (training/curve.py) draws a PNG from a run's metrics.jsonl (with and without
decode eval)."""

from __future__ import annotations

import json

import pytest

from selfmtp.cli import main


def rows(with_decode: bool) -> list[dict]:
    out = []
    for step in range(0, 7):
        row = {"step": step} if step == 0 else {"step": step, "loss": 3.0 / step, "agreement_by_j": [1.0, 0.5, 0.2]}
        if step % 3 == 0:
            row.update(eval_loss=2.0 - 0.1 * step, eval_agreement_by_j=[1.0, 0.1 * step, None], eval_prefix_agreement=0.9)
            if with_decode:
                row.update(decode_strategy="confadapt:0.9:3", decode_acceleration=1 + 0.1 * step,
                           decode_acceleration_std=0.1, decode_prefix_match=1 - 0.05 * step)
        out.append(row)
    return out


@pytest.mark.parametrize("with_decode", [True, False])
def test_plot_writes_a_png(tmp_path, with_decode):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(with_decode)))
    assert main(["train", "--output", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_metrics_is_an_error(tmp_path, capsys):
    returncode = main(["train", "--output", str(tmp_path), "--plot-only"])
    assert returncode != 0 and "no metrics.jsonl" in capsys.readouterr().err


def test_without_output_the_recipes_output_is_plotted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(True)))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"data": "unused.jsonl", "output": str(run)}))
    assert main(["train", "--config", str(recipe), "--plot-only"]) == 0
    assert (run / "training_curve.png").is_file()
