"""Decoding strategies: how many of a pass's proposed tokens to keep.

Each forward pass proposes `k_max` tokens (the exact next-token prediction from the last real token,
then one per `<mtp>` mask) with their max-softmax confidences. A strategy looks only at those
confidences and answers one question: how many leading tokens to accept (1 <= n <= k_max).

A strategy may also say how many tokens the next pass should propose (`next_k`, see
`next_proposals`): feeding fewer masks makes a pass cheaper where compute is not free (a CPU).
Without it every pass proposes k_max. The decode loop asks nothing else, so a new strategy never
touches the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from selfmtp.errors import SelfMTPError
from selfmtp.models.mtp_token import K_MAX_CONFIG_KEY

STRATEGY_HELP = (
    "ntp, static:K, confadapt:TAU[:KMAX[:adaptive]] (e.g. confadapt:0.9:16), or the exact "
    "verify[:K][:tree][:lookup] (output identical to greedy ntp; K defaults to the model's trained k_max; "
    "lookup adds drafts copied from earlier text)"
)
DEFAULT_VERIFY_K = 8  # proposals per pass for `verify` when the model does not record its trained k_max


@runtime_checkable
class Strategy(Protocol):
    k_max: int  # tokens proposed per pass (k_max - 1 masks are fed)
    name: str

    def accept(self, confidences: torch.Tensor) -> int:
        """Number of leading proposed tokens to keep, 1 <= n <= k_max."""
        ...


@dataclass(frozen=True)
class NTP:
    """Plain next-token prediction: no masks, one token per pass."""

    k_max: int = field(default=1, init=False)
    name: str = field(default="ntp", init=False)

    def accept(self, confidences: torch.Tensor) -> int:
        return 1


@dataclass(frozen=True)
class Static:
    """Always keep all k proposed tokens (k=1 is plain greedy NTP)."""

    k: int

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise SelfMTPError(f"static k must be an integer >= 1, got {self.k!r}")

    @property
    def k_max(self) -> int:
        return self.k

    @property
    def name(self) -> str:
        return f"static:{self.k}"

    def accept(self, confidences: torch.Tensor) -> int:
        return self.k


@dataclass(frozen=True)
class ConfAdapt:
    """Keep the longest leading run whose confidences are all >= tau; always at least one token.

    A low first confidence ends the run at once; its token is still kept, since position 1 is the
    exact next-token prediction (never worse than plain NTP).
    """

    tau: float
    k_max: int = 16

    def __post_init__(self):
        if not (0.0 < self.tau <= 1.0):
            raise SelfMTPError(f"confadapt tau must be in (0, 1], got {self.tau}")
        if not isinstance(self.k_max, int) or self.k_max < 1:
            raise SelfMTPError(f"confadapt k_max must be an integer >= 1, got {self.k_max!r}")

    @property
    def name(self) -> str:
        return f"confadapt:{self.tau:g}:{self.k_max}"

    def accept(self, confidences: torch.Tensor) -> int:
        run = 0
        for confidence in confidences.tolist()[: self.k_max]:  # one transfer, then plain floats
            if confidence < self.tau:
                break
            run += 1
        return max(run, 1)


@dataclass(frozen=True)
class AdaptiveConfAdapt(ConfAdapt):
    """ConfAdapt that proposes only as many tokens as recent passes earned (at most k_max).

    After a pass that proposed k tokens and kept n: if all k were kept the next pass proposes 2k
    (capped at k_max), else n, as many as the confident run just seen. So where confidence is low
    passes alternate between one token without masks (the cheapest pass there is) and one mask.
    The first pass proposes k_max. With tau so small that every token is kept, it is static k_max.
    """

    @property
    def name(self) -> str:
        return f"confadapt:{self.tau:g}:{self.k_max}:adaptive"

    def next_k(self, proposed: int, accepted: int) -> int:
        if accepted >= proposed:
            return min(self.k_max, 2 * proposed)
        return accepted


@dataclass(frozen=True)
class Verify:
    """Exact self-speculative decoding: drafts from the `<mtp>` masks, checked by the same pass's greedy choice.

    A pass feeds the last accepted token, the drafts d_1..d_m as real tokens and K-1 masks; it keeps
    the longest run of drafts equal to the model's own greedy token at the previous position, plus
    the model's own next token (so the output is greedy NTP, token for token). Merged (Stern et al.
    2018): the masks after d_m give the next drafts, used only when every draft was accepted.
    `tree` (BiTA): a block of K-1 masks after the last token and after every draft, each seeing its
    own prefix only, so the block after the last accepted draft always gives the next drafts.
    `lookup`: when the masks give no confident drafts, copy the continuation of the latest earlier
    occurrence of the last few tokens (prompt lookup) and verify those the same way.
    `k=None` takes the model's trained k_max (`with_model_defaults`). The row logic is decoding/verify.py.
    """

    k: int | None = None
    tree: bool = False
    lookup: bool = False

    def __post_init__(self):
        if self.k is not None and (not isinstance(self.k, int) or self.k < 2):
            raise SelfMTPError(f"verify K must be an integer >= 2 (one token plus at least one draft), got {self.k!r}")

    @property
    def k_max(self) -> int:
        return self.k if self.k is not None else DEFAULT_VERIFY_K

    @property
    def name(self) -> str:
        k = "" if self.k is None else f":{self.k}"
        return f"verify{k}{':tree' if self.tree else ''}{':lookup' if self.lookup else ''}"

    @staticmethod
    def accepted_drafts(drafts: list[int], greedy: list[int]) -> int:
        """Length of the leading run of drafts equal to greedy (greedy[i] = the model's token where d_i goes)."""
        run = 0
        for draft, own in zip(drafts, greedy, strict=False):  # greedy has one more (the bonus)
            if draft != own:
                break
            run += 1
        return run


def with_model_defaults(strategy: Strategy, model) -> Strategy:
    """`verify` without K -> verify:K with the model's trained k_max (DEFAULT_VERIFY_K if not recorded)."""
    if isinstance(strategy, Verify) and strategy.k is None:
        trained = trained_k_max(model)
        k = trained if trained is not None and trained >= 2 else DEFAULT_VERIFY_K
        return Verify(k, strategy.tree, strategy.lookup)
    return strategy


def trained_k_max(model) -> int | None:
    """The k_max the model was trained with, if its config records it."""
    trained = getattr(model.config, K_MAX_CONFIG_KEY, None)
    return trained if isinstance(trained, int) and trained >= 1 else None


def capped(strategy: Strategy, max_k: int) -> Strategy:
    """`strategy` proposing at most `max_k` tokens per pass (a server's bound on one row's work).

    static:K and confadapt's KMAX become min(K, max_k); verify's K too (its output does not depend on
    K); NTP is unchanged. `verify` without K must have its model default first (`with_model_defaults`).
    """
    if max_k < 2:
        raise SelfMTPError(f"the proposal cap must be >= 2, got {max_k}")
    if strategy.k_max <= max_k:
        return strategy
    if isinstance(strategy, Static):
        return Static(max_k)
    if isinstance(strategy, ConfAdapt):  # AdaptiveConfAdapt too
        return type(strategy)(strategy.tau, max_k)
    if isinstance(strategy, Verify):
        return Verify(max_k, strategy.tree, strategy.lookup)
    raise SelfMTPError(f"{strategy.name}: proposes {strategy.k_max} tokens per pass, more than the cap {max_k}")


def next_proposals(strategy: Strategy, proposed: int, accepted: int) -> int:
    """Tokens the next pass proposes (1..k_max) after one that proposed `proposed` and kept `accepted`."""
    next_k = getattr(strategy, "next_k", None)  # optional: strategies without it always propose k_max
    if next_k is None:
        return strategy.k_max
    k = next_k(proposed, accepted)
    if not 1 <= k <= strategy.k_max:  # 0 would feed a pass with nothing to propose
        raise ValueError(f"{strategy.name}: next_k() returned {k}, expected 1..{strategy.k_max}")
    return k


def parse_strategy(text: str) -> Strategy:
    """'ntp' | 'static:K' | 'confadapt:TAU[:KMAX[:adaptive]]' | 'verify[:K][:tree][:lookup]' -> a strategy.

    SelfMTPError for anything else."""
    parts = (text or "").strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    if kind == "ntp" and not args:
        return NTP()
    if kind == "static" and len(args) == 1:
        return Static(_parse_int(args[0], "static k", text))
    if kind == "confadapt" and len(args) in (1, 2):
        tau = _parse_float(args[0], "confadapt tau", text)
        k_max = _parse_int(args[1], "confadapt k_max", text) if len(args) == 2 else 16
        return ConfAdapt(tau, k_max)
    if kind == "confadapt" and len(args) == 3 and args[2] == "adaptive":
        tau = _parse_float(args[0], "confadapt tau", text)
        return AdaptiveConfAdapt(tau, _parse_int(args[1], "confadapt k_max", text))
    if kind == "verify":
        lookup = bool(args) and args[-1] == "lookup"
        args = args[:-1] if lookup else args
        tree = bool(args) and args[-1] == "tree"
        k_args = args[:-1] if tree else args
        if len(k_args) <= 1:
            return Verify(_parse_int(k_args[0], "verify K", text) if k_args else None, tree, lookup)
    raise SelfMTPError(f"unknown strategy {text!r}: use {STRATEGY_HELP}")


AUTO = "auto"
AUTO_HELP = (
    "auto[:TAU[:KMAX]] (ConfAdapt whose mask count follows the load; default auto:0.9:16) or "
    "auto:verify[:K][:lookup] (exact: the drafts fed follow the load)"
)


def resolve_strategy(text: str) -> tuple[Strategy, bool]:
    """A strategy name -> (strategy, load_aware); the load-aware names are `AUTO_HELP`'s, the rest `parse_strategy`'s.

    'auto[:TAU[:KMAX]]' is ConfAdapt and 'auto:verify[:K][:lookup]' exact decoding, each with a
    load-aware cap on its proposals (decoding/load_aware.py)."""
    parts = (text or "").strip().lower().split(":")
    if parts[0] != AUTO:
        return parse_strategy(text), False
    if len(parts) > 1 and parts[1] == "verify":
        if "tree" in parts:
            raise SelfMTPError(f"{text!r}: the load-aware exact mode sizes merged drafts only; drop ':tree'")
        return parse_strategy(":".join(parts[1:])), True
    if len(parts) > 3:
        raise SelfMTPError(f"unknown strategy {text!r}: use {AUTO_HELP}")
    inner = parse_strategy(":".join(["confadapt", parts[1] if len(parts) > 1 else "0.9", *parts[2:]]))
    return ConfAdapt(inner.tau, inner.k_max), True


def _parse_int(value: str, what: str, text: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SelfMTPError(f"{what} in strategy {text!r} must be an integer, got {value!r}") from None


def _parse_float(value: str, what: str, text: str) -> float:
    try:
        return float(value)  # the range (and NaN) is checked by ConfAdapt itself
    except ValueError:
        raise SelfMTPError(f"{what} in strategy {text!r} must be a number, got {value!r}") from None
