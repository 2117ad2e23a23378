"""The load-aware mask count: the pass-cost curve, acceptance stats and the per-pass rule.

The rule is tested by simulation, without timing: a fake `PassCost` and seeded acceptance draws
stand in for the model, and a pass's cost is the curve's (the budget is stated in those terms).
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from selfmtp.decoding.load_aware import EXPLORE_SHARE, AcceptanceStats, ProposalRule
from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost, monotone_from_above
from selfmtp.decoding.strategies import NTP, Verify
from selfmtp.errors import SelfMTPError
from selfmtp.serving.config import resolve_strategy
from selfmtp.serving.engine import Engine, Request

FLAT = PassCost([(1, 0.010), (128, 0.010)])  # an overhead-bound engine: any pass costs the same
LINEAR = PassCost([(1, 0.010), (128, 1.280)])  # compute-bound: cost grows with every token fed
# SmolLM2-135M on this 2-core CPU under load (docs/measurements/serve-smollm2-cpu): a mask costs +43%
SMOLLM2_CPU = PassCost(
    [(1, 0.627), (2, 0.896), (4, 0.990), (8, 1.170), (16, 1.498), (32, 2.213), (64, 3.346)]
)
# the demo student (docs/measurements/serve-tiny-gsm-demo-student-cpu): flat up to 16 tokens
DEMO_CPU = PassCost([(1, 0.0087), (16, 0.0089), (32, 0.012), (64, 0.0204), (128, 0.0237)])


def simulate(rule: ProposalRule, keep_rates, passes: int, *, rows: int = 1, seed: int = 0) -> list[int]:
    """Run `passes` passes; position j of a row is kept with probability keep_rates[j] once j - 1 was."""
    draw = random.Random(seed)
    return [run_pass(rule, keep_rates, rows, draw) for _ in range(passes)]


def run_pass(rule: ProposalRule, keep_rates, rows: int, draw: random.Random) -> int:
    """One pass: the rule's k; each row's run is drawn and recorded in the rule's stats."""
    k = rule.choose(rows=rows, fed_per_row=1)
    for _ in range(rows):
        run = 1
        while run < k and draw.random() < keep_rates.get(run + 1, 0.0):
            run += 1
        rule.stats.record(proposed=k, accepted=run)
    return k


def cost_of(chosen: list[int], cost: PassCost, rows: int = 1) -> float:
    return sum(cost(rows * k) for k in chosen)


@pytest.mark.parametrize("curve", [SMOLLM2_CPU, DEMO_CPU, LINEAR, PassCost([(1, 1.0), (2, 1.01), (16, 1.2)])])
@pytest.mark.parametrize("rows", [1, 4])
def test_useless_masks_cost_at_most_the_exploration_share_over_ntp(curve, rows):
    """Masks never kept: at every pass the chosen passes cost <= NTP's / (1 - share), by the curve."""
    rule = ProposalRule(AcceptanceStats(8), curve)
    chosen = simulate(rule, {}, 400, rows=rows)
    ntp, spent = curve(rows), 0.0
    for n, k in enumerate(chosen, start=1):
        spent += curve(rows * k)
        assert spent <= n * ntp / (1 - EXPLORE_SHARE) * (1 + 1e-12)  # 1e-12: float sums in another order
    assert max(chosen) <= 2  # exploration tries one mask, never k_max
    dearer = curve(2 * rows) / ntp - 1  # what one mask adds to a pass
    # where a mask costs time, the optimistic 1 + 1/(seen + 1) stops beating NTP after ~1/dearer rejections
    if dearer > 0.01:
        assert rule.stats.seen[2] < 1 / dearer + rows and set(chosen[-100:]) == {1}


@pytest.mark.parametrize("curve", [FLAT, DEMO_CPU, SMOLLM2_CPU])
def test_masks_always_kept_converge_to_k_max(curve):
    rule = ProposalRule(AcceptanceStats(8), curve)
    chosen = simulate(rule, dict.fromkeys(range(2, 9), 1.0), 300)
    assert set(chosen[-100:]) == {8}
    if curve is not SMOLLM2_CPU:  # masks (nearly) free: explorations are free too, and double each pass
        assert chosen[:3] == [2, 4, 8]
    cost = cost_of(chosen, curve) / sum(chosen)  # seconds per token; NTP's is curve(1)
    assert cost < curve(1) / 3 if curve is not SMOLLM2_CPU else cost < curve(1) / 2


def expected_tokens(keep_rates: dict, k: int) -> float:
    """The true E(k) of a row whose position j is kept with probability keep_rates[j] once j - 1 was."""
    expected, reach = 1.0, 1.0
    for j in range(2, k + 1):
        reach *= keep_rates.get(j, 0.0)
        expected += reach
    return expected


