"""The load-aware mask count: the pass-cost curve, acceptance stats and the per-pass choice."""

from __future__ import annotations

import pytest

from selfmtp.serving.config import resolve_strategy
from selfmtp.serving.load_aware import AcceptanceStats, PassCost, choose_proposals

FLAT = PassCost([(1, 0.010), (128, 0.010)])  # an overhead-bound engine: any pass costs the same
LINEAR = PassCost([(1, 0.010), (128, 1.280)])  # compute-bound: cost grows with every token fed


def test_pass_cost_interpolates_and_extrapolates():
    cost = PassCost([(1, 1.0), (3, 2.0), (5, 6.0)])
    assert cost(1) == 1.0 and cost(2) == 1.5 and cost(4) == 4.0
    assert cost(7) == 10.0  # beyond the probe: the last slope (2 per token)
    assert cost(0) == 1.0


def test_acceptance_stats_estimate_expected_tokens():
    stats = AcceptanceStats(4, prior_accepted=0.0, prior_proposed=1e-9)
    for _ in range(10):
        stats.record(proposed=4, accepted=2)  # always: position 2 kept, 3 and 4 not
    assert stats.expected_tokens(1) == 1.0
    assert stats.expected_tokens(4) == pytest.approx(2.0)  # 1 + P(run>=2)=1 + 0 + 0; 1e-9 prior only


def test_free_masks_are_used_when_they_are_accepted():
    stats = AcceptanceStats(8)
    for _ in range(50):
        stats.record(proposed=8, accepted=8)
    assert choose_proposals(stats, FLAT, rows=1, fed_per_row=1) == 8


def test_compute_bound_or_rejected_masks_fall_back_to_ntp():
    stats = AcceptanceStats(8)
    for _ in range(50):
        stats.record(proposed=8, accepted=8)
    # with cost linear in tokens fed, k tokens per pass cost k passes: masks never win
    assert choose_proposals(stats, LINEAR, rows=8, fed_per_row=1) == 1
    rejected = AcceptanceStats(8)
    for _ in range(50):
        rejected.record(proposed=8, accepted=1)
    rising = PassCost([(1, 0.010), (8, 0.014)])  # +40% for 7 masks that are (almost) never kept
    assert choose_proposals(rejected, rising, rows=1, fed_per_row=1) == 1


def test_choice_never_expects_less_than_ntp():
    """Whatever the curve and stats, the chosen k's expected tokens/s is >= NTP's (k=1)."""
    curve = PassCost([(1, 0.01), (4, 0.011), (16, 0.02), (64, 0.09), (128, 0.2)])
    for accepted in range(1, 9):
        stats = AcceptanceStats(8)
        for _ in range(20):
            stats.record(proposed=8, accepted=accepted)
        for rows in (1, 2, 4, 8, 16):
            k = choose_proposals(stats, curve, rows=rows, fed_per_row=1)
            chosen = rows * stats.expected_tokens(k) / curve(rows * k)
            assert chosen >= rows / curve(rows)


def test_fixed_rows_set_a_floor_that_costs_nothing_extra():
    stats = AcceptanceStats(8)
    assert choose_proposals(stats, LINEAR, rows=2, fed_per_row=1, least=4) == 4


def test_auto_strategy_names():
    strategy, load_aware = resolve_strategy("auto")
    assert load_aware and strategy.name == "confadapt:0.9:16"
    assert resolve_strategy("auto:0.7:8")[0].name == "confadapt:0.7:8"
    assert resolve_strategy("ntp") == (resolve_strategy("ntp")[0], False)
