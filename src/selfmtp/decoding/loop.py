"""KV-cached multi-token decoding (METHOD.md, "Inference"), several prompts at once.

One pass feeds, per row, the tokens accepted last step (the whole prompt on the first pass) plus
k-1 `<mtp>` masks. The logits at the last real token and at each mask propose k tokens, read out
greedily with their max-softmax confidences; the strategy says how many leading ones to keep.
The masks' KV entries are then cropped off, so the cache only ever holds real tokens and plain
causal attention is right for every pass. k is k_max unless the strategy adapts it from pass to
pass (`strategies.next_proposals`); each result records the tokens every pass fed (`tokens_fed`).

Batching: rows are left padded and each row's new tokens are right aligned, so the masks of every
row sit at the end (one crop serves all rows) and the proposals are the last k logits of every
row. With adaptive k a pass feeds the largest k any row asks for; a row reads only its own first k
proposals, so it decodes exactly as it would alone. Pads stay in the cache and are masked out by an explicit 4-D attention mask; position ids are
counted per row over real tokens only, so each row sees exactly what it would see alone.

The loop itself is `batch.BatchDecoder` (rows may also join mid-decode, as a server needs);
`generate_batch` adds every prompt and steps until all are done. Exact decoding (`verify`) is a row
kind of the same loop: its rows also feed drafts as real tokens (decoding/verify.py, `pass_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from selfmtp.decoding.kv_cache import has_plain_cache, preallocated_cache
from selfmtp.decoding.results import Chunk, GenerationResult
from selfmtp.decoding.strategies import Strategy, next_proposals, with_model_defaults
from selfmtp.errors import SelfMTPError
from selfmtp.models.mtp_token import mtp_token_id


@dataclass
class _Row:
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


def generate_batch(
    model,
    prompts: list[list[int]],
    strategy: Strategy,
    *,
    max_new_tokens: int,
    stop_token_ids=(),
    stop_strings=(),
    tokenizer=None,
    pad_token_id: int = 0,
    load_aware=None,
) -> list[GenerationResult]:
    """Decode all `prompts` (token id lists) together; results are in prompt order.

    `load_aware` (a `load_aware.LoadAware`): cap each pass's proposals by its rule (`auto` strategies);
    its acceptance stats carry over from call to call.
    """
    from selfmtp.decoding.batch import BatchDecoder  # the loop body; it builds on this module's helpers

    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    if max_new_tokens < 1:
        raise SelfMTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    strategy = with_model_defaults(strategy, model)
    n_masks = strategy.k_max - 1
    _mask_token_id(model, n_masks)
    _croppable_cache(model, n_masks, batched=len(prompts) > 1)  # refuse before any work
    decoder = BatchDecoder(
        model, tokenizer=tokenizer, pad_token_id=pad_token_id,
        cache_factory=lambda: _croppable_cache(model, n_masks, batched=len(prompts) > 1), load_aware=load_aware,
    )  # fmt: skip
    rows = [
        decoder.add(prompt, strategy, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                    stop_strings=stop_strings, load_aware=load_aware is not None)  # fmt: skip
        for prompt in prompts
    ]
    while decoder.active:
        decoder.step()
    return [row.result(tokenizer) for row in rows]


# ---------------------------------------------------------------------------------------------
# Pure tensor helpers


@dataclass(frozen=True)
class Plan:
    """What one row feeds in one pass: real tokens (pending, then `drafts` drafts), then `blocks` mask blocks.

    Every row but an exact one feeds its pending tokens and one block of k-1 masks. `tree`: a block
    after the last pending token and after every draft (decoding/verify.py), else one after the last.
    """

    real: list[int]
    drafts: int
    blocks: int
    n_masks: int
    tree: bool = False

    @property
    def masks(self) -> int:
        return self.blocks * self.n_masks


def pass_layout(plans: list[Plan], real_count: torch.Tensor, pad_id: int, mask_id: int | None):
    """Fed tokens of every row -> input_ids (cpu), position_ids, fed (True = not a pad), within.

    Row i: [pads][real tokens ending at the common column real_width][its mask blocks][fillers up to
    the widest row's masks] (fillers are pads). Position ids continue each row's count of real
    tokens; block b follows real token number b of the checked ones (tree) or the last one and
    continues its position. `within` (batch, width, width) is causal, except that a tree row's
    block sees only its own prefix and itself; None when no row is a tree (plain causal).
    """
    real_width = max(len(p.real) for p in plans)
    width = real_width + max(p.masks for p in plans)
    device = real_count.device
    input_ids = torch.full((len(plans), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(plans), width, dtype=torch.long)
    fed = torch.zeros(len(plans), width, dtype=torch.bool)
    tree = any(p.tree and p.blocks for p in plans)
    within = torch.ones(len(plans), width, width, dtype=torch.bool).tril() if tree else None
    counts = real_count.tolist()
    for i, plan in enumerate(plans):
        first = real_width - len(plan.real)
        input_ids[i, first:real_width] = torch.tensor(plan.real)
        position_ids[i, first:real_width] = torch.arange(counts[i], counts[i] + len(plan.real))
        fed[i, first : real_width + plan.masks] = True
        input_ids[i, real_width : real_width + plan.masks] = mask_id if plan.masks else pad_id
        for b in range(plan.blocks):
            after = real_width - 1 - (plan.drafts - b if plan.tree else 0)  # column of the token the block follows
            start = real_width + b * plan.n_masks
            block = slice(start, start + plan.n_masks)
            position_ids[i, block] = torch.arange(1, plan.n_masks + 1) + counts[i] + after - first
            if plan.tree:
                within[i, block, after + 1 : start] = False  # not the later drafts, not the other blocks
    return input_ids, position_ids.to(device), fed.to(device), within.to(device) if tree else None


def attention_mask(
    key_is_real: torch.Tensor, fed: torch.Tensor, within: torch.Tensor | None = None
) -> torch.Tensor | None:
    """4-D bool mask (batch, 1, fed, cache+fed), True = may attend; None for plain causal without pads.

    Every query sees the real cache columns (pads and holes hidden); among the fed columns it sees
    those `within` (batch, fed, fed) allows, causal when None (a draft tree gives each mask block its
    own prefix only), and never a pad. Every query attends to itself, so a pad's (masked, never read)
    KV stay finite: a NaN there would poison every row that multiplies it by 0.
    """
    if within is None and bool(fed.all()) and bool(key_is_real.all()):
        return None  # no pads anywhere: let the model build its own causal mask
    batch, width = fed.shape
    itself = torch.eye(width, dtype=torch.bool, device=fed.device)
    if within is None:
        within = torch.ones(width, width, dtype=torch.bool, device=fed.device).tril()
    new_keys = (within & fed[:, None, :]) | itself
    past_keys = key_is_real[:, None, :].expand(batch, width, key_is_real.shape[1])
    return torch.cat([past_keys, new_keys.expand(batch, width, width)], dim=2)[:, None]


def greedy_readout(logits: torch.Tensor, mask_id: int | None):
    """(batch, k, vocab) logits -> (confidences, proposals), both (batch, k) on the cpu.

    `<mtp>` is never proposed: fed back as a real token it would only derail an untrained model.
    """
    logits = logits.float()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    confidences, proposals = torch.softmax(logits, dim=-1).max(dim=-1)
    return confidences.cpu(), proposals.cpu()


# ---------------------------------------------------------------------------------------------
# Model checks


def _mask_token_id(model, n_masks: int) -> int | None:
    token_id = mtp_token_id(model)
    if n_masks and token_id is None:
        raise SelfMTPError(
            "this model has no <mtp> token: multi-token strategies need a converted model (or use ntp)"
        )
    return token_id


def _croppable_cache(model, n_masks: int, *, batched: bool) -> DynamicCache:
    """A cache that can drop the masks' entries; refuse models where that is not so.

    Batches need our own 4-D mask, which would override a sliding window, so they need a plain cache too.
    """
    if has_plain_cache(model):
        return preallocated_cache(model)
    cache = DynamicCache(config=model.config)
    kinds = ", ".join(sorted({type(layer).__name__ for layer in cache.layers} - {"DynamicLayer"}))
    if n_masks:
        raise SelfMTPError(
            f"{model.config.model_type} models keep a {kinds} cache that cannot drop the <mtp> masks' "
            "entries: only ntp decoding is supported for this model"
        )
    if batched:
        raise SelfMTPError(
            f"{model.config.model_type} models keep a {kinds} cache: decode one prompt at a time"
        )
    return cache


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _new_row(prompt: list[int], max_new_tokens: int, context: int | None, k: int) -> _Row:
    if not prompt:
        raise SelfMTPError("empty prompt: give some text to continue")
    budget, reason = max_new_tokens, "max_new_tokens"
    if context is not None:
        if len(prompt) >= context:
            raise SelfMTPError(f"prompt has {len(prompt)} tokens but the model's context is {context} tokens")
        if context - len(prompt) < budget:
            budget, reason = context - len(prompt), "context"
    return _Row(prompt_tokens=len(prompt), budget=budget, budget_reason=reason, pending=list(prompt), k=k)


# ---------------------------------------------------------------------------------------------
# Accepting tokens and stopping


@dataclass(frozen=True)
class _StopRules:
    token_ids: frozenset[int]
    strings: list[str]
    tokenizer: object


def _accept(
    row: _Row, strategy: Strategy, proposals: torch.Tensor, confidences: torch.Tensor, stops: _StopRules
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


def take_tokens(row: _Row, tokens: list[int], confidences: list[float], stops: _StopRules) -> None:
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


def _cut_at_stop_string(row: _Row, new_tokens: int, stop_strings, tokenizer) -> None:
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


def _result(row: _Row, tokenizer, strategy_name: str) -> GenerationResult:
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
