"""`selfmtp bench --pass-cost` (evaluation/pass_cost_bench.py): a timed pass feeds the tokens it is named
for after a cached prefix, the table is the median of what the clock measured, and the CLI writes it."""

from __future__ import annotations

import itertools
import json

import pytest

from selfmtp.cli import main
from selfmtp.evaluation.pass_cost_bench import PREFIX, pass_cost_table, pass_seconds
from selfmtp.models.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)[0]


def test_a_timed_pass_feeds_n_tokens_after_the_cached_prefix(tiny):
    import torch

    calls, ticks = [], itertools.count()

    def record(module, args, kwargs):
        ids, cache = kwargs.get("input_ids", args[0] if args else None), kwargs["past_key_values"]
        calls.append((ids.shape[1], cache.get_seq_length(), kwargs.get("logits_to_keep")))

    handle = tiny.register_forward_pre_hook(record, with_kwargs=True)
    try:
        seconds = pass_seconds(tiny, 3, torch.Generator().manual_seed(0), timer=lambda: next(ticks) * 0.25)
    finally:
        handle.remove()
    assert calls == [(PREFIX, 0, None), (3, PREFIX, 3)]  # the prefix untimed, then the timed pass of 3 with 3 logits
    assert seconds == 0.25  # one tick of the fake clock: only the timed pass is between its two readings


def test_the_table_is_the_median_of_the_clocks_readings_in_ms(tiny):
    """Pass i of round r at cell c (c = 0..3 in the order (1 token: a, b), (2 tokens: a, b)) reads as
    (c + 1) x [1, 3, 2][r] ms on a fake clock: the median over rounds is (c + 1) x 2 ms."""
    durations = [(c + 1) * factor / 1000 for factor in (1, 3, 2) for c in range(4)]
    readings = iter(value for d in durations for value in (0.0, d))  # (start, end) per pass
    table = pass_cost_table({"a": tiny, "b": tiny}, rounds=3, timer=lambda: next(readings), tokens_fed=(1, 2))
    assert table == {"a": {1: 2.0, 2: 6.0}, "b": {1: 4.0, 2: 8.0}}


def test_the_cli_writes_json_and_markdown_per_variant(tmp_path, capsys):
    out = tmp_path / "pc"
    assert main(["bench", "--model", "tiny", "--pass-cost", "float32,int8", "--runs", "1", "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    result = json.loads((out / "pass_cost.json").read_text())
    (run,) = result["runs"]
    assert run["threads"] == 1 and list(run["pass_ms"]) == ["float32", "int8"]
    assert all(list(costs) == ["1", "2", "3", "4", "8", "16"] for costs in run["pass_ms"].values())
    assert all(ms > 0 for costs in run["pass_ms"].values() for ms in costs.values())
    assert "int8 8" in run["head_matmul_ms"] and result["prefix"] == PREFIX
    assert "| int8 |" in (out / "pass_cost.md").read_text() and "pass_cost.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [(["--pass-cost", "float64"], "unknown pass-cost variant 'float64'"), ([], "bench needs --prompts")],
)
def test_user_mistakes_are_one_line_and_status_2(argv, message, tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--output", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
