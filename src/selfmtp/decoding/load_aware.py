"""Load-aware mask count: per pass, propose as many tokens as the batch can afford (down to NTP).

Used by `batch.BatchDecoder` for rows added with `load_aware=True` (the `auto` strategies of
`selfmtp serve`, `generate` and `bench`).

The rule (`ProposalRule.choose`). A pass over B rows that feeds each row w real tokens and proposes
k tokens (k - 1 masks) costs `cost(B * (w + k - 1))` seconds. The curve is the one the loop runs:
`pass_cost.LearnedPassCost`, the start-up probe (`PassCost.measure`) corrected by the decoder's own
timed passes (per size fed, the median of measured over probed seconds), because the probe times
bare model calls and under-priced SmolLM2's draft passes (1.25x an NTP pass by the probe, ~1.5x
served). With k proposals a row expects `E(k) = 1 + sum_{j=2..k} P(run >= j)` tokens, where
`P(run >= j) = q_2 * ... * q_j` and `q_j` is the rate at which a row whose accepted run reached
j - 1 also kept position j (`AcceptanceStats`; a ConfAdapt run is a leading run, so position j only
says something when j - 1 was kept).

- Exploit: the k that maximises `B * E(k) / cost(B * (w + k - 1))` with the cautious estimate
  `q_j = kept_j / (seen_j + 1)`, if it promises MIN_GAIN (5%) more tokens/s than the proposals the
  pass has anyway (NTP, or a fixed row's k), else those. An untried position counts as one
  rejection, so the server starts at NTP and only uses masks it has seen kept; the margin keeps it
  at NTP where the curve's own error (a few percent) could turn a predicted gain into a loss.
- Explore: the k in (exploit, 2 x exploit] with the best expected tokens/s under the optimistic
  estimate `q_j = (kept_j + 1) / (seen_j + 1)` (from NTP that is one mask, the cheapest pass that
  can learn something new; where masks are kept the choice climbs 1, 2, 4, 8 in a few passes), and
  only when both hold: (a) that optimistic rate beats the exploit choice's by MIN_GAIN (an untried
  position is optimistically always kept, so a k the curve says cannot pay even then is never
  tried; the gap between the two estimates is 1 / (seen_j + 1), so a position seen rejected a few
  times is no longer tried where masks cost time), and (b) the seconds spent on exploration beyond
  the exploit choice, by the curve at the time, stay within `explore_share` (EXPLORE_SHARE, 2%) of the
  seconds of all passes so far.

The bound: by the curve, exploration adds at most EXPLORE_SHARE of all seconds, and the exploit
choice never expects fewer tokens/s than NTP (its estimate is below the true rate in expectation),
so a run's expected tokens/s is at least (1 - EXPLORE_SHARE) x NTP's, whatever the acceptance
(test_load_aware.py simulates it over curves, acceptance rates and batch widths). The bound holds by
the curve the rule reads; on a machine where the probe under-prices mask passes by 15-30%, the
learned curve meets the true one where the rule runs, and where it has not run leans towards NTP,
so the bound holds by the true cost too (simulated: worst 0.997x NTP over a whole run, 1.000x once
learned; with the probe's curve alone 0.84x). When masks are
never kept the exploit choice is NTP on every pass and exploration stops after a handful of tries
once (a) fails. When masks are kept the cautious estimate approaches the true rate and the choice
the k with the highest expected tokens/s: k_max where a pass costs about the same whatever it is
fed (one request, a GPU at small batch), NTP once compute is the bottleneck (many requests on a
CPU), the break-even in between. Evidence fades over `window` observations per position, so the
choice follows a change of workload.

Measured on the 2-core CPU under load (docs/measurements/serve-loadaware-cpu-loaded/, concurrency 1
and 4): on SmolLM2-135M, whose masks are never kept, `auto` ran NTP passes on 61 of 67 passes and
tried one mask on 6 (fixed ConfAdapt k_max 8: 0.52x NTP); on the demo student it climbed to 8
proposals within its first request, 2.73x NTP at concurrency 1.

Exact rows (`auto:verify[:K][:lookup]`) are sized by the same rule with their own stats and a pass
cost of two tokens per proposal (`LoadAware` below says why). The figures for the targets (five
modes, concurrency 1-8, three models; the command is in benchmarks/bench_serve.py's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost

EXPLORE_SHARE = 0.02  # the most of all passes' seconds that exploration may add
MIN_GAIN = 0.05  # tokens/s more proposals must promise beyond the cheaper choice's (the curve's error)


@dataclass
class AcceptanceStats:
    """Per proposal position j >= 2: how often a row whose run reached j - 1 also kept position j.

    Counts fade by a factor (1 - 1/window) per new observation of a position, so they weigh about
    the last `window` observations.
    """

    k_max: int
    window: float = 1000.0
    seen: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.seen = [0.0] * (self.k_max + 1)
        self.kept = [0.0] * (self.k_max + 1)

    def record(self, proposed: int, accepted: int) -> None:
        """One row's pass: it proposed `proposed` tokens and its strategy kept the first `accepted`."""
        fade = 1.0 - 1.0 / self.window
        for j in range(2, min(proposed, self.k_max, accepted + 1) + 1):  # positions the run reached
            self.seen[j] = self.seen[j] * fade + 1.0
            self.kept[j] = self.kept[j] * fade + (accepted >= j)

    def rate(self, j: int, optimistic: bool = False) -> float:
        """q_j: cautious (an untried position counts as one rejection) or optimistic (as one acceptance)."""
        return (self.kept[j] + optimistic) / (self.seen[j] + 1.0)

    def expected_tokens(self, optimistic: bool = False) -> list[float]:
        """E(k) for k = 0..k_max (E(0) unused): tokens a row expects from a pass proposing k tokens."""
        expected, run, reach = [0.0, 1.0], 1.0, 1.0
        for j in range(2, self.k_max + 1):
            reach *= self.rate(j, optimistic)  # P(run >= j)
            run += reach
            expected.append(run)
        return expected


