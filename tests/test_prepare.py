"""`selfmtp prepare`: the GSM8K train/dev split, the model's own answers appended resumably, the mix."""

from __future__ import annotations

import json

import pytest

from selfmtp.cli import main
from selfmtp.training.prepare import PrepareConfig, prepare_gsm8k, self_answers


@pytest.fixture
def source(tmp_path):
    records = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
               for i in range(10)]  # fmt: skip
    path = tmp_path / "gsm8k-train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a blank last line, as files have
    return path


def lines(path):
    return path.read_text().splitlines()


def test_split_keeps_the_last_dev_lines_verbatim_and_refuses_a_bad_dev(source, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["prepare", "--source", str(source), "--output", str(out), "--dev", "3", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    original = [line for line in lines(source) if line]
    assert lines(out / "train.jsonl") == original[:7] and lines(out / "dev.jsonl") == original[7:]
    assert written["train"] == 7 and written["dev"] == 3 and set(written["files"]) == {"train", "dev"}
    for argv in (["--dev", "10"], ["--dev", "0"], ["--source", str(tmp_path / "missing.jsonl")]):
        assert main(["prepare", "--source", str(source), "--output", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("selfmtp: error:") and err.count("\n") == 1


def test_self_answers_resume_after_a_torn_line_and_equal_one_uninterrupted_run(source, tmp_path):
    """A run killed mid-write leaves a torn last line: the rerun cuts it and answers only what is missing,
    so the file ends exactly as one uninterrupted run's (greedy answers of the same model)."""
    config = dict(source=str(source), dev=3, model="tiny", max_new_tokens=3, batch_size=2, progress=False)
    whole = tmp_path / "whole"
    summary = prepare_gsm8k(PrepareConfig(output=str(whole), self_answers=5, mix=True, **config), log=lambda _: None)
    expected = lines(whole / "self-train.jsonl")
    assert summary["self_answers"] == 5 and len(expected) == 5
    assert [json.loads(line)["question"] for line in expected] == [f"What is {i} + {i}?" for i in range(5)]
    assert lines(whole / "mix-train.jsonl") == expected + lines(whole / "train.jsonl")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torn = "\n".join(expected[:2]) + "\n" + expected[2][:10]
    (resumed / "self-train.jsonl").write_text(torn)
    prepare_gsm8k(PrepareConfig(output=str(resumed), self_answers=5, **config), log=lambda _: None)
    assert lines(resumed / "self-train.jsonl") == expected
    # nothing left to answer: the model is not even loaded
    path = resumed / "self-train.jsonl"
    assert self_answers(["q"] * 5, PrepareConfig(output=str(resumed), model="no-such-model"), path) == 5
