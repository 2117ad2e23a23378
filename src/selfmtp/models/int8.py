"""Int8 weight-only linear layers for CPU decoding (`--dtype int8`): int8 weights, bf16 activations.

Why: a batch-1 decode pass reads every weight once, so on a CPU its cost is mostly memory traffic; int8
weights halve it against bf16. torch's `aten._weight_int8pack_mm` (the kernel gpt-fast uses on CPU)
multiplies bf16 activations by int8 weights with one scale per output channel. Measured here it is ~3x
faster than a bf16 GEMM for one row, but its cost grows with the rows (a loop over rows), so multi-token
passes pay less than in bf16: an opt-in, not the default (docs/measurements/decode-dtype-cpu).

Quantisation: symmetric, per output channel, scale = max |w| / 127, round to nearest. Embeddings and norms
stay bf16; a gated model's deltas stay bf16 (only the frozen base linears are quantised).
"""

from __future__ import annotations

import torch
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.linears import replace_linears

ACTIVATION_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    """`y = x @ (q * s).T + b` with q int8 (out, in) and s one bf16 scale per output channel."""

    activation_dtype = ACTIVATION_DTYPE

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(ACTIVATION_DTYPE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(ACTIVATION_DTYPE), False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads `.weight`; decoding never does)."""
        return self.weight_int8.to(ACTIVATION_DTYPE) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, bf16 activations"


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of a CPU bf16 model for an `Int8Linear`; returns how many."""
    if not int8_available():
        raise SelfMTPError("--dtype int8 needs torch's aten._weight_int8pack_mm (torch >= 2.3)")
    if model.device.type != "cpu":
        raise SelfMTPError("--dtype int8 is for CPU decoding (weight-only int8 with bf16 activations); use bfloat16 on a GPU")
    return replace_linears(model, Int8Linear)
