"""Load-aware mask count: per pass, propose as many tokens as the batch can afford (down to NTP).

The rule. A pass over B rows that feeds each row w real tokens plus m masks costs `cost(B * (w + m))`
seconds (the curve `PassCost` measures at start-up). With m masks a row expects
`E(m) = 1 + sum_{j=2..m+1} P(run >= j)` accepted tokens, where `P(run >= j)` is the running
fraction of passes that proposed position j and accepted it (`AcceptanceStats`). The server picks
the m that maximises its expected throughput `B * E(m) / cost(B * (w + m))`. m = 0 (plain NTP) is
always a candidate, so the choice never expects fewer tokens/s than NTP: masks are used while a
pass costs about the same whatever it is fed (one request, a GPU at small batch) and dropped once
compute is the bottleneck (many requests on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from selfmtp.decoding.kv_cache import preallocated_cache

PROBE_TOKENS = (1, 2, 4, 8, 16)  # tokens fed per row in the start-up probe
PROBE_ROWS = (1, 2, 4, 8)  # batch widths in the start-up probe
PROBE_PREFIX = 48  # cached tokens per row before the timed passes (attention is part of the cost)


@dataclass
class PassCost:
    """Seconds one forward pass takes by the total tokens it feeds, piecewise linear between points."""

    points: list[tuple[int, float]]  # (tokens fed, seconds), ascending in tokens

    def __call__(self, tokens: int) -> float:
        xs = [x for x, _ in self.points]
        ys = [y for _, y in self.points]
        if tokens <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(self.points, self.points[1:], strict=False):
            if tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        if len(xs) == 1:
            return ys[0] * tokens / xs[0]
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))  # beyond the probe: the last slope
        return ys[-1] + slope * (tokens - xs[-1])

    @classmethod
    def measure(cls, model, *, max_rows: int = 8, repeats: int = 3, seed: int = 0) -> PassCost:
        """Time cached passes of the loaded model for a few batch widths and tokens per row."""
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        timings: dict[int, list[float]] = {}
        with torch.inference_mode():
            for rows in [r for r in PROBE_ROWS if r <= max(1, max_rows)]:
                cache = preallocated_cache(model)
                prefix = torch.randint(0, vocab, (rows, PROBE_PREFIX), generator=generator)
                model(input_ids=prefix.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
                for fed in PROBE_TOKENS:
                    ids = torch.randint(0, vocab, (rows, fed), generator=generator).to(model.device)
                    seconds = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=fed)
                        _synchronize(model.device)
                        seconds.append(time.perf_counter() - start)
                        cache.crop(-fed)
                    timings.setdefault(rows * fed, []).append(min(seconds))  # min: least disturbed by others
        points = sorted((tokens, sum(s) / len(s)) for tokens, s in timings.items())
        monotone, most = [], 0.0
        for tokens, seconds in points:  # feeding more never costs less: smooth out timing noise
            most = max(most, seconds)
            monotone.append((tokens, most))
        return cls(monotone)


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class AcceptanceStats:
    """Running P(run >= j) per proposal position j, from what load-aware rows proposed and accepted.

    Starts from a prior of `prior_accepted` / `prior_proposed` per position, so untried positions
    look worth trying once; evidence outweighs it after a few passes.
    """

    k_max: int
    prior_accepted: float = 1.0
    prior_proposed: float = 2.0
    proposed: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.proposed = [0.0] * (self.k_max + 1)
        self.accepted = [0.0] * (self.k_max + 1)

    def record(self, proposed: int, accepted: int) -> None:
        for j in range(2, min(proposed, self.k_max) + 1):
            self.proposed[j] += 1
            self.accepted[j] += accepted >= j

    def rate(self, j: int) -> float:
        return (self.accepted[j] + self.prior_accepted) / (self.proposed[j] + self.prior_proposed)

    def expected_tokens(self, proposals: int) -> float:
        """E(tokens accepted) from a pass proposing `proposals` tokens (position 1 is always kept)."""
        return 1.0 + sum(self.rate(j) for j in range(2, min(proposals, self.k_max) + 1))


def choose_proposals(
    stats: AcceptanceStats, cost: PassCost, *, rows: int, fed_per_row: int, least: int = 1
) -> int:
    """Tokens to propose this pass (1 = NTP) maximising expected tokens/s of `rows` rows.

    `fed_per_row` is the widest block of real tokens a row feeds this pass; `least` is the proposal
    count the pass has anyway (rows with a fixed strategy), which costs nothing extra to use.
    """
    best, best_rate = 1, -1.0
    for k in range(1, stats.k_max + 1):
        width = fed_per_row + max(k, least) - 1
        rate = rows * stats.expected_tokens(max(k, least)) / cost(rows * width)
        if rate > best_rate * (1 + 1e-9):  # ties go to fewer masks: same speed, less compute
            best, best_rate = max(k, least), rate
    return best
