"""Exact decoding (`verify:K`, `verify:K:tree`): self-speculative, from the same weights, lossless.

One pass feeds, per row, the last accepted token, the drafts d_1..d_m as real tokens, and `<mtp>`
mask blocks. The logit at the last token and at each draft is the model's greedy choice g_1..g_m+1
at the next position, so the pass keeps the longest run d_1..d_a with d_i == g_i plus g_a+1 (the
correction, or the bonus after d_m): a+1 tokens, identical to greedy NTP of the same model.

- merged (Stern et al. 2018): one block of K-1 masks after d_m. If every draft was accepted its
  proposals (the tokens after the bonus) are the next drafts; otherwise the next pass has none.
- tree (BiTA): a block after the last token and after every draft, each block seeing only its own
  prefix (a within-pass attention mask, position ids per block), so the block after d_a always
  gives the next drafts. All blocks sit at the end of the fed sequence, so one crop drops them.

Masks are not free where a pass costs more the more it is fed (a CPU): after MISSES_BEFORE_BACKOFF
passes in a row whose first draft was wrong (untrained masks), a row feeds no masks (a plain NTP
pass) for `backoff` passes, then tries drafts again; each failed try doubles `backoff` (up to
MAX_BACKOFF), any accepted draft resets it. This changes what is fed, never what is emitted.

The cache keeps only accepted tokens: the mask columns are cropped, rejected drafts too where
every row rejected them; the rest become holes in `key_is_real`, masked like pads (exact). Position
ids count real tokens only. Near the budget or the context limit a row feeds fewer drafts and masks.
Batches use loop.py's layout: left pads, each row's real tokens right aligned at a common column,
its mask blocks after them and unused mask columns (fillers, treated as pads) at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from selfmtp.decoding.loop import (
    _context_length,
    _croppable_cache,
    _drop_finished,
    _mask_token_id,
    _new_row,
    _result,
    _Row,
    _StopRules,
    _timestamp,
    attention_mask,
    greedy_readout,
    take_tokens,
)
from selfmtp.decoding.strategies import Verify

MISSES_BEFORE_BACKOFF = 2
MAX_BACKOFF = 64


@dataclass
class _VerifyRow(_Row):
    drafts: list[int] = field(default_factory=list)  # fed as real tokens after `pending`, then checked
    misses: int = 0  # passes in a row whose first draft was rejected
    backoff: int = 1  # mask-free passes after the next miss
    wait: int = 0  # mask-free passes left before drafts are tried again
    drafted: list[int] = field(default_factory=list)  # per pass: accepted drafts among its tokens
    offered: list[int] = field(default_factory=list)  # by draft position: drafts fed
    accepted: list[int] = field(default_factory=list)  # by draft position: drafts accepted


@dataclass(frozen=True)
class _Plan:
    """What one row feeds in one pass: real tokens (pending + drafts), then `blocks` blocks of `n_masks`."""

    real: list[int]
    drafts: int
    blocks: int
    n_masks: int

    @property
    def masks(self) -> int:
        return self.blocks * self.n_masks


def generate_verified(
    model,
    prompts: list[list[int]],
    strategy: Verify,
    *,
    max_new_tokens: int,
    stop_token_ids=(),
    stop_strings=(),
    tokenizer=None,
    pad_token_id: int = 0,
):
    """`generate_batch` for `Verify` strategies: the same results, token for token, as `static:1`."""
    decoder = ExactDecoder(model, prompts, strategy, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                           stop_strings=stop_strings, tokenizer=tokenizer, pad_token_id=pad_token_id)  # fmt: skip
    with torch.inference_mode():
        while decoder.active:
            decoder.step()
    results = []
    for row in decoder.rows:
        result = _result(row, tokenizer, strategy.name)
        for chunk, drafted in zip(result.chunks, row.drafted, strict=True):
            chunk.drafted = min(drafted, len(chunk.token_ids))  # a stop may cut the pass's tokens
        result.draft_offered, result.draft_accepted = list(row.offered), list(row.accepted)
        results.append(result)
    return results


class ExactDecoder:
    """The batch state between passes: `step()` runs one verify pass over the active rows.

    `cache`, `key_is_real` (cache columns that are real tokens) and `real_count` (per row) describe
    the cache after each step; tests compare it with a fresh prefill of the accepted tokens.
    """

    def __init__(self, model, prompts, strategy: Verify, *, max_new_tokens: int, stop_token_ids=(), stop_strings=(),
                 tokenizer=None, pad_token_id: int = 0):  # fmt: skip
        self.model, self.strategy, self.pad_id = model, strategy, pad_token_id
        self.stops = _StopRules(frozenset(stop_token_ids), list(stop_strings), tokenizer)
        k = strategy.k_max
        self.mask_id = _mask_token_id(model, k - 1)  # a model without <mtp> has no drafts: SelfMTPError
        self.cache = _croppable_cache(model, k - 1, batched=len(prompts) > 1)
        self.context = _context_length(model)
        self.rows = [_verify_row(_new_row(p, max_new_tokens, self.context, k), k) for p in prompts]
        self.active = list(self.rows)
        device = model.device
        self.key_is_real = torch.zeros(len(self.rows), 0, dtype=torch.bool, device=device)
        self.real_count = torch.zeros(len(self.rows), dtype=torch.long, device=device)
        self.start = time.perf_counter()

    def step(self) -> None:
        plans = [self._plan(row, int(count)) for row, count in zip(self.active, self.real_count.tolist(), strict=True)]
        real_width = max(len(p.real) for p in plans)
        mask_width = max(p.masks for p in plans)
        input_ids, position_ids, fed, within = _layout(
            plans, self.real_count, real_width, mask_width, self.pad_id, self.mask_id, tree=self.strategy.tree
        )
        keep = max(p.drafts + 1 for p in plans) + mask_width  # logits: the checks and the masks
        logits = self.model(
            input_ids=input_ids.to(self.model.device),
            position_ids=position_ids,
            attention_mask=attention_mask(self.key_is_real, fed, within),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        confidences, proposals = greedy_readout(logits, self.mask_id)
        offset = real_width + mask_width - keep  # fed column of logit 0
        rejected = [self._accept(row, plan, proposals[i], confidences[i], real_width - offset)
                    for i, (row, plan) in enumerate(zip(self.active, plans, strict=True))]  # fmt: skip
        self._keep_accepted(fed[:, :real_width], plans, rejected, mask_width)
        now = time.perf_counter() - self.start
        for row in self.active:
            _timestamp(row, now)
        self.active, self.key_is_real, self.real_count = _drop_finished(
            self.active, self.cache, self.key_is_real, self.real_count
        )

    def _plan(self, row: _VerifyRow, real_count: int) -> _Plan:
        """Drafts and masks for this pass, fewer where the budget or the context would not use them."""
        left = row.budget - len(row.token_ids)  # tokens this row may still emit (>= 1)
        drafts = row.drafts[: left - 1]  # a pass emits at most drafts + 1 tokens
        last_position = real_count + len(row.pending) + len(drafts) - 1
        n_masks = 0 if row.wait else min(self.strategy.k_max - 1, left - len(drafts) - 2)  # next drafts fit the budget
        if self.context is not None:
            n_masks = min(n_masks, self.context - 1 - last_position)  # positions stay < context
        n_masks = max(n_masks, 0)
        blocks = (len(drafts) + 1 if self.strategy.tree else 1) if n_masks else 0
        return _Plan(row.pending + drafts, len(drafts), blocks, n_masks)

    def _accept(self, row: _VerifyRow, plan: _Plan, proposals, confidences, real_end: int) -> int:
        """Keep the verified run plus the model's own token; set the next drafts; return rejected drafts."""
        row.passes += 1
        row.tokens_fed.append(len(plan.real) + plan.masks)
        drafts = plan.real[len(plan.real) - plan.drafts :]
        checks = slice(real_end - plan.drafts - 1, real_end)
        greedy, greedy_conf = proposals[checks].tolist(), confidences[checks].tolist()
        accepted = Verify.accepted_drafts(drafts, greedy)
        for j in range(plan.drafts):
            row.offered[j] += 1
            row.accepted[j] += int(j < accepted)
        _update_backoff(row, plan, accepted)
        block = accepted if self.strategy.tree else 0  # merged: its one block is valid only if all were accepted
        valid = plan.blocks and (self.strategy.tree or accepted == plan.drafts)
        start = real_end + block * plan.n_masks  # the blocks follow the real tokens
        row.drafts = proposals[start : start + plan.n_masks].tolist() if valid else []
        take_tokens(row, greedy[: accepted + 1], greedy_conf[: accepted + 1], self.stops)
        row.pending = row.pending[-1:]  # the accepted drafts are in the cache already; the own token is not
        row.drafted.append(accepted)
        return plan.drafts - accepted

    def _keep_accepted(self, fed_real: torch.Tensor, plans: list[_Plan], rejected: list[int], mask_width: int):
        """Crop the mask columns and the rejected drafts all rows share; the other rejected drafts become holes."""
        common = min(rejected)
        if mask_width + common:
            self.cache.crop(-(mask_width + common))
        real = fed_real[:, : fed_real.shape[1] - common].clone()
        for i, n in enumerate(rejected):
            if n > common:
                real[i, real.shape[1] - (n - common) :] = False
        self.key_is_real = torch.cat([self.key_is_real, real], dim=1)
        self.real_count = self.real_count + real.sum(dim=1)


