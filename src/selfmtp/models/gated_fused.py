"""Gated deltas at inference, one matmul pair for every group of layers that read the same input.

Why: a pass that feeds `<mtp>` masks adds a delta at their rows in every gated linear: 7 per Llama layer,
210 in SmolLM2-135M, each a gather, two tiny matmuls, a scale and an index_add. The matmuls are a few
thousand multiply-adds on 7 rows, so each call costs its overhead (oneDNN re-packs its weight, torch
dispatches): measured on the AMD EPYC, bf16, 1 thread, a pass of 1 token + 7 masks cost 67.5 ms against
44.7 for 8 real tokens (docs/measurements/decode-dtype-amd-cpu/gated-deltas). q, k and v read one input, as
do gate and up; so their deltas are one matmul with the A factors stacked, `[A_q; A_k; A_v] x`, and one with
the B factors block-diagonal (the LoRA scale folded in), the weights packed once for oneDNN on a CPU.
Per layer: 4 gathers and 8 matmuls instead of 7 and 14.

Exactness does not depend on it: a delta is written at mask rows only, and a mask row's output is a draft,
never a verified token's logits. Its rounding differs from the per-layer form (the scale folded into B)
within bf16 rounding. Training does not use it: a grad-enabled forward, or one under autocast, runs each
layer's own delta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.models.prepack import prepack_available, weight_version

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-style names read one input


class DeltaGroup:
    """The gated linears of one module that read the same input (`members`, in their order). At inference the
    first member called computes every member's delta at the mask rows; the others take theirs, as long as they
    are called on the same input tensor in the same pass (else a member computes its own)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        for member in members:
            member.group = self
        self._weights: tuple | None = None  # (key, first, second, splits)
        self._input: torch.Tensor | None = None
        self._deltas: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the last pass's input and deltas (the gate calls it when a pass ends)."""
        self._input, self._deltas = None, {}

    def delta(self, member: nn.Module, x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """`member`'s delta at the mask `rows` (indices or a slice) of its input `x` (B, L, H)."""
        if x is not self._input or id(member) not in self._deltas:
            first, second, splits = self._fused(x)
            masked = x.reshape(-1, x.shape[-1])[rows]
            out = first(masked) if second is None else second(first(masked))
            self._input = x
            self._deltas = {id(m): piece for m, piece in zip(self.members, out.split(splits, dim=1), strict=True)}
        return self._deltas.pop(id(member))

    def _fused(self, x: torch.Tensor) -> tuple:
        """The stacked weights as two matmuls (one for full deltas), rebuilt when a member's weight changed."""
        params = [p for m in self.members for p in m.parameters(recurse=False)]
        key = (x.dtype, x.device, tuple((p.data_ptr(), weight_version(p)) for p in params))
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, *_stack(self.members, x.dtype))
        return self._weights[1:]


def _stack(members: list[nn.Module], dtype: torch.dtype) -> tuple:
    """(first, second, splits): `second(first(x))` is every member's delta side by side (widths `splits`)."""
    splits = [m.base.out_features if hasattr(m.base, "out_features") else m.base.weight.shape[0] for m in members]
    with torch.no_grad():
        if not members[0].rank:  # full deltas: one matmul with the deltas stacked
            return _matmul(torch.cat([m.delta for m in members]).to(dtype)), None, splits
        stacked_a = torch.cat([m.lora_A for m in members]).to(dtype)
        scaled_b = [(m.lora_B.float() * m.scale).to(dtype) for m in members]
        return _matmul(stacked_a), _matmul(torch.block_diag(*scaled_b)), splits


def _matmul(weight: torch.Tensor):
    """x -> x @ weight.T, with the weight packed once for oneDNN where it can be (CPU, float32 or bfloat16)."""
    weight = weight.contiguous()
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and prepack_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def group_deltas(decoder: nn.Module, gated_type: type) -> list[DeltaGroup]:
    """A DeltaGroup for every set of `SHARED_INPUTS` children that are all `gated_type`, and one of its own for
    every other `gated_type` layer (its two matmuls packed all the same); each is set on its members as `.group`."""
    groups = []
    for module in decoder.modules():
        for names in SHARED_INPUTS:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(m, gated_type) and m.group is None for m in members):
                groups.append(DeltaGroup(members))
    groups += [DeltaGroup([m]) for m in decoder.modules() if isinstance(m, gated_type) and m.group is None]
    return groups
