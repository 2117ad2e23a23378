"""A KV cache that decoding can crop: transformers' DynamicCache with a preallocated buffer per layer.

transformers' `DynamicLayer` appends with `torch.cat`, copying the whole cache of every layer at every
step. `PreallocatedLayer` keeps keys and values in a buffer with spare room, so appending writes in
place and cropping (popping the `<mtp>` masks) only moves the end; the model sees the same tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW_BY = 256  # spare positions allocated whenever the buffer is full


class PreallocatedLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            self.key_buffer = _grown(self.key_buffer, self.length, end + GROW_BY)
            self.value_buffer = _grown(self.value_buffer, self.length, end + GROW_BY)
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count: the number of trailing entries to drop")
        if self.is_initialized:
            self._set_length(max(0, self.length + tokens_to_remove))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._set_length(self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._set_length(self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def add_empty_rows(self, count: int) -> None:
        """Append `count` all-zero rows to the batch: the history of a row joining mid-decode, which
        its attention mask hides (see `decoding.batch`)."""
        if self.is_initialized:
            self.key_buffer = torch.cat([self.key_buffer, self.key_buffer.new_zeros(count, *self.key_buffer.shape[1:])])
            self.value_buffer = torch.cat(
                [self.value_buffer, self.value_buffer.new_zeros(count, *self.value_buffer.shape[1:])]
            )
            self._set_length(self.length)

    def keep_positions(self, index: torch.Tensor) -> None:
        """Keep only the cached positions `index` (ascending), e.g. to drop columns no row attends to."""
        if self.is_initialized:
            self.key_buffer = self.keys.index_select(-2, index)
            self.value_buffer = self.values.index_select(-2, index)
            self._set_length(len(index))

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[..., :length, :]
        self.values = self.value_buffer[..., :length, :]


def _grown(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    bigger = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[-1])
    bigger[..., :used, :] = buffer[..., :used, :]
    return bigger


def has_plain_cache(model) -> bool:
    """True when every layer's cache is a plain growing KV list (croppable, no sliding window)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def preallocated_cache(model) -> DynamicCache:
    """A DynamicCache for `model` whose layers are `PreallocatedLayer`s (the model must have a plain cache)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() for _ in cache.layers]
    return cache