@dataclass
class ProposalRule:
    """The per-pass choice of the proposal count (module docstring), with its exploration budget."""

    stats: AcceptanceStats
    cost: PassCost | LearnedPassCost
    explore_share: float = EXPLORE_SHARE
    min_gain: float = MIN_GAIN
    fed_per_proposal: int = 1  # tokens a row feeds per proposal beyond the first: 1 mask; exact rows 2 (draft + mask)
    seconds: float = 0.0  # all chosen passes, by the curve at the time
    explored: float = 0.0  # what exploration passes cost beyond the exploit choice, by the curve
    explorations: int = 0
    _seconds: dict = field(default_factory=dict, repr=False)  # prices by (rows, fed per row), for one curve version
    _version: int = field(default=0, repr=False)

    def choose(self, *, rows: int, fed_per_row: int, least: int = 1, most: int | None = None) -> int:
        """Tokens to propose this pass (1 = NTP) for `rows` rows feeding up to `fed_per_row` real tokens.

        `least` is the proposal count the pass has anyway (rows with a fixed strategy): using it
        costs nothing extra. `most` (default the stats' k_max): the rows' strategies propose no more.
        """
        k_max = min(self.stats.k_max, most or self.stats.k_max)
        least = min(max(1, least), k_max)
        if self.cost.version != self._version:  # the learned curve was rebuilt: price again
            self._seconds, self._version = {}, self.cost.version
        seconds = self._seconds.get((rows, fed_per_row))  # by k, up to the stats' k_max
        if seconds is None:
            per = self.fed_per_proposal
            seconds = [0.0] + [self.cost(rows * (fed_per_row + per * (k - 1))) for k in range(1, self.stats.k_max + 1)]
            if fed_per_row <= self.stats.k_max:  # decode passes: the same few (rows, fed) come back pass after pass
                self._seconds[rows, fed_per_row] = seconds
        cautious = self.stats.expected_tokens()
        # ties go to fewer masks: the same speed for less compute
        best = max(range(least, k_max + 1), key=lambda k: (cautious[k] / seconds[k], -k))
        gain = 1.0 + self.min_gain  # more than the pass has anyway must beat it by more than the curve's error
        exploit = best if cautious[best] / seconds[best] >= gain * cautious[least] / seconds[least] else least
        chosen = exploit
        if exploit < k_max:
            optimistic = self.stats.expected_tokens(optimistic=True)
            tries = range(exploit + 1, min(k_max, 2 * exploit) + 1)  # up to twice as many: log steps
            probe = max(tries, key=lambda k: (optimistic[k] / seconds[k], -k))
            extra = seconds[probe] - seconds[exploit]
            worth = optimistic[probe] / seconds[probe] >= gain * cautious[exploit] / seconds[exploit]
            affordable = self.explored + extra <= self.explore_share * (self.seconds + seconds[probe])
            if worth and affordable:
                chosen, self.explored, self.explorations = probe, self.explored + extra, self.explorations + 1
        self.seconds += seconds[chosen]
        return chosen


