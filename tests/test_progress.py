"""Output a person reads: progress bars in a log file, the plot's axis label, no tracker numbers."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import tqdm.std

from selfmtp.progress import LOG_INTERVAL_S, progress_bar

SRC = Path(__file__).resolve().parents[1] / "src" / "selfmtp"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_bar(stream, monkeypatch, *, updates: int, seconds_per_update: float) -> str:
    clock = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # tqdm reads its clock through this name
    with progress_bar(total=updates, desc="train", file=stream) as bar:
        for _ in range(updates):
            clock.now += seconds_per_update
            bar.set_postfix(loss=f"{clock.now:.1f}")  # as the trainer does every step
            bar.update(1)
    return stream.getvalue()


def test_a_log_file_gets_a_plain_line_every_few_seconds_not_carriage_return_frames(monkeypatch):
    updates, seconds = 600, 0.5  # five simulated minutes
    text = run_bar(io.StringIO(), monkeypatch, updates=updates, seconds_per_update=seconds)
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    # One line per LOG_INTERVAL_S of (simulated) time, plus the first and the final one.
    assert len(lines) <= updates * seconds / LOG_INTERVAL_S + 2
    assert len(lines) >= updates * seconds / LOG_INTERVAL_S / 2  # still alive: not silenced
    assert "600/600" in lines[-1]  # where the bar ended is in the log


def test_a_terminal_keeps_the_live_bar(monkeypatch):
    text = run_bar(Terminal(), monkeypatch, updates=50, seconds_per_update=0.5)
    assert text.count("\r") > 10  # redrawn in place, as tqdm does


def test_every_progress_bar_goes_through_the_shared_helper():
    users = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
             if p.name != "progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert users == []


def test_product_strings_name_no_tracker_issue_numbers():
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\bissues? #?\d", node.value):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_pareto_plot_names_the_metric_once(monkeypatch, tmp_path):
    import matplotlib.axes

    from selfmtp.evaluation.report import plot_pareto

    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, text, **kw: labels.append(text))
    row = {"strategy": "static:1", "kind": "static", "k_max": 1, "tau": None, "accuracy": 0.5, "stderr": 0.1,
           "acceleration_mean": 1.0}
    for metric, expected in [("accuracy", "accuracy (%)"), ("flexible-extract", "flexible-extract accuracy (%)")]:
        plot_pareto({"rows": [row], "metrics": [metric], "task": "t", "model": "m"}, tmp_path / "p.png")
        assert labels[-1] == expected