# SmolLM2-135M quiet, 1 thread (docs/measurements/serve-all-modes-cpu/smollm2): 2 tokens cost 1.68x one,
# 4 tokens the same as 2 (the GEMV -> GEMM step), then about +13% per doubling
SMOLLM2_QUIET = PassCost([(1, 0.059), (2, 0.0994), (4, 0.0997), (8, 0.1125), (16, 0.1492), (32, 0.210), (64, 0.369)])
STEEP_FIRST_MASK = PassCost([(1, 1.0), (2, 1.3), (16, 5.5)])


@pytest.mark.parametrize("curve", [SMOLLM2_QUIET, SMOLLM2_CPU, DEMO_CPU, LINEAR, FLAT, STEEP_FIRST_MASK])
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("rows", [1, 8])
def test_the_rule_expects_at_least_ntp_less_the_exploration_share(curve, keep, rows):
    """The bound: over a run, expected tokens per curve-second >= (1 - EXPLORE_SHARE) x NTP's.

    Why: exploration passes cost at most EXPLORE_SHARE of all seconds beyond the exploit choice, and
    the exploit choice is NTP unless its cautious estimate (below the true rate in expectation)
    promises MIN_GAIN more tokens/s. Here every position is kept with probability `keep`; a pass's
    tokens are counted as their true expectation, so only the rule's choices are random. (Seen in
    simulation over 576 runs of curves, rates, widths and seeds: worst 0.9996 of NTP.)"""
    rule = ProposalRule(AcceptanceStats(8), curve)
    rates = dict.fromkeys(range(2, 9), keep)
    draw, tokens, seconds = random.Random(0), 0.0, 0.0
    for _ in range(1500):
        k = run_pass(rule, rates, rows, draw)
        tokens, seconds = tokens + rows * expected_tokens(rates, k), seconds + curve(rows * k)
        assert rule.explored <= EXPLORE_SHARE * rule.seconds * (1 + 1e-12)  # 1e-12: float sums
    assert tokens / seconds >= (1 - EXPLORE_SHARE) * rows / curve(rows)


@pytest.mark.parametrize("probe", [SMOLLM2_QUIET, SMOLLM2_CPU, DEMO_CPU])
@pytest.mark.parametrize("under", [0.15, 0.30])
@pytest.mark.parametrize("keep", [0.1, 0.2, 0.6, 0.8])
@pytest.mark.parametrize("rows", [1, 8])
def test_a_rule_that_learns_its_cost_expects_at_least_ntp_where_the_probe_under_prices_masks(probe, under, keep, rows):
    """The bound, on a machine whose passes with masks cost `under` more than the probe said (session 9's
    trace: +18-28% on SmolLM2): the rule reads a `LearnedPassCost` fed every pass's true seconds and expects
    >= (1 - EXPLORE_SHARE) x NTP's tokens/s by the true cost, once it has learned (the last 1000 of 1500
    passes) and over the whole run. Position 2 is kept with probability `keep`, later ones 10% of the time.
    With the probe's curve alone, 9 of these 48 runs fall below that, to 0.84x (DEMO_CPU, 30%, keep 0.1)."""
    true = lambda tokens: probe(tokens) * (1.0 if tokens <= rows else 1.0 + under)  # noqa: E731
    rule = ProposalRule(AcceptanceStats(8), LearnedPassCost(probe))
    rates = {**dict.fromkeys(range(3, 9), 0.1), 2: keep}
    draw, tokens, seconds = random.Random(1), [], []
    for _ in range(1500):
        k = run_pass(rule, rates, rows, draw)
        rule.cost.observe(rows * k, true(rows * k))
        tokens.append(rows * expected_tokens(rates, k))
        seconds.append(true(rows * k))
    ntp = rows / true(rows)
    assert sum(tokens[500:]) / sum(seconds[500:]) >= (1 - EXPLORE_SHARE) * ntp
    assert sum(tokens) / sum(seconds) >= (1 - EXPLORE_SHARE) * ntp


def test_a_gain_within_the_curves_error_keeps_ntp():
    """Two rows on SmolLM2's quiet curve: a mask makes the pass 0.3% dearer and position 2 is kept 3% of
    the time. By the curve one mask pays (+2.7%), but by less than the probe can tell (MIN_GAIN): NTP."""
    stats = AcceptanceStats(8)
    for i in range(1000):
        stats.record(proposed=2, accepted=2 if i % 33 == 0 else 1)  # 31 of 1000 kept
    assert stats.expected_tokens()[2] / SMOLLM2_QUIET(4) > 1 / SMOLLM2_QUIET(2)
    assert ProposalRule(stats, SMOLLM2_QUIET, explore_share=0.0).choose(rows=2, fed_per_row=1) == 1
    assert ProposalRule(stats, SMOLLM2_QUIET, explore_share=0.0, min_gain=0.0).choose(rows=2, fed_per_row=1) == 2


