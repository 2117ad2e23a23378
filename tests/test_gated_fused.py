"""Gated deltas at inference computed per group of layers that share an input (models/gated_fused.py): the same
mask-row logits as each layer's own delta, one computation per group and pass, new weights picked up after an
in-place update (an optimizer step between two evaluation decodes)."""

from __future__ import annotations

import pytest
import torch

from selfmtp.models.gated import GatedLinear
from selfmtp.models.gated_fused import DeltaGroup
from test_gated import gated_tiny, mtp_token_id_of

# Masks at the tail of each row, as decoding feeds them (real tokens never see a mask): in one row their flat
# rows are consecutive (a slice), in a batch of two with other counts they are not (an index).
STEPS = {"tail": [[11, 12, None, None, None]], "scattered": [[11, 12, None, None, None], [13, 14, 15, 16, None]]}


def mask_pass(model, tokenizer, where: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, is_mask) of one uncached inference pass with `<mtp>` at the None places of STEPS[where]."""
    mask = mtp_token_id_of(tokenizer)
    ids = torch.tensor([[mask if t is None else t for t in row] for row in STEPS[where]])
    with torch.inference_mode():
        return model.to(dtype)(input_ids=ids).logits.float(), ids == mask


def naive_mask_pass(monkeypatch, model, tokenizer, where: str, dtype: torch.dtype):
    """The reference: every gated linear computes base + gate * delta on every row, its own delta in plain
    torch (no groups, no row selection, no in-place writes)."""
    def naive_forward(self, x):
        gate = torch.zeros(self.gate.numel, dtype=x.dtype).index_fill_(0, self.gate.rows, 1.0)
        return self.base(x) + gate.view(*x.shape[:-1], 1) * self.delta_of(x)

    with monkeypatch.context() as patch:
        patch.setattr(GatedLinear, "forward", naive_forward)
        return mask_pass(model, tokenizer, where, dtype)


# bf16: the fused form folds the LoRA scale into B and sums a block-diagonal product, so its bf16 outputs
# round differently from the per-layer chain (an ulp of a hidden state, 2^-8 relative, carried through 2
# layers to logits of size ~10); a delta missing or on the wrong rows moves logits by ~0.1-1 (deltas 0.2 x randn).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.15}


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("where", sorted(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_deltas_give_each_layers_own_delta(monkeypatch, rank, where, dtype):
    base, gated, tokenizer = gated_tiny(rank)
    logits, is_mask = mask_pass(gated, tokenizer, where, dtype)
    expected, _ = naive_mask_pass(monkeypatch, gated, tokenizer, where, dtype)
    base_logits, _ = mask_pass(base, tokenizer, where, dtype)
    assert torch.equal(logits[~is_mask], base_logits[~is_mask])  # real rows: the base model bit for bit
    assert (logits[is_mask] - expected[is_mask]).abs().max() < TOLERANCE[dtype]
    assert (expected[is_mask] - base_logits[is_mask]).abs().amax(-1).min() > 10 * TOLERANCE[torch.float32]


def test_each_group_computes_its_deltas_once_a_pass(monkeypatch):
    _, gated, tokenizer = gated_tiny(4)
    groups = gated.gated.gate.groups
    sizes = sorted(len(g.members) for g in groups)
    layers = len(gated.get_decoder().layers)
    assert sizes == [1] * 2 * layers + [2] * layers + [3] * layers  # o, down alone; gate+up; q+k+v
    computed = []
    fused = DeltaGroup._fused
    monkeypatch.setattr(DeltaGroup, "_fused", lambda self, x: computed.append(self) or fused(self, x))
    mask_pass(gated, tokenizer, "tail", torch.float32)
    assert len(computed) == len(groups) and set(map(id, computed)) == set(map(id, groups))
    assert all(not g._deltas and g._input is None for g in groups)  # nothing kept past the pass


def test_an_in_place_weight_update_is_picked_up(monkeypatch):
    _, gated, tokenizer = gated_tiny(4)
    mask_pass(gated, tokenizer, "tail", torch.float32)  # builds the stacked weights
    with torch.no_grad():
        gated.get_decoder().layers[0].self_attn.k_proj.lora_B.add_(0.5)  # as an optimizer step does
    logits, is_mask = mask_pass(gated, tokenizer, "tail", torch.float32)
    expected, _ = naive_mask_pass(monkeypatch, gated, tokenizer, "tail", torch.float32)
    assert (logits[is_mask] - expected[is_mask]).abs().max() < TOLERANCE[torch.float32]
