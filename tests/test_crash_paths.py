"""Crash and bad-input paths a user hits: `kill -9`, Ctrl-C, damaged files and bad flags end in a correct
recovery or in one `selfmtp: error:` line (exit 2), never in a traceback or lost work.

The signal tests run a real `selfmtp train` subprocess on the tiny model and signal it mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfmtp.cli import main

TINY_RUN = ["--model", "tiny", "--template", "plain", "--seq-len", "64", "--k-max", "4", "--batch-size", "2",
            "--warmup", "0", "--eval-every", "0", "--no-progress"]


def train_argv(data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", data, "--output", str(out), *TINY_RUN, *extra]


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def start_training(data: str, out: Path, *extra: str) -> subprocess.Popen:
    """`selfmtp train` in a subprocess that runs far longer than any test waits (the test stops it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "selfmtp", *train_argv(data, out, "--steps", "100000", *extra)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training made no progress in time")
        time.sleep(0.05)


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_one_error_line(capsys, message: str) -> str:
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("selfmtp: error: "), err
    return err


# ---------------------------------------------------------------------------------------------
# kill -9 and Ctrl-C during `selfmtp train`


def test_kill_9_then_resume_continues_from_the_last_checkpoint_past_a_torn_metrics_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    process = start_training(data, out, "--save-every", "2")
    wait_for(lambda: len(checkpoint_steps(out)) >= 2 and lines_in(out / "metrics.jsonl") >= 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = checkpoint_steps(out)[-1]
    with open(out / "metrics.jsonl", "a") as handle:  # the write a kill cuts short
        handle.write('{"step": 99, "loss": 0.12')
    partial = out / "checkpoints" / f".step-{saved + 1:07d}.tmp-x1y2"  # a checkpoint write cut short
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 1000)
    assert main(train_argv(data, out, "--steps", str(saved + 3), "--resume", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"] == saved and not partial.exists()
    assert metric_steps(out) == list(range(1, saved + 4))  # no torn line, no step twice, none missing


def test_killed_before_the_first_checkpoint_resume_starts_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    process = start_training(data, out, "--save-every", "1000")
    wait_for(lambda: lines_in(out / "metrics.jsonl") >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint_steps(out) == []
    assert main(train_argv(data, out, "--steps", "3")) == 2
    assert_one_error_line(capsys, "pass --resume")
    assert main(train_argv(data, out, "--steps", "3", "--resume", "--json")) == 0
    captured = capsys.readouterr()
    assert "starting the run over from step 0" in captured.err
    assert json.loads(captured.out)["resumed_from"] == 0
    assert metric_steps(out) == [1, 2, 3]


def test_ctrl_c_saves_the_current_step_and_says_how_to_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    process = start_training(data, out, "--save-every", "0")  # the only checkpoint is the one Ctrl-C writes
    wait_for(lambda: lines_in(out / "metrics.jsonl") >= 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("selfmtp: interrupted: stopped after step") and "--resume" in last
    stopped = metric_steps(out)[-1]
    assert checkpoint_steps(out) == [stopped] and f"step {stopped}:" in last
    assert main(train_argv(data, out, "--steps", str(stopped + 1), "--resume", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == stopped
    assert metric_steps(out) == list(range(1, stopped + 2))


def test_resume_with_nothing_in_the_folder_is_an_error(data, tmp_path, capsys):
    assert main(train_argv(data, tmp_path / "empty", "--resume")) == 2
    assert_one_error_line(capsys, "no checkpoint to resume")


def test_a_malformed_metrics_line_that_a_kill_cannot_explain_is_an_error(data, tmp_path, capsys):
    from selfmtp.training.recovery import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(Exception, match=r"metrics.jsonl:2: not a metrics row"):
        truncate_metrics(path, 5)


# ---------------------------------------------------------------------------------------------
# damaged files in a run folder


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """A 2-step run with offline targets and a checkpoint at each step; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(train_argv(data, out, "--steps", "2", "--save-every", "1", "--supervision", "offline")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("content", [b"{\"model\": ", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_damaged_run_config_is_one_error_line(data, finished_run, tmp_path, capsys, content):
    out = copy_run(finished_run, tmp_path)
    (out / "run_config.json").write_bytes(content)
    capsys.readouterr()
    assert main(train_argv(data, out, "--steps", "3", "--supervision", "offline", "--resume")) == 2
    assert_one_error_line(capsys, "run_config.json is damaged")


@pytest.mark.parametrize("name", ["trainable.safetensors", "state.pt"])
def test_damaged_checkpoint_is_one_error_line_naming_it(data, finished_run, tmp_path, capsys, name):
    out = copy_run(finished_run, tmp_path)
    path = out / "checkpoints" / "step-0000002" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut short by a failing disk
    capsys.readouterr()
    assert main(train_argv(data, out, "--steps", "3", "--supervision", "offline", "--resume")) == 2
    assert_one_error_line(capsys, "step-0000002 is damaged: delete that folder")


def test_damaged_teacher_targets_are_made_again(data, finished_run, tmp_path, capsys):
    from safetensors.torch import load

    out = copy_run(finished_run, tmp_path)
    cache = out / "teacher_targets.safetensors"
    good = load(cache.read_bytes())  # not load_file: a memory map of a file we then overwrite
    cache.write_bytes(cache.read_bytes()[:100])
    capsys.readouterr()
    assert main(train_argv(data, out, "--steps", "3", "--supervision", "offline", "--resume")) == 0
    again = load(cache.read_bytes())
    assert again.keys() == good.keys() and all((again[k] == good[k]).all() for k in good)


# ---------------------------------------------------------------------------------------------
# bad flags and inputs


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "3"], "--seq-len must be at least"),
    (["--template", "chat", "--model", "tiny-gsm-teacher"], "needs a tokenizer with a chat template"),
    (["--teacher-model", "tiny-gsm-teacher"], "vocabulary differs"),
])
def test_train_bad_input_is_one_error_line(data, tmp_path, capsys, extra, message):
    assert main(train_argv(data, tmp_path / "o", "--steps", "1", *extra)) == 2
    assert_one_error_line(capsys, message)


def test_train_config_that_is_not_json(data, tmp_path, capsys):
    bad = tmp_path / "recipe.json"
    bad.write_text("{steps: 3,}")
    assert main(train_argv(data, tmp_path / "o", "--config", str(bad))) == 2
    assert_one_error_line(capsys, "recipe.json: not valid JSON")


PROMPT_FILES = [
    ("bad.jsonl", '{"prompt": "hi"\n', "bad.jsonl:1: not valid JSON"),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("fields.jsonl", '{"prompt": "hi"}\n{"text": "no prompt here"}\n', "fields.jsonl:2: expected an object"),
    ("list.jsonl", '["hi"]\n', "list.jsonl:1: expected an object"),
]


@pytest.mark.parametrize(("name", "content", "message"), PROMPT_FILES)
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_bad_prompt_files_are_one_error_line(tmp_path, capsys, command, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    argv = (["generate", "--prompts-file", str(path)] if command == "generate"
            else ["bench", "--prompts", str(path), "--output", str(tmp_path / "b")])
    assert main([*argv, "--model", "tiny"]) == 2
    assert_one_error_line(capsys, message)


def test_generate_chat_without_a_chat_template(capsys):
    assert main(["generate", "--model", "tiny-gsm-teacher", "--prompt", "1+1", "--chat"]) == 2
    assert_one_error_line(capsys, "has no chat template")


# ---------------------------------------------------------------------------------------------
# Ctrl-C during `eval` and `demo` (KeyboardInterrupt is how Python delivers SIGINT)


def test_ctrl_c_during_eval_keeps_finished_strategies_and_a_rerun_does_the_rest(tmp_path, capsys, monkeypatch):
    import selfmtp.evaluation.sweep as sweep

    real, calls, ctrl_c_at = sweep.run_strategy, [], ["static:2"]

    def ctrl_c_in_the_second(mtp, task, run, config, **kwargs):
        calls.append(run.label)
        if run.label in ctrl_c_at:
            raise KeyboardInterrupt
        return real(mtp, task, run, config, **kwargs)

    monkeypatch.setattr(sweep, "run_strategy", ctrl_c_in_the_second)
    out = tmp_path / "eval"
    argv = ["eval", "--model", "tiny-gsm-teacher", "--task", "tiny-gsm", "--limit", "2", "--max-new-tokens", "8",
            "--strategies", "static:1,static:2,confadapt:0.9:4", "--output", str(out)]
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("selfmtp: interrupted: 1 of 3 strategies finished") and "same command again" in last
    assert len(list((out / "runs").iterdir())) == 1
    calls.clear()
    ctrl_c_at.clear()
    assert main(argv) == 0
    assert calls == ["static:2", "confadapt:0.9:4"]  # the finished one is not decoded again


DEMO = ["--steps", "2", "--train-problems", "32", "--eval-problems", "2", "--max-new-tokens", "8", "--no-progress"]


def test_ctrl_c_during_demo_training_says_to_rerun_the_demo(tmp_path, capsys, monkeypatch):
    import selfmtp.training.trainer as trainer

    def ctrl_c(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", ctrl_c)
    assert main(["demo", "--output", str(tmp_path / "demo"), *DEMO]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfmtp: interrupted: training stopped") and "run the same command again" in err
    assert "--resume" not in err  # `selfmtp demo` has no such flag: it resumes by itself


def test_demo_resumes_a_training_run_killed_before_its_first_checkpoint(tmp_path, monkeypatch):
    import selfmtp.training.trainer as trainer
    from selfmtp.demo import train_or_reuse

    seen = []
    monkeypatch.setattr(trainer, "train", lambda config: seen.append(config) or {"final_dir": "x"})
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "run_config.json").write_text("{}")  # what a run killed while loading leaves behind
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    train_or_reuse(trainer.TrainConfig(data="d.jsonl", output=str(folder)), log=lambda *_: None)
    assert seen[0].resume  # a fresh start would refuse the folder: "already holds a training run"


def test_eval_coherence_with_a_teacher_of_another_vocabulary(tmp_path, capsys):
    # The random tiny student draws its 4 tokens from 49k ids; the tiny-gsm teacher knows a few hundred.
    argv = ["eval", "--model", "tiny", "--teacher", "tiny-gsm-teacher", "--coherence", "--task", "tiny-gsm",
            "--limit", "1", "--max-new-tokens", "4", "--strategies", "static:1", "--output", str(tmp_path / "e")]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("selfmtp: error: --coherence: the teacher's vocabulary")
