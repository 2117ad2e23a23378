"""One prompt's state while it decodes: its budget, accepted tokens, stop rules and result.

`new_row` checks a prompt against the budget and the model's context; `accept_proposals` keeps
the tokens a strategy accepts from one pass (`take_tokens` applies the budget and every stop rule:
stop token ids, stop strings); `row_result` turns the finished row into a `GenerationResult`.
`mask_token_id` and `context_length` are the model facts a row needs. Lossy rows use
`accept_proposals`; exact rows (decoding/verify.py) decide their own tokens and call `take_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfmtp.decoding.results import Chunk, GenerationResult
from selfmtp.decoding.strategies import Strategy, next_proposals
from selfmtp.errors import SelfMTPError
from selfmtp.models.mtp_token import mtp_token_id


@dataclass
class Row:
    """Book-keeping for one prompt while it decodes."""

    prompt_tokens: int
    budget: int  # most tokens this row may emit (max_new_tokens, or what the context leaves)
    budget_reason: str
    pending: list[int]  # accepted but not yet in the cache (the prompt before the first pass)
    k: int  # tokens the next pass proposes for this row (k - 1 masks)
    token_ids: list[int] = field(default_factory=list)
    chunks: list[tuple[list[int], list[float]]] = field(default_factory=list)
    passes: int = 0
    stop_reason: str | None = None
    text: str | None = None  # set when a stop string cut the text
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    tokens_fed: list[int] = field(default_factory=list)


def mask_token_id(model, n_masks: int) -> int | None:
    token_id = mtp_token_id(model)
    if n_masks and token_id is None:
        raise SelfMTPError(
            "this model has no <mtp> token: multi-token strategies need a converted model (or use ntp)"
        )
    return token_id


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def new_row(prompt: list[int], max_new_tokens: int, context: int | None, k: int) -> Row:
    if not prompt:
        raise SelfMTPError("empty prompt: give some text to continue")
    budget, reason = max_new_tokens, "max_new_tokens"
    if context is not None:
        if len(prompt) >= context:
            raise SelfMTPError(f"prompt has {len(prompt)} tokens but the model's context is {context} tokens")
        if context - len(prompt) < budget:
            budget, reason = context - len(prompt), "context"
    return Row(prompt_tokens=len(prompt), budget=budget, budget_reason=reason, pending=list(prompt), k=k)


@dataclass(frozen=True)
class StopRules:
    token_ids: frozenset[int]
    strings: list[str]
    tokenizer: object


def accept_proposals(
    row: Row, strategy: Strategy, proposals: torch.Tensor, confidences: torch.Tensor, stops: StopRules
):
    """Append the tokens `strategy` accepts from one pass to `row`, applying the budget and every stop rule."""
    row.passes += 1
    proposed = row.k
    proposals, confidences = proposals[:proposed], confidences[:proposed]
    wanted = strategy.accept(confidences)
    if not 1 <= wanted <= proposed:  # 0 would stall the loop forever
        raise ValueError(f"{strategy.name}: accept() returned {wanted}, expected 1..{proposed}")
    row.k = next_proposals(strategy, proposed, wanted)
    take_tokens(row, proposals.tolist()[:wanted], confidences.tolist()[:wanted], stops)


def take_tokens(row: Row, tokens: list[int], confidences: list[float], stops: StopRules) -> None:
    """Append one pass's accepted tokens to `row`, cut by the budget and every stop rule; set `pending`."""
    wanted = min(len(tokens), row.budget - len(row.token_ids))
    tokens, confidences = tokens[:wanted], confidences[:wanted]
    for i, token in enumerate(tokens):
        if token in stops.token_ids:  # keep the stop token itself, drop what follows
            tokens, confidences = tokens[: i + 1], confidences[: i + 1]
            row.stop_reason = "eos"
            break
    row.token_ids.extend(tokens)
    row.chunks.append((tokens, confidences))
    row.pending = tokens
    if stops.strings:
        _cut_at_stop_string(row, len(tokens), stops.strings, stops.tokenizer)
    if row.stop_reason is None and len(row.token_ids) >= row.budget:
        row.stop_reason = row.budget_reason


def _cut_at_stop_string(row: Row, new_tokens: int, stop_strings, tokenizer) -> None:
    """If the text now holds a stop string: keep the tokens up to the one completing it, cut the text before it."""
    if _first_stop(tokenizer.decode(row.token_ids, skip_special_tokens=True), stop_strings) is None:
        return
    before = len(row.token_ids) - new_tokens  # no stop string in those, or we would have stopped
    for end in range(before + 1, len(row.token_ids) + 1):
        text = tokenizer.decode(row.token_ids[:end], skip_special_tokens=True)
        cut = _first_stop(text, stop_strings)
        if cut is not None:
            break
    dropped = len(row.token_ids) - end
    del row.token_ids[end:]
    tokens, confidences = row.chunks[-1]
    row.chunks[-1] = (tokens[: len(tokens) - dropped], confidences[: len(tokens) - dropped])
    row.text, row.stop_reason = text[:cut], "stop_string"


def _first_stop(text: str, stop_strings) -> int | None:
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found) if found else None


def row_result(row: Row, tokenizer, strategy_name: str) -> GenerationResult:
    def decode(ids, **kwargs) -> str:
        return tokenizer.decode(ids, **kwargs) if tokenizer is not None else ""

    text = row.text if row.text is not None else decode(row.token_ids, skip_special_tokens=True)
    chunks = [Chunk(list(ids), decode(ids), [round(c, 6) for c in confs]) for ids, confs in row.chunks]
    n = len(row.token_ids)
    return GenerationResult(
        text=text,
        token_ids=list(row.token_ids),
        num_tokens=n,
        forward_passes=row.passes,
        acceleration=n / row.passes if row.passes else 0.0,
        chunks=chunks,
        seconds=row.seconds,
        tokens_per_second=n / row.seconds if row.seconds > 0 else 0.0,
        stop_reason=row.stop_reason or row.budget_reason,
        prompt_tokens=row.prompt_tokens,
        strategy=strategy_name,
        first_token_seconds=row.first_token_seconds,
        tokens_fed=list(row.tokens_fed),
    )
