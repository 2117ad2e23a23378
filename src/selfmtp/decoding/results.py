"""What a generation returns (`GenerationResult`, its `Chunk`s, one per forward pass) and how
generations add up (`summarize`: the paper's tokens per pass pooled, and per-generation means)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class Chunk:
    """The tokens one forward pass contributed, with their confidences."""

    token_ids: list[int]
    text: str
    confidences: list[float]
    drafted: int = 0  # exact decoding: how many leading tokens were accepted drafts (the rest: the pass's own)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    num_tokens: int
    forward_passes: int
    acceleration: float  # num_tokens / forward_passes
    chunks: list[Chunk]
    seconds: float  # from the start of the (batched) call until this row finished
    tokens_per_second: float
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "context"
    prompt_tokens: int
    strategy: str
    first_token_seconds: float = 0.0  # from the start of the call until the first pass's tokens
    tokens_fed: list[int] = field(default_factory=list)  # per pass: real tokens + masks fed for this row
    draft_offered: list[int] = field(default_factory=list)  # exact decoding: drafts fed, by draft position
    draft_accepted: list[int] = field(default_factory=list)  # ... and how many of those were accepted
    lookup_offered: int = 0  # exact decoding with lookup: drafts copied from earlier text (among the above)
    lookup_accepted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: list[GenerationResult]) -> dict:
    """Aggregates over generations: acceleration and tokens/s as mean and std, plus totals.

    Two accelerations: `acceleration_mean` is the mean of per-generation tokens/passes ratios;
    `tokens_per_pass_pooled` is all tokens / all passes, the paper's "effective k" (compare with that).
    """

    def mean_std(values: list[float]) -> tuple[float, float]:
        if not values:
            return 0.0, 0.0
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    accel_mean, accel_std = mean_std([r.acceleration for r in results])
    tps_mean, tps_std = mean_std([r.tokens_per_second for r in results])
    total_tokens = sum(r.num_tokens for r in results)
    total_passes = sum(r.forward_passes for r in results)
    return {
        "generations": len(results),
        "acceleration_mean": accel_mean,
        "acceleration_std": accel_std,
        "tokens_per_second_mean": tps_mean,
        "tokens_per_second_std": tps_std,
        "total_tokens": total_tokens,
        "total_forward_passes": total_passes,
        "tokens_per_pass_pooled": total_tokens / total_passes if total_passes else 0.0,
        "tokens_fed_per_pass": sum(sum(r.tokens_fed) for r in results) / total_passes if total_passes else 0.0,
        **_draft_acceptance(results),
        "total_seconds": sum(r.seconds for r in results),
    }


def _draft_acceptance(results: list[GenerationResult]) -> dict:
    """Exact decoding only: accepted / offered drafts by draft position, pooled over generations."""
    width = max((len(r.draft_offered) for r in results), default=0)
    if not width:
        return {}
    offered, accepted = [0] * width, [0] * width
    for r in results:
        for j, (o, a) in enumerate(zip(r.draft_offered, r.draft_accepted, strict=True)):
            offered[j] += o
            accepted[j] += a
    lookup_offered = sum(r.lookup_offered for r in results)
    return {
        "draft_offered": offered,
        "draft_accepted": accepted,
        "draft_acceptance": [a / o if o else 0.0 for a, o in zip(accepted, offered, strict=True)],
        **({"lookup_offered": lookup_offered, "lookup_accepted": sum(r.lookup_accepted for r in results)}
           if lookup_offered else {}),  # fmt: skip
    }
