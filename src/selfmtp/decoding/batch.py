"""A steppable batch decoder: rows join and leave between forward passes (continuous batching).

This is the body of the decode loop (`loop.generate_batch` is `add` every prompt, then `step` until
no row is left). Each row has its own strategy and stop rules. One `step` is one forward pass of
every active row, laid out as `loop.py` describes: left pads, each row's new tokens right-aligned,
a `key_is_real` flag per cache column, position ids counted over real tokens only.

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
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from selfmtp.decoding.kv_cache import PreallocatedLayer, has_plain_cache, preallocated_cache
from selfmtp.decoding.loop import (
    GenerationResult,
    _accept,
    _context_length,
    _mask_token_id,
    _new_row,
    _result,
    _Row,
    _StopRules,
    attention_mask,
    greedy_readout,
    step_inputs,
)
from selfmtp.decoding.strategies import Strategy
from selfmtp.errors import SelfMTPError

COMPACT_AT_LEAST = 64  # dead cache columns worth a copy of the cache to drop


class BatchRow:
    """A handle on one prompt in a `BatchDecoder`: its strategy, stop rules and progress."""

    def __init__(self, state: _Row, strategy: Strategy, stops: _StopRules, load_aware: bool):
        self.state = state
        self.strategy = strategy
        self.stops = stops
        self.load_aware = load_aware  # the decoder may propose fewer tokens for it than its strategy asks
        self.started = time.perf_counter()
        self.error: Exception | None = None  # set when this row failed (with catch_row_errors)

    @property
    def finished(self) -> bool:
        return self.state.stop_reason is not None or self.error is not None

    @property
    def token_ids(self) -> list[int]:
        return self.state.token_ids

    def result(self, tokenizer=None) -> GenerationResult:
        return _result(self.state, tokenizer, self.strategy.name)


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
    ):
        if cache_factory is None and not has_plain_cache(model):
            raise SelfMTPError(
                f"{model.config.model_type} models keep a sliding-window cache: continuous batching needs a plain one"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.mask_id = _mask_token_id(model, 0)
        self.context = _context_length(model)
        self.cache_factory = cache_factory or (lambda: preallocated_cache(model))
        self.compact_cache = compact_cache
        self.catch_row_errors = catch_row_errors  # a failing row leaves with .error instead of raising
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

    def _row_state(self, prompt_ids: list[int], strategy: Strategy, max_new_tokens: int) -> _Row:
        if max_new_tokens < 1:
            raise SelfMTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        _mask_token_id(self.model, strategy.k_max - 1)
        return _new_row(list(prompt_ids), max_new_tokens, self.context, strategy.k_max)

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
        """A new row, prefilled by the next `step` together with the others' next tokens."""
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text")
        state = self._row_state(prompt_ids, strategy, max_new_tokens)
        row = BatchRow(state, strategy, _StopRules(frozenset(stop_token_ids), list(stop_strings), self.tokenizer), load_aware)
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

        `max_proposals` caps the tokens a pass proposes for load-aware rows (1 = plain NTP for them).
        """
        if not self.active:
            return []
        rows = list(self.active)
        for row in rows:
            if row.load_aware and max_proposals is not None:
                row.state.k = max(1, min(row.state.k, max_proposals))
        width = max(row.state.k for row in rows)  # a row with a smaller k ignores the extra proposals
        n_masks = width - 1
        input_ids, position_ids, fed = step_inputs(
            [row.state.pending for row in rows], self.real_count, n_masks, self.pad_token_id, self.mask_id
        )
        logits = self.model(
            input_ids=input_ids.to(self.model.device),
            position_ids=position_ids,
            attention_mask=attention_mask(self.key_is_real, fed),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=width,
        ).logits
        if n_masks:
            self.cache.crop(-n_masks)  # pop the masks: the cache holds real tokens only
        fed_real = fed[:, : fed.shape[1] - n_masks]
        self.key_is_real = torch.cat([self.key_is_real, fed_real], dim=1)
        self.real_count = self.real_count + fed_real.sum(dim=1)
        confidences, proposals = greedy_readout(logits, self.mask_id)
        now = time.perf_counter()
        events = []
        for i, row in enumerate(rows):
            events.append(self._accept(row, proposals[i], confidences[i], n_masks, now - row.started))
        self._keep([row for row in rows if not row.finished])
        return events

    def _accept(self, row: BatchRow, proposals, confidences, n_masks: int, elapsed: float) -> StepEvent:
        state = row.state
        state.tokens_fed.append(len(state.pending) + n_masks)
        proposed, before = state.k, len(state.token_ids)
        try:
            _accept(state, row.strategy, proposals, confidences, row.stops)
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
        return StepEvent(row, new, confidences, proposed, row.finished)

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
