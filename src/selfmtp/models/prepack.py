"""CPU inference: linear layers whose weights oneDNN packs once, so multi-token passes cost less.

Why: on a CPU, `nn.Linear` runs MKL. A one-row input takes MKL's GEMV path; two or more rows take its
GEMM, which re-packs the whole weight into its blocked layout on every call. A decode pass that feeds
2-16 tokens (a multi-token step, a verify pass, a small batch) pays that re-packing in every layer:
on this project's 2-core CPU SmolLM2-135M's output head (49152 x 576) costs ~2.4x as much for 2 rows
as for 1, and a whole 2-token pass ~1.6-2x a 1-token pass. oneDNN's linear with the weight packed
once at load time (what torch.compile's CPU backend does when it freezes weights) skips the repacking:
docs/measurements/prepack-cpu has the pass costs by tokens fed, and decode wall clock, with and without.

`prepack_linears(model)` swaps every `nn.Linear` for a `PrepackedLinear` that keeps the same
`weight` parameter (so state dicts, tied embeddings and gated deltas are unchanged) plus the packed
copy. Rules:
- inference only: with autograd recording for a weight that requires grad, it runs plain `F.linear`;
  a weight changed in place since packing (its `_version` moved) is packed again before use;
- one row keeps MKL's GEMV (faster than oneDNN there), two or more rows use the packed weight;
- CPU float32 only (the case it was measured for); other devices or dtypes are a user error.
Results differ from `nn.Linear` by float rounding only (another summation order), as any change of
kernel does; exact decoding stays exact because `verify` and `static:1` run on the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.linears import linear_layers, replace_linears


def prepack_available() -> bool:
    """Whether this torch build has the oneDNN linear ops (CPU builds with mkldnn do)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))  # fmt: skip


class PrepackedLinear(nn.Module):
    """`nn.Linear` for CPU inference with the weight packed once for oneDNN (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: nothing is copied or renamed in the state dict
        self.bias = linear.bias
        self._pack()

    def _pack(self) -> None:
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= 1 or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self.weight._version != self._packed_version:
            self._pack()
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self._packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` in `model` (CPU, float32) for a `PrepackedLinear`; returns how many."""
    if not prepack_available():
        raise SelfMTPError("--prepack needs a torch build with oneDNN (mkldnn); this one has none")
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in (m.weight for m in linear_layers(model))):
        raise SelfMTPError("--prepack is for CPU float32 inference: drop it, or use --device cpu --dtype float32")
    return replace_linears(model, PrepackedLinear)