def test_compute_bound_masks_are_not_tried_even_when_kept():
    """Cost linear in tokens fed: k tokens per pass cost k passes, so no mask can win."""
    rule = ProposalRule(AcceptanceStats(8), LINEAR)
    assert set(simulate(rule, dict.fromkeys(range(2, 9), 1.0), 200, rows=8)) == {1}


@pytest.mark.parametrize(("keep", "expected"), [(0.15, 1), (0.5, 2)])
def test_masks_good_only_sometimes_settle_at_the_break_even(keep, expected):
    """One mask costs +30%, so it pays iff position 2 is kept more than 30% of the time."""
    curve = PassCost([(1, 1.0), (2, 1.3), (16, 5.5)])  # beyond one mask: too dear to pay (3 tokens: 1.6)
    rule = ProposalRule(AcceptanceStats(8), curve)
    chosen = simulate(rule, {2: keep, 3: 0.2}, 2000, seed=1)
    last = chosen[-500:]
    assert last.count(expected) >= 0.95 * len(last)


def test_cautious_choice_never_expects_less_than_ntp():
    """With no exploration the chosen k's expected tokens/s (cautious estimate) is >= NTP's."""
    curve = PassCost([(1, 0.01), (4, 0.011), (16, 0.02), (64, 0.09), (128, 0.2)])
    for accepted in range(1, 9):
        stats = AcceptanceStats(8)
        for _ in range(20):
            stats.record(proposed=8, accepted=accepted)
        expected = stats.expected_tokens()
        for rows in (1, 2, 4, 8, 16):
            k = ProposalRule(stats, curve, explore_share=0.0).choose(rows=rows, fed_per_row=1)
            assert rows * expected[k] / curve(rows * k) >= rows / curve(rows)


def test_fixed_rows_set_a_floor_that_costs_nothing_extra():
    rule = ProposalRule(AcceptanceStats(8), LINEAR)
    assert rule.choose(rows=2, fed_per_row=1, least=4) == 4


def test_acceptance_stats_are_conditional_on_the_run():
    stats = AcceptanceStats(4, window=math.inf)  # nothing fades: plain counts
    for _ in range(10):
        stats.record(proposed=4, accepted=2)  # position 2 kept, 3 seen and rejected, 4 never reached
    assert (stats.seen, stats.kept) == ([0, 0, 10, 10, 0], [0, 0, 10, 0, 0])
    assert stats.expected_tokens() == pytest.approx([0, 1, 1 + 10 / 11, 1 + 10 / 11, 1 + 10 / 11])
    assert stats.rate(4) == 0.0 and stats.rate(4, optimistic=True) == 1.0  # untried: cautious 0, optimistic 1


def test_acceptance_stats_forget_over_their_window():
    stats = AcceptanceStats(2, window=10)
    for _ in range(100):
        stats.record(proposed=2, accepted=2)
    for _ in range(30):
        stats.record(proposed=2, accepted=1)
    assert stats.seen[2] == pytest.approx(10 * (1 - 0.9**130))  # at most `window` observations' weight
    assert stats.rate(2) < 0.05  # 0.9**30 = 0.04 of the old evidence is left


def test_pass_cost_interpolates_and_extrapolates():
    cost = PassCost([(1, 1.0), (3, 2.0), (5, 6.0)])
    assert cost(1) == 1.0 and cost(2) == 1.5 and cost(4) == 4.0
    assert cost(7) == 10.0  # beyond the probe: the last slope (2 per token)
    assert cost(0) == 1.0


def test_pass_cost_reads_back_what_the_server_logs():
    logged = "pass cost by tokens fed: " + SMOLLM2_QUIET.describe()
    assert logged.endswith("1: 59.0 ms, 2: 99.4 ms, 4: 99.7 ms, 8: 112.5 ms, 16: 149.2 ms, 32: 210.0 ms, 64: 369.0 ms")
    parsed = PassCost.parse(logged).points
    assert [n for n, _ in parsed] == [n for n, _ in SMOLLM2_QUIET.points]
    assert [s for _, s in parsed] == pytest.approx([s for _, s in SMOLLM2_QUIET.points])  # approx: ms -> s division
    with pytest.raises(SelfMTPError, match="no pass cost"):
        PassCost.parse("pass cost by tokens fed:")