@dataclass
class LoadAware:
    """The load-aware caps of one decode loop (`batch.BatchDecoder`): one rule per row kind.

    - lossy rows (`auto[:TAU[:KMAX]]`, ConfAdapt): a pass proposing k tokens feeds k - 1 masks and
      the rows' stats count how many of the k tokens ConfAdapt kept;
    - exact rows (`auto:verify[:K]`): a pass allowed k proposals feeds at most k - 1 masks and
      k - 1 lookup drafts; the mask drafts of the previous pass are fed whatever the cap (they are
      what an earlier pass paid for), so up to 2(k - 1) tokens beyond the row's own
      (`fed_per_proposal=2`). Their stats count, per pass, the draft capacity the row paid for
      (the masks fed one pass earlier, or the lookup drafts fed now) and how many drafts the
      model's own greedy choice confirmed (`verify.ExactRow.proposed`). So a cap of 1 is plain
      NTP passes, and the output never changes: only what is fed does.

    Each kind has its own stats and exploration budget; a pass with rows of both kinds asks both.
    Both read one curve: with a `LearnedPassCost`, the decoder times its passes by `clock` and
    `observe`s them, so the curve becomes the one the loop really runs.
    """

    cost: PassCost | LearnedPassCost
    k_max: int = 16
    rules: dict[str, ProposalRule] = field(init=False)
    chosen: dict[str, dict[int, int]] = field(init=False)  # kind -> {proposals allowed: passes}

    def __post_init__(self):
        self.rules = {
            "lossy": ProposalRule(AcceptanceStats(self.k_max), self.cost),
            "exact": ProposalRule(AcceptanceStats(self.k_max), self.cost, fed_per_proposal=2),
        }
        self.chosen = {kind: {} for kind in self.rules}

    @property
    def explorations(self) -> int:
        return sum(rule.explorations for rule in self.rules.values())

    def caps(self, rows) -> dict[str, int]:
        """Row kind -> the proposals this pass allows its load-aware rows (`batch.BatchRow`s)."""
        fixed = [row.state.k for row in rows if not row.load_aware]  # proposals the pass has anyway
        widest = max(len(row.state.pending) for row in rows)
        caps = {}
        for kind, rule in self.rules.items():
            mine = [row.strategy.k_max for row in rows if row.load_aware and row.kind == kind]
            if mine:
                k = rule.choose(rows=len(rows), fed_per_row=widest, least=max(fixed, default=1), most=max(mine))
                caps[kind] = k
                self.chosen[kind][k] = self.chosen[kind].get(k, 0) + 1
        return caps

    def record(self, kind: str, proposed: int, accepted: int) -> None:
        self.rules[kind].stats.record(proposed, accepted)

    @property
    def clock(self):
        """What the decoder times its passes with, or None where the curve is fixed (nothing to learn)."""
        return self.cost.clock

    def observe(self, tokens: int, seconds: float) -> None:
        """One pass of the decoder fed `tokens` tokens and took `seconds` by `clock`."""
        self.cost.observe(tokens, seconds)
