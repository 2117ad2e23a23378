"""`selfmtp train --config FILE` (file values, command-line precedence, clean errors) and the
optional decode-time evaluation written to metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import gsm8k_style_lines
from selfmtp.cli import build_parser, main
from selfmtp.cli.train import train_config
from selfmtp.training.decode_eval import prefix_match
from selfmtp.training.trainer import TrainConfig, train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "gsm8k-32.jsonl"
    path.write_text(gsm8k_style_lines(32))
    return str(path)


def write_config(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(values))
    return str(path)


def config_from(argv: list[str]) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *argv]))


def test_file_values_fill_in_and_flags_given_win(tmp_path, data):
    recipe = write_config(tmp_path, {"data": data, "model": "tiny", "k_max": 4, "seq_len": 64, "teacher_mode": "soft",
                                     "strip_calculator": False, "lr": 0.5, "progress": False})
    from_file = config_from(["--config", recipe])
    assert (from_file.data, from_file.model, from_file.k_max, from_file.seq_len) == (data, "tiny", 4, 64)
    assert (from_file.teacher_mode, from_file.strip_calculator, from_file.lr, from_file.progress) == ("soft", False, 0.5, False)
    assert from_file.batch_size == TrainConfig.batch_size and from_file.warmup == TrainConfig.warmup  # untouched defaults
    overridden = config_from(["--config", recipe, "--k-max", "2", "--teacher", "hard", "--lr", "0.25", "--model", "tiny:layers=1"])
    assert (overridden.k_max, overridden.teacher_mode, overridden.lr, overridden.model) == (2, "hard", 0.25, "tiny:layers=1")
    assert overridden.seq_len == 64  # not given on the command line: the file's value stays


def test_without_a_file_the_cli_defaults_are_unchanged(data):
    config = config_from(["--data", data, "--keep-calculator", "--no-progress"])
    assert config.model == "smollm2-135m" and not config.strip_calculator and not config.progress
    assert config.k_max == TrainConfig.k_max and config.lr == TrainConfig.lr and config.output == TrainConfig.output


@pytest.mark.parametrize("values,message", [
    ({"k_maxx": 4, "data": "x"}, "unknown training settings: k_maxx"),
    ([1, 2], "expected a JSON object"),
    ({"model": "tiny"}, "--data is required"),
])
def test_bad_config_files_are_one_line_user_errors(tmp_path, capsys, values, message):
    assert main(["train", "--config", write_config(tmp_path, values)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_shipped_recipe_only_names_known_settings(data):
    for recipe in RECIPES.glob("*.json"):
        config = config_from(["--config", str(recipe), "--data", data])
        assert config.data == data


def test_config_file_trains(tmp_path, data, capsys):
    recipe = write_config(tmp_path, {"model": "tiny", "template": "plain", "seq_len": 64, "k_max": 4, "batch_size": 2,
                                     "steps": 5, "warmup": 0, "eval_every": 0, "save_every": 0, "progress": False})
    assert main(["train", "--config", recipe, "--data", data, "--output", str(tmp_path / "o"), "--steps", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["last"]["step"] == 2 and summary["config"]["k_max"] == 4 and summary["config"]["seq_len"] == 64


def test_prefix_match():
    assert prefix_match([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_match([1, 2], [1, 2, 3, 4]) == 0.5
    assert prefix_match([5], [1, 2]) == 0.0
    assert prefix_match([1, 2, 3], [1, 2, 3]) == 1.0


def test_decode_eval_rows(tmp_path, data):
    out = tmp_path / "run"
    train(TrainConfig(data=data, output=str(out), model="tiny", template="plain", seq_len=64, k_max=4, batch_size=4,
                      steps=4, lr=3e-3, warmup=0, eval_every=2, eval_size=3, save_every=0, progress=False,
                      eval_decode_prompts=3, eval_decode_tokens=8))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in (rows[0], rows[2], rows[4]):
        assert row["decode_strategy"] == "confadapt:0.9:4"
        assert 1.0 <= row["decode_acceleration"] <= 4.0 and 0.0 <= row["decode_prefix_match"] <= 1.0
        assert row["decode_tokens"] <= 3 * 8
    assert "decode_acceleration" not in rows[1]
    # Step 0: the student is the reference model, and untrained tiny confidences (~1e-4 over 49k tokens)
    # never reach tau=0.9, so ConfAdapt keeps only the exact first token of every pass: its text must be
    # the reference's greedy text.
    assert rows[0]["decode_acceleration"] == 1.0
    assert rows[0]["decode_exact_match"] == 1.0 and rows[0]["decode_prefix_match"] == 1.0