def test_auto_strategy_names():
    strategy, load_aware = resolve_strategy("auto")
    assert load_aware and strategy.name == "confadapt:0.9:16"
    assert resolve_strategy("auto:0.7:8")[0].name == "confadapt:0.7:8"
    assert resolve_strategy("ntp") == (NTP(), False)
    assert resolve_strategy("auto:verify:4:lookup") == (Verify(4, lookup=True), True)


def run_engine(
    mtp, pass_cost: PassCost, prompts: list[str], max_tokens: int = 16, strategy: str = "auto:0.6:4"
) -> tuple[Engine, list[list[int]]]:
    """Decode `prompts` with `strategy` on an engine stepped in this thread; (engine, token ids per prompt)."""
    engine = Engine(mtp, max_batch=4, pass_cost=pass_cost, auto_k_max=4)
    strategy, load_aware = resolve_strategy(strategy)
    loop = asyncio.new_event_loop()  # never run: the events the engine sends stay queued
    requests = [
        Request(mtp.encode(p, chat=False), strategy, load_aware, max_tokens, [], loop) for p in prompts
    ]
    for request in requests:
        engine.submit(request)
    while engine.waiting or engine.decoder.active:
        engine._admit()
        engine._step()
    loop.close()
    return engine, [request.row.token_ids for request in requests]


def test_engine_stays_at_ntp_where_masks_cost_a_pass_each_and_then_decodes_as_ntp(peaked):
    prompt = "Tell me about the weather"
    engine, (tokens,) = run_engine(peaked, LINEAR, [prompt])
    assert engine.snapshot()["proposals_chosen"] == {1: engine.snapshot()["passes"]}
    assert tokens == peaked.generate(prompt, strategy="ntp", max_new_tokens=16, chat=False).token_ids


def test_engine_sizes_exact_rows_with_their_own_rule(peaked):
    """auto:verify in the server's engine: NTP passes where every token fed costs a pass, greedy tokens."""
    prompt = "Tell me about the weather"
    engine, (tokens,) = run_engine(peaked, LINEAR, [prompt], strategy="auto:verify:4")
    stats = engine.snapshot()
    assert stats["exact_proposals_chosen"] == {1: stats["passes"]} and stats["proposals_chosen"] == {}
    assert tokens == peaked.generate(prompt, strategy="ntp", max_new_tokens=16, chat=False).token_ids


def test_engine_learns_masks_that_are_kept_where_they_are_free(peaked):
    """The sharpened tiny model keeps tokens at tau 0.6 (see test_serve): on a flat curve the rule goes to k_max."""
    engine, _ = run_engine(peaked, FLAT, ["Tell me about the weather", "Request 1 asks about"], max_tokens=40)
    chosen = engine.snapshot()["proposals_chosen"]
    assert max(chosen) == 4 and chosen[4] > sum(chosen.values()) / 2
    assert engine.load_aware.rules["lossy"].stats.kept[2] > 0


def test_probe_smoothing_pulls_slow_outliers_down():
    """Noise only adds time: a slow outlier at 4 tokens must not raise the cost of 8 and 16 tokens."""
    measured = [(1, 1.0), (2, 1.1), (4, 9.0), (8, 1.3), (16, 1.2), (32, 2.0)]
    assert monotone_from_above(measured) == [(1, 1.0), (2, 1.1), (4, 1.2), (8, 1.2), (16, 1.2), (32, 2.0)]


def test_probe_times_every_size_and_smooths_its_outliers(tiny, monkeypatch):
    """The probe on a scripted clock: each forward pass of R rows x T tokens takes SCRIPTED[R * T] seconds, a
    slow outlier at 4 tokens; the curve must hold every size's time, the outlier pulled down to the next size's."""
    import selfmtp.decoding.pass_cost as pass_cost_module

    model, _ = tiny
    scripted = {1: 1.0, 2: 1.1, 4: 9.0, 8: 1.3, 16: 1.2, 32: 2.0}
    now = [0.0]

    def advance(_module, _args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] <= 16:  # not the 64-token prefills, which are not timed
            now[0] += scripted[ids.numel()]

    monkeypatch.setattr(pass_cost_module, "pass_clock", lambda device: lambda: now[0])
    hook = model.register_forward_pre_hook(advance, with_kwargs=True)
    try:
        cost = PassCost.measure(model, max_rows=2, rounds=1, min_seconds=0.0)
    finally:
        hook.remove()
    assert [tokens for tokens, _ in cost.points] == [1, 2, 4, 8, 16, 32]
    # approx: the clock's differences round in the last bits
    assert [seconds for _, seconds in cost.points] == pytest.approx([1.0, 1.1, 1.2, 1.2, 1.2, 2.0], rel=1e-9)
