"""benchmarks/plot_training_curve.py draws a PNG from a run's metrics.jsonl (with and without decode eval)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_training_curve.py"


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
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_metrics_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "no metrics.jsonl" in done.stderr
