"""What a forward pass costs by the tokens it feeds: the start-up probe and the curve learned online.

`PassCost` is a piecewise-linear curve (tokens fed -> seconds). `PassCost.measure` probes it at
start-up by timing cached passes of the loaded model. `LearnedPassCost` is the curve the load-aware
rule (`load_aware.ProposalRule`) reads while serving: the probe's curve, corrected by the decode
loop's own timed passes (`batch.BatchDecoder.step` times each pass with `pass_clock`, the probe's
clock, and reports the tokens it fed). The probe times bare model calls; a served pass also lays
out its rows, reads out, checks drafts and crops the cache. On smollm2-135m-mtp the served 2-token
passes of exact rows cost 1.47x an NTP pass where the probe said 1.25x (docs/measurements/
serve-trace-cpu/session9-mtp-c1-c8), and a rule priced by the probe alone drafted on 35% of passes
at 0.90x NTP's tokens/s; priced by the learned curve (2 tokens: 1.61x), on 2.2% at 1.00x
(serve-trace-cpu/session10-fixed-vs-learned-c1).

How the learned curve is built (`LearnedPassCost.refresh`, every REFRESH_EVERY passes):
- each pass gives a ratio, its seconds over the probe's price for its tokens fed, kept per size
  (exact sizes up to EXACT_SIZES tokens, then 4 sizes per doubling) over the last LEARN_WINDOW passes;
- a size with TRUST_PASSES passes or more has for correction the median of its ratios (one slow
  pass in three is ignored); a size with LEARN_MIN to TRUST_PASSES passes blends its median, in
  proportion to its passes, with the correction those well-measured sizes give at its size (or,
  while there are none, with their medians' mean weighted by passes): a size seen a few times moves
  only part of the way from the probe's shape;
- every other size takes the correction of the sizes around it: linear between them; below the
  smallest, the lesser of its correction and 1 (the probe's price), beyond the largest the greater.
  Where the evidence ends the curve leans towards NTP: a loop that only ever ran 8-token passes and
  found them 30% dearer than probed must not assume the same of NTP's 1-token pass (it would keep
  masks that do not pay); priced at the probe, NTP gets run, and then learned;
- the curve is the probe's price times the correction at the probe's sizes and at every learned
  size, made monotone as the probe's is (`monotone_from_above`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import torch

from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.errors import SelfMTPError

PROBE_TOKENS = (1, 2, 4, 8, 16)  # tokens fed per row in the start-up probe
PROBE_ROWS = (1, 2, 4, 8)  # batch widths in the start-up probe
PROBE_PREFIX = 48  # cached tokens per row before the timed passes (attention is part of the cost)
PROBE_SECONDS = 1.0  # the probe goes on for at least this long (more rounds where passes are quick)
MAX_PROBE_ROUNDS = 200
LEARN_WINDOW = 32  # a size's correction is the median of its last this many passes (follows a change of load)
LEARN_MIN = 3  # passes of a size before they count (the median of 3 ignores one slow pass)
TRUST_PASSES = 16  # passes of a size from which its own median alone sets its correction
REFRESH_EVERY = 8  # passes between rebuilds of the curve (a rebuild costs tens of microseconds)
EXACT_SIZES = 32  # sizes up to this many tokens fed are learned one by one; larger ones 4 per doubling


@dataclass
class PassCost:
    """Seconds one forward pass takes by the total tokens it feeds, piecewise linear between points."""

    points: list[tuple[int, float]]  # (tokens fed, seconds), ascending in tokens
    # A fixed curve never changes and learns nothing: the readers of a `LearnedPassCost` read these
    # alike, so a decoder priced by either needs no branch (`version` counts rebuilds; no `clock`:
    # the decoder need not time its passes).
    version: ClassVar[int] = 0
    clock: ClassVar = None

    def observe(self, tokens: int, seconds: float) -> None:
        """What a pass took changes nothing here (a `LearnedPassCost` learns from it)."""

    def report(self) -> dict:
        """The curve the rule reads, for /health."""
        return {"fixed": self.describe()}

    def __call__(self, tokens: int) -> float:
        (x0, y0), last = self.points[0], len(self.points) - 1
        if tokens <= x0:
            return y0
        i = bisect.bisect_left(self.points, (tokens,))  # the first point at or beyond `tokens`
        if i > last:  # beyond the probe: the last slope
            if last == 0:
                return y0 * tokens / x0
            (xa, ya), (xb, yb) = self.points[-2], self.points[-1]
            return yb + max(0.0, (yb - ya) / (xb - xa)) * (tokens - xb)
        (xa, ya), (xb, yb) = self.points[i - 1], self.points[i]
        return ya + (yb - ya) * (tokens - xa) / (xb - xa)

    def describe(self) -> str:
        """'1: 59.0 ms, 2: 99.4 ms, ...' (what `selfmtp serve` logs at start-up; `parse` reads it back)."""
        return ", ".join(f"{tokens}: {seconds * 1000:.1f} ms" for tokens, seconds in self.points)

    @classmethod
    def parse(cls, text: str) -> PassCost:
        """A curve from `describe`'s text (with or without the log line's "pass cost by tokens fed: ")."""
        points = re.findall(r"(\d+): ([0-9.]+) ms", text)
        if not points:
            raise SelfMTPError(f"no pass cost in {text!r}: expected '1: 59.0 ms, 2: 99.4 ms, ...'")
        return cls(sorted((int(tokens), float(ms) / 1000) for tokens, ms in points))

    @classmethod
    def measure(cls, model, *, max_rows: int = 8, rounds: int = 5, min_seconds: float = PROBE_SECONDS,
                seed: int = 0) -> PassCost:  # fmt: skip
        """Time cached passes of the loaded model for a few batch widths and tokens per row.

        Every size is timed once per round, at least `rounds` rounds and more until `min_seconds`
        of the clock have passed (up to MAX_PROBE_ROUNDS), and keeps its median time. On a CPU the
        clock counts CPU seconds (`pass_clock`): a pass that other processes preempt is not charged
        for their time, so a busy machine gives the same curve as a quiet one, only later (wall-clock
        minima were off by up to 4x on a machine shared with training jobs, and the rule then
        refused the demo student's masks). On a GPU it is wall time after a synchronize.
        """
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        clock = pass_clock(model.device)
        samples: dict[tuple[int, int], list[float]] = {}
        with torch.inference_mode():
            caches = {}
            for rows in [r for r in PROBE_ROWS if r <= max(1, max_rows)]:
                caches[rows] = preallocated_cache(model)
                prefix = torch.randint(0, vocab, (rows, PROBE_PREFIX), generator=generator).to(model.device)
                model(input_ids=prefix, past_key_values=caches[rows], use_cache=True, logits_to_keep=1)
            start_all = clock()
            for done in itertools.count():
                if done >= MAX_PROBE_ROUNDS or (done >= rounds and clock() - start_all >= min_seconds):
                    break
                for (rows, cache), fed in itertools.product(caches.items(), PROBE_TOKENS):
                    ids = torch.randint(0, vocab, (rows, fed), generator=generator).to(model.device)
                    start = clock()
                    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=fed)
                    seconds = clock() - start
                    cache.crop(-fed)
                    samples.setdefault((rows, fed), []).append(seconds)
        by_tokens: dict[int, list[float]] = {}
        for (rows, fed), seconds in samples.items():
            by_tokens.setdefault(rows * fed, []).append(statistics.median(seconds))
        return cls(monotone_from_above(sorted((tokens, sum(s) / len(s)) for tokens, s in by_tokens.items())))


def monotone_from_above(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Feeding more never costs less, and timing noise only ever adds time: so a size costs at most
    what any larger size was measured at (a slow outlier is pulled down, never pushed up the curve)."""
    smoothed, least = [], math.inf
    for tokens, seconds in reversed(points):
        least = min(least, seconds)
        smoothed.append((tokens, least))
    return smoothed[::-1]


def pass_clock(device):
    """The clock that prices passes (probe and served passes alike).

    On a CPU, CPU seconds, so that a pass that other processes preempt is not charged for their time:
    the calling thread's when torch computes in that thread alone (one intra-op thread), because the
    server's HTTP thread shares the process and `time.process_time` would charge its work to the
    pass; the whole process's when torch's worker threads share the pass's work. On a GPU, wall
    seconds (after a synchronize on CUDA).
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return time.thread_time if torch.get_num_threads() == 1 else time.process_time

    def wall() -> float:
        if kind == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return wall


def size_bucket(tokens: int) -> int:
    """The size a pass of `tokens` tokens fed is learned at: itself up to EXACT_SIZES, else 4 sizes per doubling."""
    if tokens <= EXACT_SIZES:
        return max(1, tokens)
    return round(2 ** (round(4 * math.log2(tokens)) / 4))


class Correction:
    """Learned price / probe's price by size: linear between the learned sizes; below the smallest
    at most 1, beyond the largest at least 1 (module docstring: where evidence ends, lean to NTP)."""

    def __init__(self, points: list[tuple[int, float]]):
        self.between = PassCost(points)
        (self.first, self.below), (self.last, self.beyond) = points[0], points[-1]
        self.below, self.beyond = min(1.0, self.below), max(1.0, self.beyond)

    def __call__(self, tokens: int) -> float:
        if tokens < self.first:
            return self.below
        return self.beyond if tokens > self.last else self.between(tokens)


class LearnedPassCost:
    """The probe's curve corrected by the engine's own timed passes (module docstring); reads as a `PassCost`.

    `observe(tokens, seconds)` after every pass; `clock` is what the decode loop times passes with
    (the probe's clock, `pass_clock`; None: the loop does not time them, observations come from
    elsewhere). `version` counts rebuilds, so a reader can cache prices."""

    def __init__(self, probe: PassCost, clock=None):
        self.probe = probe
        self.clock = clock
        self.curve = probe  # what __call__ reads: rebuilt by `refresh`
        self.version = 0
        self.passes = 0
        self.ratios: dict[int, deque[float]] = {}  # size -> seconds / probe price of its last passes
        self.counts: dict[int, int] = {}  # size -> passes observed in all
        self._corrections: dict[int, tuple[float, int]] = {}  # size -> (median ratio, passes in window)
        self._changed: set[int] = set()

    def __call__(self, tokens: int) -> float:
        return self.curve(tokens)

    @property
    def points(self) -> list[tuple[int, float]]:
        return self.curve.points

    def describe(self) -> str:
        return self.curve.describe()

    def report(self) -> dict:
        """The curve the rule reads now against the probe's, for /health."""
        return {"probe": self.probe.describe(), "learned": self.describe(), "passes_timed": self.passes}

    def observe(self, tokens: int, seconds: float) -> None:
        """One pass fed `tokens` tokens (all rows, pads included) and took `seconds` by `clock`."""
        size = size_bucket(tokens)
        if size not in self.ratios:
            self.ratios[size] = deque(maxlen=LEARN_WINDOW)
        self.ratios[size].append(seconds / self.probe(tokens))
        self.counts[size] = self.counts.get(size, 0) + 1
        self._changed.add(size)
        self.passes += 1
        if self.passes % REFRESH_EVERY == 0:
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the curve from the ratios observed so far."""
        for size in self._changed:
            ratios = self.ratios[size]
            if len(ratios) >= LEARN_MIN:
                self._corrections[size] = (statistics.median(ratios), len(ratios))
        self._changed.clear()
        if not self._corrections:
            return
        trusted = [(size, ratio) for size, (ratio, n) in sorted(self._corrections.items()) if n >= TRUST_PASSES]
        if trusted:
            prior = Correction(trusted)
        else:
            weight = sum(n for _, n in self._corrections.values())
            shared = sum(ratio * n for ratio, n in self._corrections.values()) / weight
            prior = lambda _: shared  # noqa: E731
        learned = []
        for size, (ratio, n) in sorted(self._corrections.items()):
            trust = min(1.0, n / TRUST_PASSES)
            learned.append((size, trust * ratio + (1 - trust) * prior(size)))
        correction = Correction(learned)
        sizes = sorted({tokens for tokens, _ in self.probe.points} | {size for size, _ in learned})
        self.curve = PassCost(monotone_from_above([(t, self.probe(t) * correction(t)) for t in sizes]))
        self.version += 1

    def table(self) -> list[dict]:
        """Per size of the learned curve: the probe's and the learned price, and the passes observed there."""
        return [
            {"tokens": tokens, "probe_ms": 1000 * self.probe(tokens), "learned_ms": 1000 * seconds,
             "passes": self.counts.get(tokens, 0)}
            for tokens, seconds in self.curve.points
        ]  # fmt: skip
