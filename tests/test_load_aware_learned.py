"""The pass cost learned online (`pass_cost.LearnedPassCost`): from the decode loop's own timed passes.

Pure where possible: a "true" cost stands in for the machine and observations are fed by hand; one
test runs the real decoder with a fake clock that a wrapped forward advances by a known cost.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from selfmtp.decoding.batch import BatchDecoder
from selfmtp.decoding.load_aware import AcceptanceStats, LoadAware, ProposalRule
from selfmtp.decoding.pass_cost import (
    LEARN_MIN,
    TRUST_PASSES,
    LearnedPassCost,
    PassCost,
    pass_clock,
    size_bucket,
)
from selfmtp.decoding.strategies import resolve_strategy

# SmolLM2-135M's probe as session 9's trace took it (ms -> s); the served passes carrying drafts
# cost more than that (docs/measurements/serve-trace-cpu/session9-mtp-c1-c8)
PROBE = PassCost([(1, 0.0792), (2, 0.0989), (4, 0.1192), (8, 0.1311), (16, 0.1702), (32, 0.2415)])


def dearer_beyond_one(probe: PassCost, extra: float, base: float = 1.0):
    """A true cost: `base` x the probe's for a 1-token pass, `base` x (1 + extra) x it for more."""
    return lambda tokens: probe(tokens) * base * (1.0 if tokens <= 1 else 1.0 + extra)


def test_learned_curve_converges_to_the_true_cost_from_a_wrong_probe():
    """The probe under-prices multi-token passes by 30% and every pass by 10%: the observed sizes end at the
    true cost, the sizes in between keep the probe's shape scaled by their neighbours' correction."""
    true = dearer_beyond_one(PROBE, 0.30, base=1.10)
    cost, draw = LearnedPassCost(PROBE), random.Random(0)
    for _ in range(60):
        for tokens in (1, 2, 3, 8):
            cost.observe(tokens, true(tokens) * draw.uniform(0.95, 1.08))  # noise: mostly slower, never much faster
    for tokens in (1, 2, 3, 8):
        # 4%: the median of 32 draws of that noise is about 1.015 x the truth, give or take 0.01
        assert cost(tokens) == pytest.approx(true(tokens), rel=0.04)
    assert cost(4) == pytest.approx(true(4), rel=0.04)  # between learned sizes: probe x correction (1.43 here)
    assert cost(32) == pytest.approx(true(32), rel=0.04)  # beyond them: the nearest correction
    assert cost(2) / cost(1) > 1.4 > PROBE(2) / PROBE(1)  # the rule now sees what a draft pass really costs


def test_one_slow_pass_does_not_move_the_curve():
    true = dearer_beyond_one(PROBE, 0.30)
    cost = LearnedPassCost(PROBE)
    for _ in range(TRUST_PASSES):
        for tokens in (1, 2):
            cost.observe(tokens, true(tokens))
    before = [cost(t) for t in (1, 2, 4, 8)]
    cost.observe(2, 20 * true(2))  # one pass preempted or paged out: 20x
    cost.observe(16, 20 * true(16))  # and one at a size never seen before
    cost.refresh()
    # 1%: a median of 17 equal values and one outlier is one of the equal values; the new size has one pass
    assert [cost(t) for t in (1, 2, 4, 8)] == pytest.approx(before, rel=0.01)
    assert cost(16) == pytest.approx(true(16), rel=0.01)  # its neighbours' correction, not its one pass
    for _ in range(LEARN_MIN - 1):
        cost.observe(16, true(16))
    cost.refresh()
    assert cost(16) == pytest.approx(true(16), rel=0.01)  # median of 3 with one outlier


def test_a_size_seen_a_few_times_moves_part_of_the_way():
    """Fewer than TRUST_PASSES passes: blended, in proportion to its passes, with the correction of the
    well-measured sizes around it."""
    cost = LearnedPassCost(PROBE)
    for _ in range(TRUST_PASSES):
        cost.observe(1, PROBE(1))  # the probe was right about NTP passes
    for _ in range(4):
        cost.observe(2, 2 * PROBE(2))  # and wrong by 2x about 2-token passes, seen 4 times
    cost.refresh()
    trust = 4 / TRUST_PASSES  # the rest: the correction of the well-measured size 1 (nearest), 1.0
    assert cost(2) == pytest.approx(PROBE(2) * (trust * 2.0 + (1 - trust) * 1.0))  # approx: float arithmetic
    assert cost(1) == pytest.approx(PROBE(1))


