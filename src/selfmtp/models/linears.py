"""Swap a model's linear layers for inference variants that keep the same weight Parameter.

Three variants use it: oneDNN-prepacked float32 (`prepack`), row-chunked linears that compute each row
as a one-row pass would (`exact_kernels`), and int8 weight-only linears (`int8`). Gated wrappers hold
their frozen base as an `nn.Linear` child, so the base is swapped and the gated delta is not.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def linear_layers(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> list[nn.Module]:
    """The model's layers whose type is exactly one of `kinds` (subclasses such as gated wrappers are not), in order."""
    return [m for m in model.modules() if type(m) in kinds]


def replace_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module], kinds: tuple[type, ...] = (nn.Linear,)) -> int:
    """Replace every child whose type is one of `kinds` by `make(child)` (which may return it unchanged);
    returns how many were replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in kinds:
                new = make(child)
                if new is not child:
                    setattr(parent, name, new)
                    swapped += 1
    return swapped