def _update_backoff(row: _VerifyRow, plan: _Plan, accepted: int) -> None:
    """Feed no masks for a while when drafts keep failing; see the module docstring."""
    if row.wait:
        row.wait -= 1
    if not plan.drafts:
        return
    if accepted:
        row.misses, row.backoff = 0, 1
        return
    row.misses += 1
    if row.misses >= MISSES_BEFORE_BACKOFF:
        row.wait, row.backoff = row.backoff, min(2 * row.backoff, MAX_BACKOFF)


def _verify_row(row: _Row, k: int) -> _VerifyRow:
    return _VerifyRow(**vars(row), offered=[0] * (k - 1), accepted=[0] * (k - 1))


def _layout(plans: list[_Plan], real_count: torch.Tensor, real_width: int, mask_width: int, pad_id: int,
            mask_id: int, *, tree: bool):  # fmt: skip
    """Fed tokens of every row -> input_ids (cpu), position_ids, fed (True = not a pad), within.

    Row i: [pads][real tokens ending at real_width][its blocks][fillers up to mask_width]. Block b
    follows real token number b of the checked ones (tree) or the last one (merged) and continues
    its position; `within` (tree only, else None: causal) lets a block see its prefix and itself.
    """
    width = real_width + mask_width
    device = real_count.device
    input_ids = torch.full((len(plans), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(plans), width, dtype=torch.long)
    fed = torch.zeros(len(plans), width, dtype=torch.bool)
    within = torch.ones(len(plans), width, width, dtype=torch.bool).tril() if tree else None
    counts = real_count.tolist()
    for i, plan in enumerate(plans):
        first = real_width - len(plan.real)
        input_ids[i, first:real_width] = torch.tensor(plan.real)
        position_ids[i, first:real_width] = torch.arange(counts[i], counts[i] + len(plan.real))
        fed[i, first : real_width + plan.masks] = True
        input_ids[i, real_width : real_width + plan.masks] = mask_id
        for b in range(plan.blocks):
            after = real_width - 1 - (plan.drafts - b if tree else 0)  # column of the token the block follows
            start = real_width + b * plan.n_masks
            block = slice(start, start + plan.n_masks)
            position_ids[i, block] = torch.arange(1, plan.n_masks + 1) + counts[i] + after - first
            if within is not None:
                within[i, block, after + 1 : start] = False  # not the later drafts, not the other blocks
    return input_ids, position_ids.to(device), fed.to(device), within.to(device) if tree else None
