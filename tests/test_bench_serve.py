"""benchmarks/bench_serve.py's report: paired per-round ratios to NTP, from a hand-made result (no server)."""

from __future__ import annotations

import pytest

from conftest import load_script


def row(strategy: str, rounds: list[tuple[int, float]]) -> dict:
    tokens, seconds = sum(t for t, _ in rounds), sum(s for _, s in rounds)
    return {"strategy": strategy, "concurrency": 1, "requests": len(rounds), "failed": 0, "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "latency_median": 1.0, "latency_max": 2.0,
            "tokens_per_pass": 1.0, "rounds": [{"tokens": t, "seconds": s} for t, s in rounds]}  # fmt: skip


def test_ratios_pair_each_round_with_ntp_s_same_round(tmp_path):
    """A slow round slows both strategies: per round the mode is 1.1x, 1.0x, 1.2x NTP (median 1.1x), while
    pooling all rounds (3.5 vs 5 tokens/s: 0.70x) lets the slow round's weight decide."""
    bench = load_script("bench_serve")
    ntp = row("ntp", [(100, 10.0), (100, 40.0), (100, 10.0)])
    mode = row("auto", [(110, 10.0), (400, 160.0), (120, 10.0)])
    by = {("ntp", 1): ntp, ("auto", 1): mode}
    assert bench.paired_ratios(by, "auto", 1) == pytest.approx([1.1, 1.0, 1.2])  # approx: float division
    assert bench.ratio_text(bench.paired_ratios(by, "auto", 1)) == "1.10x [1.00-1.20]"
    assert round(mode["tokens_per_second"] / ntp["tokens_per_second"], 2) == 0.70
    result = {"model": "m", "command": "c", "server_command": "s", "pass_cost_log": "p", "rows": [ntp, mode],
              "memory": {"requests": 0, "failed": 0, "rss_by_requests": []}, "engine_end": {"engine": {}},
              "load_average_end": [0.0, 0.0, 0.0]}  # fmt: skip
    text = bench.write_report(result, ["ntp", "auto"], [1], tmp_path)
    assert "| 1 | auto | 3.5 | 1.10x [1.00-1.20] | 1.00 | 2.00 | 1.00 | 210.0 | 0 |" in text  # 630 tokens, 3 requests
    assert (tmp_path / "bench_serve.png").stat().st_size > 0
