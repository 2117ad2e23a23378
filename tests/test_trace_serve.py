"""scripts/trace_serve.py's per-cell summary, from hand-made pass records (no model)."""

from __future__ import annotations

import pytest

from conftest import load_script
from selfmtp.decoding.pass_cost import TRUST_PASSES, LearnedPassCost, PassCost


def p(rows, seconds, extra=0, tokens=1, prefill=False, explored=0.0, curve=1.0):
    return {"round": 0, "rows": rows, "prefill": prefill, "seconds": seconds, "rule_seconds": 0.001,
            "extra_fed": [extra] * rows, "tokens": [tokens] * rows, "explored": explored, "curve_seconds": curve}  # fmt: skip


def test_summary_splits_passes_that_fed_extra_tokens_from_ntp_sized_ones():
    """NTP: a prefill and four 2-row passes of 1.0 s. The mode: a prefill, two NTP-sized passes of 1.1 s
    (1.1x NTP's), two passes that fed a mask per row (1.5 s, 2 tokens per row once, 1 once)."""
    trace = load_script("trace_serve")
    passes = {
        ("ntp", 2): [p(2, 3.0, prefill=True)] + [p(2, 1.0) for _ in range(4)],
        ("auto", 2): [p(2, 3.0, extra=1, prefill=True), p(2, 1.1), p(2, 1.1), p(2, 1.5, extra=1, tokens=2, explored=0.5),
                      p(2, 1.5, extra=1)],
    }  # fmt: skip
    cell = trace.summarise(passes, "auto", 2)
    assert (cell["passes"], cell["decode_passes"], cell["extra_share"]) == (5, 4, 0.5)
    assert cell["extra_tokens_per_row_pass"] == 1.5  # (2 + 2 + 1 + 1) tokens / 4 row-passes
    assert cell["ntp_sized_over_ntp"] == {2: pytest.approx(1.1)}  # approx: float division
    assert cell["extra_cost_share"] == pytest.approx((0.5 + 0.5) / 5.2)  # beyond NTP's 1.0 s, of 5.2 decode s
    assert cell["explored_share_by_curve"] == pytest.approx(0.5 / 5) and cell["explore_passes"] == 1
    assert cell["vs_ntp"] == pytest.approx([(12 / 8.2) / (10 / 7.0)])  # tokens/s over NTP's, same round


def test_report_shows_the_probe_and_the_learned_price_per_size():
    """Passes of 2 tokens timed at 1.5x the probe's price: the report's table says so at that size."""
    trace = load_script("trace_serve")
    probe = PassCost([(1, 0.010), (2, 0.012), (4, 0.014)])
    cost = LearnedPassCost(probe)
    for _ in range(TRUST_PASSES):
        cost.observe(1, 0.010)
        cost.observe(2, 0.018)
    passes = {("ntp", 1): [p(1, 1.0)], ("auto", 1): [p(1, 1.0)]}
    result = {"command": "trace", "model": "m", "prepack": False, "probe_seconds": 1.0, "pass_cost": probe.points,
              "learned": trace.learned_table(cost), "cells": [trace.summarise(passes, "auto", 1)], "chosen": {},
              "explorations": 0}  # fmt: skip
    text = trace.report(result)
    assert "| 1 | 10.0 | 10.0 | 1.00 | 16 |" in text and "| 2 | 12.0 | 18.0 | 1.50 | 16 |" in text
    assert "| 4 | 14.0 | 21.0 | 1.50 | 0 |" in text  # beyond the learned sizes: at least their correction
    assert "--fixed-curve" not in text
    assert "--fixed-curve" in trace.report({**result, "learned": None})
