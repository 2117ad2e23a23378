"""A steppable batch decoder: rows join and leave between forward passes (continuous batching).

This is the body of the decode loop (`loop.generate_batch` is `add` every prompt, then `step` until
no row is left). Each row has its own strategy and stop rules. One `step` is one forward pass of
every active row, laid out by `pass_layout.pass_layout`: left pads, each row's new tokens right-aligned,
its own masks after them, a `key_is_real` flag per cache column, position ids counted over real
tokens only. Exact rows (`verify`, decoding/verify.py) share the pass: they also feed drafts as real
tokens; after the pass the mask columns are cropped, and so are the rejected drafts every row
rejected; the other rejected drafts become holes (False in `key_is_real`), masked like pads.

A row that joins mid-decode gets an all-hole history: every cache layer grows by one zero row in
its batch dimension and `key_is_real` by an all-False row, so the attention mask hides the other
rows' columns from it; its whole prompt is `pending`, so it is prefilled in the same pass in which
the others take their next step, and decodes exactly as it would alone. Finished rows leave at once
(`cache.batch_select_indices`); with `compact_cache` the columns no remaining row can see are
dropped now and then, so a server that never drains keeps a cache bounded by its live rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from selfmtp.decoding.kv_cache import PreallocatedLayer, has_plain_cache, preallocated_cache
from selfmtp.decoding.load_aware import LoadAware
from selfmtp.decoding.pass_layout import Plan, attention_mask, greedy_readout, pass_layout
from selfmtp.decoding.results import GenerationResult
from selfmtp.decoding.rows import (
    Row,
    StopRules,
    accept_proposals,
    context_length,
    mask_token_id,
    new_row,
    row_result,
)
from selfmtp.decoding.strategies import Strategy, Verify, with_model_defaults
from selfmtp.decoding.verify import ExactRow
from selfmtp.errors import SelfMTPError
from selfmtp.models.exact_kernels import lossy_attention, lossy_tail

COMPACT_AT_LEAST = 64  # dead cache columns worth a copy of the cache to drop


class BatchRow:
    """A handle on one prompt in a `BatchDecoder`: its strategy, stop rules and progress."""

    def __init__(self, state: Row, strategy: Strategy, stops: StopRules, load_aware: bool, prompt: list[int]):
        self.state = state
        self.strategy = strategy
        self.exact = ExactRow(strategy, list(prompt)) if isinstance(strategy, Verify) else None
        self.stops = stops
        self.load_aware = load_aware  # the decoder may propose fewer tokens for it than its strategy asks
        self.kind = "exact" if self.exact is not None else "lossy"  # its load-aware rule (load_aware.LoadAware)
        self.started = time.perf_counter()
        self.error: Exception | None = None  # set when this row failed (with catch_row_errors)

    @property
    def finished(self) -> bool:
        return self.state.stop_reason is not None or self.error is not None

    @property
    def token_ids(self) -> list[int]:
        return self.state.token_ids

    def result(self, tokenizer=None) -> GenerationResult:
        result = row_result(self.state, tokenizer, self.strategy.name)
        if self.exact is not None:
            for chunk, drafted in zip(result.chunks, self.exact.drafted, strict=True):
                chunk.drafted = min(drafted, len(chunk.token_ids))  # a stop may cut the pass's tokens
            result.draft_offered, result.draft_accepted = list(self.exact.offered), list(self.exact.accepted)
            result.lookup_offered, result.lookup_accepted = self.exact.lookup_offered, self.exact.lookup_accepted
        return result

    def cap(self, proposals: int) -> None:
        """Propose at most `proposals` tokens in the next pass (an exact row: feed at most that many - 1 masks)."""
        k = self.strategy.k_max if self.exact is not None else self.state.k
        self.state.k = max(1, min(k, proposals))

    def plan(self, real_count: int, context: int | None) -> Plan:
        """What this row feeds in the next pass."""
        if self.exact is not None:
            return self.exact.plan(self.state, real_count, context)
        # masks past the budget propose tokens the row may not keep (and the budget keeps positions < context)
        n_masks = max(0, min(self.state.k, self.state.budget - len(self.state.token_ids)) - 1)
        return Plan(list(self.state.pending), 0, 1 if n_masks else 0, n_masks)


@dataclass
class StepEvent:
    """What one pass gave one row: its new tokens, how many it proposed, and whether it is done."""

    row: BatchRow
    token_ids: list[int]
    confidences: list[float]
    proposed: int
    finished: bool


class BatchDecoder:
    """Decode rows that come and go; `step()` runs one forward pass of every active row."""

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        pad_token_id: int = 0,
        cache_factory: Callable[[], DynamicCache] | None = None,
        compact_cache: bool = False,
        catch_row_errors: bool = False,
        load_aware: LoadAware | None = None,
    ):
        if cache_factory is None and not has_plain_cache(model):
            raise SelfMTPError(
                f"{model.config.model_type} models keep a sliding-window cache: continuous batching needs a plain one"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.mask_id = mask_token_id(model, 0)
        self.context = context_length(model)
        self.cache_factory = cache_factory or (lambda: preallocated_cache(model))
        self.compact_cache = compact_cache
        self.catch_row_errors = catch_row_errors  # a failing row leaves with .error instead of raising
        self.load_aware = load_aware  # caps the proposals of rows added with load_aware=True
        self.active: list[BatchRow] = []
        self._reset()

    def _reset(self) -> None:
        device = self.model.device
        self.cache = self.cache_factory()
        self.key_is_real = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.real_count = torch.zeros(0, dtype=torch.long, device=device)

    def check(self, prompt_ids: list[int], strategy: Strategy, max_new_tokens: int) -> None:
        """Raise SelfMTPError if `add` would refuse this prompt (empty, too long, masks without `<mtp>`)."""
        self._row_state(prompt_ids, strategy, max_new_tokens)

    def _row_state(self, prompt_ids: list[int], strategy: Strategy, max_new_tokens: int) -> Row:
        if max_new_tokens < 1:
            raise SelfMTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        mask_token_id(self.model, strategy.k_max - 1)
        return new_row(list(prompt_ids), max_new_tokens, self.context, strategy.k_max)

    @torch.inference_mode()
    def add(
        self,
        prompt_ids: list[int],
        strategy: Strategy,
        *,
        max_new_tokens: int,
        stop_token_ids=(),
        stop_strings=(),
        load_aware: bool = False,
    ) -> BatchRow:
        """A new row, prefilled by the next `step` together with the others' next tokens.

        `load_aware`: the decoder's `LoadAware` (or `step`'s `max_proposals`) caps its proposals."""
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text")
        strategy = with_model_defaults(strategy, self.model)
        state = self._row_state(prompt_ids, strategy, max_new_tokens)
        stops = StopRules(frozenset(stop_token_ids), list(stop_strings), self.tokenizer)
        row = BatchRow(state, strategy, stops, load_aware, prompt_ids)
        past = self.key_is_real.shape[1]
        if past:  # joining a running batch: an all-hole history in every layer
            for layer in self.cache.layers:
                if not isinstance(layer, PreallocatedLayer):
                    raise SelfMTPError("this cache cannot take a row mid-decode")
                layer.add_empty_rows(1)
        device = self.key_is_real.device
        self.key_is_real = torch.cat([self.key_is_real, torch.zeros(1, past, dtype=torch.bool, device=device)])
        self.real_count = torch.cat([self.real_count, torch.zeros(1, dtype=torch.long, device=device)])
        self.active.append(row)
        return row

    @torch.inference_mode()
    def remove(self, row: BatchRow) -> None:
        """Take `row` out of the batch (finished, failed or abandoned by its client)."""
        if row in self.active:
            self._keep([r for r in self.active if r is not row])

    def clear(self) -> list[BatchRow]:
        """Drop every row and start from an empty cache (e.g. after a failed pass); returns the rows."""
        rows, self.active = self.active, []
        self._reset()
        return rows

    @torch.inference_mode()
    def step(self, max_proposals: int | None = None) -> list[StepEvent]:
        """One forward pass of every active row; finished rows leave the batch before this returns.

        Load-aware rows propose what the decoder's `LoadAware` allows this pass, or at most
        `max_proposals` when given (1 = plain NTP passes for them). Where its curve is learned, the
        whole pass is timed (layout, forward, readout, drafts, cache crops) and reported with the
        tokens it fed, so the rule prices passes as this loop runs them.
        """
        if not self.active:
            return []
        clock = self.load_aware.clock if self.load_aware is not None else None
        started = clock() if clock is not None else 0.0
        rows = list(self.active)
        aware = [row for row in rows if row.load_aware]
        if max_proposals is not None:
            caps = {"lossy": max_proposals, "exact": max_proposals}
        else:
            caps = self.load_aware.caps(rows) if aware and self.load_aware is not None else {}
        for row in aware:
            if row.kind in caps:
                row.cap(caps[row.kind])
        plans = [row.plan(count, self.context) for row, count in zip(rows, self.real_count.tolist(), strict=True)]
        input_ids, position_ids, fed, within = pass_layout(plans, self.real_count, self.pad_token_id, self.mask_id)
        mask_width = max(plan.masks for plan in plans)
        keep = max(plan.drafts for plan in plans) + 1 + mask_width  # logits: the checks and the masks
        # exact rows and NTP rows (verify's reference) keep the batch-invariant attention; lossy mask rows need none
        lossy = all(row.exact is None and row.strategy.k_max > 1 for row in rows)
        if lossy:
            attention = lossy_attention(self.model)
        else:  # the masks at the end of every row only draft: their attention needs no invariance
            attention = lossy_tail(self.model, mask_width) if mask_width else nullcontext()
        with attention:
            logits = self.model(
                input_ids=input_ids.to(self.model.device),
                position_ids=position_ids,
                attention_mask=attention_mask(self.key_is_real, fed, within),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            ).logits
        confidences, proposals = greedy_readout(logits, self.mask_id)
        real_end = keep - mask_width  # index in the logits of the column after every row's real tokens
        now = time.perf_counter()
        events, rejected = [], []
        for i, (row, plan) in enumerate(zip(rows, plans, strict=True)):
            event, n = self._accept(row, plan, proposals[i], confidences[i], real_end, now - row.started)
            # a row's last pass is left out: a stop rule or the budget may have cut what it kept
            if row.load_aware and self.load_aware is not None and not event.finished:
                self.load_aware.record(row.kind, event.proposed, len(event.token_ids))
            events.append(event)
            rejected.append(n)
        self._keep_accepted(fed[:, : fed.shape[1] - mask_width], rejected, mask_width)
        self._keep([row for row in rows if not row.finished])
        if clock is not None:  # every token fed counts, pads too: the pass computes them all
            self.load_aware.observe(input_ids.numel(), clock() - started)
        return events

    def _accept(self, row: BatchRow, plan: Plan, proposals, confidences, real_end: int, elapsed: float):
        """-> (the row's StepEvent, how many of its drafts were rejected)."""
        state = row.state
        proposed = row.exact.proposed if row.exact is not None else state.k
        before, rejected = len(state.token_ids), 0
        try:
            if row.exact is not None:
                rejected = row.exact.accept(state, plan, proposals, confidences, real_end, row.stops)
            else:
                state.tokens_fed.append(len(plan.real) + plan.masks)
                accept_proposals(state, row.strategy, proposals[real_end - 1 :], confidences[real_end - 1 :], row.stops)
        except Exception as error:
            if not self.catch_row_errors:
                raise
            row.error = error
        if state.passes == 1:
            state.first_token_seconds = elapsed
        if row.finished:
            state.seconds = elapsed
        new = list(state.token_ids[before:])
        confidences = list(state.chunks[-1][1][: len(new)]) if new else []
        return StepEvent(row, new, confidences, proposed, row.finished), rejected

    def _keep_accepted(self, fed_real: torch.Tensor, rejected: list[int], mask_width: int) -> None:
        """Crop the mask columns and the rejected drafts all rows share; the other rejected drafts become holes."""
        common = min(rejected)
        if mask_width + common:
            self.cache.crop(-(mask_width + common))  # the cache holds real tokens only
        real = fed_real[:, : fed_real.shape[1] - common].clone()
        for i, n in enumerate(rejected):
            if n > common:
                real[i, real.shape[1] - (n - common) :] = False
        self.key_is_real = torch.cat([self.key_is_real, real], dim=1)
        self.real_count = self.real_count + real.sum(dim=1)

    def _keep(self, rows: list[BatchRow]) -> None:
        if len(rows) == len(self.active):
            return
        if not rows:  # the batch drained: start the next one from an empty cache
            self.active = []
            self._reset()
            return
        index = [i for i, row in enumerate(self.active) if row in rows]
        self.active = [self.active[i] for i in index]
        index = torch.tensor(index, dtype=torch.long, device=self.key_is_real.device)
        self.cache.batch_select_indices(index)
        self.key_is_real, self.real_count = self.key_is_real[index], self.real_count[index]
        if self.compact_cache:
            self._drop_dead_columns()

    def _drop_dead_columns(self) -> None:
        """Drop cache columns no active row attends to (they were real only for rows that left)."""
        live = self.key_is_real.any(dim=0)
        dead = int((~live).sum())
        if dead < max(COMPACT_AT_LEAST, int(live.sum())):  # amortise: copy only when half the cache is dead
            return
        index = live.nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keep_positions(index)
        self.key_is_real = self.key_is_real[:, index]
