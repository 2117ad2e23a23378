"""CPU inference: linear layers whose weights oneDNN packs once, so passes cost less.

Why: a linear layer's oneDNN/MKL GEMM re-packs the whole weight into its blocked layout on every call
unless the weight was packed beforehand (what torch.compile's CPU backend does when it freezes weights).
- float32: a one-row input takes MKL's GEMV path (no packing, faster than oneDNN there); two or more rows
  take the GEMM and pay the re-packing in every layer: on this project's 2-core CPU SmolLM2-135M's output
  head costs ~2.4x as much for 2 rows as for 1, and a 2-token pass ~1.6-2x a 1-token pass
  (docs/measurements/prepack-cpu). Opt-in (`--prepack`): it makes the 1-token pass ~15% dearer.
- bfloat16: every row count, one row included, goes through oneDNN's GEMM and re-packs. Packed once, the
  same kernel gives the same numbers bit for bit at a fraction of the cost: on the AMD EPYC (1 thread) the
  output head's 1-row matmul 2.77 ms instead of 6.56, the 30 decoder layers' 1-row linears 17.7 ms instead of
  31.6 (float32: 49.5); docs/measurements/decode-dtype-amd-cpu. So bf16 on a CPU packs by default
  (`prepack=None`, "auto"), and `prepack=False` keeps the stock calls (a baseline).

`prepack_linears(model)` swaps every `nn.Linear` for a `PrepackedLinear` that keeps the same
`weight` parameter (so state dicts, tied embeddings and gated deltas are unchanged) plus the packed
copy. Rules:
- inference only: with autograd recording for a weight that requires grad, it runs plain `F.linear`;
  a weight changed in place since packing (its `_version` moved) is packed again before use;
- float32: one row keeps MKL's GEMV, two or more rows use the packed weight; bfloat16: every row count;
- CPU float32 and bfloat16 only (the cases measured); other devices or dtypes are a user error.
Results differ from `nn.Linear` by float rounding only (float32: another kernel for 2+ rows; bf16: none
measured), and exact decoding stays exact because `verify` and `static:1` run on the same model (the
batch-invariant kernels probe the packed layers as they probe stock ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.linears import linear_layers, replace_linears

PACKED_DTYPES = (torch.float32, torch.bfloat16)


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
        self._packed_version = weight_version(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        gemv = rows <= 1 and self.weight.dtype == torch.float32  # float32's 1-row MKL GEMV beats oneDNN
        if gemv or rows == 0 or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if weight_version(self.weight) != self._packed_version:
            self._pack()
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self._packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, prepacked"


def weight_version(weight: torch.Tensor) -> int | None:
    """The weight's in-place version counter; None for a tensor made under inference_mode, which has none."""
    return None if weight.is_inference() else weight._version


def prepack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` in `model` (CPU, float32 or bfloat16) for a `PrepackedLinear`; returns how many."""
    if not prepack_available():
        raise SelfMTPError("--prepack needs a torch build with oneDNN (mkldnn); this one has none")
    if any(w.device.type != "cpu" or w.dtype not in PACKED_DTYPES for w in (m.weight for m in linear_layers(model))):
        raise SelfMTPError("--prepack is for CPU inference in float32 or bfloat16: drop it, or use --device cpu "
                           "with --dtype float32 or bfloat16")
    return replace_linears(model, PrepackedLinear)