def test_the_rule_reads_the_learned_curve():
    """By the probe one mask pays (position 2 kept 40%: 1.4 tokens for 1.25x); the passes show 1.6x: NTP."""
    stats = AcceptanceStats(8, window=float("inf"))
    for i in range(100):
        stats.record(proposed=2, accepted=2 if i % 5 < 2 else 1)
    cost = LearnedPassCost(PROBE)
    rule = ProposalRule(stats, cost, explore_share=0.0)
    assert rule.choose(rows=1, fed_per_row=1) == 2
    for _ in range(TRUST_PASSES):
        cost.observe(1, PROBE(1))
        cost.observe(2, 1.6 * PROBE(1))
    cost.refresh()
    assert rule.choose(rows=1, fed_per_row=1) == 1  # the rule's price cache follows the curve's rebuilds


def test_size_buckets_are_exact_then_four_per_doubling():
    assert [size_bucket(n) for n in (0, 1, 7, 32)] == [1, 1, 7, 32]
    assert [size_bucket(n) for n in (33, 64, 66, 70, 1000)] == [32, 64, 64, 76, 1024]
    assert len({size_bucket(n) for n in range(1, 20_000)}) < 32 + 4 * 10  # bounded: a server's memory stays flat


def test_the_decoder_reports_every_pass_with_its_tokens_fed(tiny):
    """A fake clock that the forward advances by 1 ms per token fed: each observation must be exactly that."""
    model, _ = tiny
    now = [0.0]
    forward = model.forward

    def timed_forward(*args, input_ids, **kwargs):
        now[0] += 0.001 * input_ids.numel()
        return forward(*args, input_ids=input_ids, **kwargs)

    per_token = PassCost([(1, 0.001), (64, 0.064)])  # the probe prices exactly what the fake clock charges
    cost = LearnedPassCost(per_token, clock=lambda: now[0])
    decoder = BatchDecoder(model, load_aware=LoadAware(cost, k_max=4))
    model.forward = timed_forward
    try:
        for i, mode in enumerate(["auto:0.6:4", "auto:verify:4", "ntp"]):
            strategy, aware = resolve_strategy(mode)
            decoder.add([5 + i, 6, 7, 8, 9][: 3 + i], strategy, max_new_tokens=6, load_aware=aware)
        steps = 0
        while decoder.active:
            decoder.step()
            steps += 1
    finally:
        del model.forward  # the instance attribute: back to the class's forward
    assert cost.passes == steps
    ratios = [r for window in cost.ratios.values() for r in window]
    assert ratios == pytest.approx([1.0] * steps)  # approx: float sums of milliseconds


def test_a_fixed_curve_is_read_like_a_learned_one_and_learns_nothing(tiny):
    """The decoder and /health read either curve the same way: a fixed one gives no clock (so no
    pass is timed), ignores observations and reports itself as fixed."""
    model, _ = tiny
    fixed = PassCost(list(PROBE.points))
    load_aware = LoadAware(fixed, k_max=4)
    assert load_aware.clock is None and LoadAware(LearnedPassCost(PROBE, clock=time.thread_time)).clock is not None
    decoder = BatchDecoder(model, load_aware=load_aware)
    strategy, aware = resolve_strategy("auto:0.6:4")
    decoder.add([5, 6, 7], strategy, max_new_tokens=6, load_aware=aware)
    while decoder.active:
        decoder.step()
    load_aware.observe(2, 10 * PROBE(2))
    assert fixed.points == PROBE.points and fixed.version == 0
    assert fixed.report() == {"fixed": PROBE.describe()}
    learned = LearnedPassCost(PROBE)
    learned.observe(2, PROBE(2))
    assert learned.report() == {"probe": PROBE.describe(), "learned": PROBE.describe(), "passes_timed": 1}


def test_the_learned_curve_stays_monotone():
    """2-token passes measured dearer than 4-token ones (noise, or a size seen under a burst of load):
    feeding more must still never look cheaper, as on the probe's curve."""
    cost = LearnedPassCost(PROBE)
    for _ in range(TRUST_PASSES):
        cost.observe(1, PROBE(1))
        cost.observe(2, 3 * PROBE(2))
        cost.observe(4, PROBE(4))
    cost.refresh()
    prices = [cost(t) for t in range(1, 40)]
    assert all(a <= b for a, b in zip(prices, prices[1:], strict=False))


def test_pass_clock_counts_the_computing_threads_cpu_time():
    """One torch thread: the model computes in the calling thread, and the process's CPU time would also
    count the server's HTTP thread (docs/measurements/pass-clock-cpu); more: torch's workers share the pass."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pass_clock("cpu") is time.thread_time
        torch.set_num_threads(2)
        assert pass_clock("cpu") is time.process_time
    finally:
        torch.set_num_threads(threads)
