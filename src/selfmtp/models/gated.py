"""Gated MTP weights: trainable deltas that act only where the input token is `<mtp>`.

`apply_gate(model, rank=R)` wraps every linear layer of the decoder (q, k, v, o, gate, up, down) in a
`GatedLinear` that adds a delta to the rows of mask positions only: a LoRA delta (`rank > 0`,
B A x * alpha / r, B starts at zero) or a full delta (`rank == 0`: D x, a trainable copy of the weight's
change, starts at zero). The `<mtp>` input embedding is a separate trainable row put in at mask positions
by a hook on the embedding; the embedding matrix itself (and, when tied, the output head) is untouched.
With `head=True` the final norm and the output head are gated too (`GatedNorm`: a delta on the norm's
weight; `GatedHead`: a delta of the same kind as the decoder's on the head's weight, beside it, so a head
tied to the input embeddings stays tied and untouched).

The gate is computed inside the forward from `input_ids == mtp_id` by a pre-hook on the decoder, so every
caller (training layout, KV-cached decoding with masks at the tail, the lm-eval adapter, transformers
`generate`) gets it without passing anything. Real positions are bit-identical to the base model: the
base linear runs exactly as the original module on the whole input, and the delta is written into the
mask rows only (index_add / index_copy on those rows; real rows are not touched, not even by + 0).

Backward only where it is needed: in a grad-enabled forward the base output of all rows is computed from
a detached input (real rows are constants: nothing trainable reaches them); the mask rows get the delta
with grad and a gradient path through the base (`_BaseRows`: the base output already computed, the input
gradient grad @ W in backward). Linear-layer backward then covers mask rows only.

peft (0.21) has no per-token gate: aLoRA activates after an invocation sequence, mixed-adapter batches
choose per row, so this is a small module of our own.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.gated_fused import DeltaGroup, group_deltas

GATED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MTP_ROW = "gated.mtp_embedding"


class Gate:
    """The flat row indices of `<mtp>` positions in the current forward (shared by all gated modules)."""

    def __init__(self, mtp_token_id: int):
        self.mtp_token_id = mtp_token_id
        self.rows: torch.Tensor | None = None  # (n_mask,) indices into input_ids.reshape(-1)
        self.span: slice | None = None  # `rows` as a slice where they are consecutive (batch-1 decoding's tail)
        self.is_mask: torch.Tensor | None = None  # (B, L) bool
        self.numel = 0
        # the last decoder pass's is_mask, kept for a gated output head, which runs after the gate closed
        self.head_mask: torch.Tensor | None = None
        self.groups: list[DeltaGroup] = []  # the decoder's deltas grouped by shared input (gated_fused)

    def set(self, input_ids: torch.Tensor) -> None:
        self.is_mask = input_ids == self.mtp_token_id
        self.rows = self.is_mask.reshape(-1).nonzero().squeeze(1)
        self.span = _consecutive(self.rows)
        self.numel = input_ids.numel()
        self._query_index = self.head_mask = None

    def clear(self) -> None:
        self.rows = self.is_mask = self._query_index = self.span = None
        for group in self.groups:
            group.reset()

    def rows_for(self, flat_in: torch.Tensor) -> torch.Tensor:
        """The mask rows of a decoder module's input (B * L rows while the gate is open)."""
        if self.rows is None:
            raise SelfMTPError("a gated model was called without input_ids (inputs_embeds only): the <mtp> gate needs the ids")
        if flat_in.shape[0] != self.numel:
            raise RuntimeError(f"gated module got {flat_in.shape[0]} rows for {self.numel} input ids")
        return self.rows

    def take_head_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Which rows of the output head's input `x` (B, L', H) are masks: the last decoder pass's, its last L'
        positions (as transformers' `logits_to_keep` slices them). Used once: a later call needs a new pass."""
        mask, self.head_mask = self.head_mask, None
        if mask is None:
            raise RuntimeError("a gated output head was called without a decoder pass before it (or twice after one): "
                               "pass is_mask")
        if x.dim() != 3 or x.shape[0] != mask.shape[0] or x.shape[1] > mask.shape[1]:
            raise RuntimeError(f"gated output head got input {tuple(x.shape)} after a pass over {tuple(mask.shape)}")
        return mask[:, mask.shape[1] - x.shape[1]:]

    def query_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, M), valid (B, M)): each row's mask positions in order, padded to the most masks in
        a row (padding repeats a position and is not valid). `valid` picks them in the order of `rows`."""
        if self._query_index is None:
            counts = self.is_mask.sum(dim=1)
            order = torch.argsort((~self.is_mask).to(torch.int8), dim=1, stable=True)  # mask positions first
            width = max(int(counts.max()), 1)
            valid = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
            self._query_index = (order[:, :width], valid)
        return self._query_index


def _consecutive(rows: torch.Tensor) -> slice | None:
    """`rows` (sorted, unique) as a slice when they are consecutive: slicing and adding in place cost a fraction
    of a gather and an index_add (4.3 us against 24.6 for an index_add of 7 rows, AMD EPYC, bf16)."""
    if not rows.numel():
        return None
    first, last = int(rows[0]), int(rows[-1])
    return slice(first, last + 1) if last - first + 1 == rows.numel() else None


class _GatedRows(nn.Module):
    """`base(x)` at every row, `base(x) + delta_of(x)` at the mask rows; `base` stays frozen. Real rows are
    written once by `base` and never touched again (not even by + 0): they are the base model bit for bit."""

    def __init__(self, base: nn.Module, gate: Gate):
        super().__init__()
        self.base, self.gate = base, gate
        base.requires_grad_(False)

    def delta_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inference_delta(self, x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """The delta at the mask `rows` (indices or a slice) of `x` without autograd (a subclass may compute it
        another way)."""
        return self.delta_of(x.reshape(-1, x.shape[-1])[rows])

    def base_rows(self, masked_in: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        """The base at the mask rows with a gradient path to their input (`computed`: its output there)."""
        return self.base(masked_in)

    def gated(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        flat_in = x.reshape(-1, x.shape[-1])
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters(recurse=False))
        if not trainable:  # inference: base on all rows, delta added in place on the mask rows only
            out = self.base(x)
            if rows.numel():
                flat_out = out.view(-1, out.shape[-1])
                span = self.gate.span if rows is self.gate.rows else None
                delta = self.inference_delta(x, rows if span is None else span).to(out.dtype)
                if span is None:
                    flat_out.index_add_(0, rows, delta.contiguous())  # a strided source costs index_add 4x
                else:
                    flat_out[span] += delta
            return out
        # Training: real rows are constants (no graph); mask rows are recomputed with grad and copied in.
        # Always run the delta path (even for zero mask rows) so DDP sees every parameter used.
        with torch.no_grad():
            out = self.base(x.detach())
        flat_out = out.reshape(-1, out.shape[-1])
        masked_in = flat_in[rows]
        masked_out = self.base_rows(masked_in, flat_out[rows]) + self.delta_of(masked_in)
        return flat_out.index_copy_(0, rows, masked_out.to(out.dtype)).view(out.shape)  # in place: no full copy


class GatedLinear(_GatedRows):
    """A decoder linear layer with a gated delta: LoRA (`rank > 0`) or full (`rank == 0`)."""

    def __init__(self, base: nn.Linear, gate: Gate, *, rank: int, alpha: float | None):
        super().__init__(base, gate)
        self.rank = rank
        self.group: DeltaGroup | None = None  # set by apply_gate for a decoder layer (models/gated_fused.py)
        out_features, in_features = base.weight.shape
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's LoRA initialisation
            self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        else:
            self.delta = nn.Parameter(torch.zeros(out_features, in_features, **factory))

    def delta_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank:
            return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale
        return x @ self.delta.t()

    def inference_delta(self, x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        if self.group is None or torch.is_autocast_enabled(x.device.type):  # autocast: the delta as training has it
            return super().inference_delta(x, rows)
        return self.group.delta(self, x, rows)

    def base_rows(self, masked_in: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        return _BaseRows.apply(masked_in, computed, self.base.weight)  # the base is not run twice on them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x, self.gate.rows_for(x.reshape(-1, x.shape[-1])))


class GatedHead(GatedLinear):
    """The output head with a gated delta (`apply_gate(head=True)`). It runs after the decoder, where the gate is
    closed: its mask rows are given (`is_mask`, one flag per row of `x`: SelectedLogits) or are the last decoder
    pass's (`Gate.take_head_mask`). `weight` is the base head's, so a head tied to the embeddings stays so."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor, is_mask: torch.Tensor | None = None) -> torch.Tensor:
        pending = self.gate.take_head_mask(x) if is_mask is None else None
        self.gate.head_mask = None  # an explicit is_mask answers for the pass too
        is_mask = pending if is_mask is None else is_mask
        return self.gated(x, is_mask.reshape(-1).nonzero().squeeze(1))


class GatedNorm(_GatedRows):
    """The decoder's final RMSNorm with a gated delta on its weight (`apply_gate(head=True)`): at mask rows
    `(w + delta) * x / rms(x)`, the weight entering linearly as in Llama's RMSNorm."""

    def __init__(self, base: nn.Module, gate: Gate):
        super().__init__(base, gate)
        self.eps = base.variance_epsilon
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_of(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.delta * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x, self.gate.rows_for(x.reshape(-1, x.shape[-1])))


class _BaseRows(torch.autograd.Function):
    """The frozen base linear at the mask rows, already computed (`out`): forward returns it as is, backward
    gives the input gradient `grad @ W` (the weight is frozen), so the base is not run twice on those rows."""

    @staticmethod
    def forward(ctx, x, out, weight):
        ctx.save_for_backward(weight)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


def _mask_query_attention(inner, module, query, key, value, attention_mask, **kwargs):
    """Attention for a grad-enabled gated forward: every query without a graph (real rows are the base model's,
    constants), then the mask queries again with one, copied into their rows. The backward then covers the
    mask queries only (M x L instead of L x L). Real queries never attend to mask keys (layouts and decoding
    both), so nothing trainable reaches them and their gradient is zero either way."""
    gate = getattr(module, "_selfmtp_gate", None)
    if (gate is None or gate.is_mask is None or not torch.is_grad_enabled() or attention_mask is None
            or tuple(query.shape[::2]) != tuple(gate.is_mask.shape) or not gate.rows.numel()):
        return inner(module, query, key, value, attention_mask, **kwargs)
    with torch.no_grad():
        out, _ = inner(module, query, key, value, attention_mask, **kwargs)  # (B, L, heads, head_dim)
    positions, valid = gate.query_index()
    batch, heads, _, head_dim = query.shape
    mask_queries = query.gather(2, positions[:, None, :, None].expand(batch, heads, -1, head_dim))
    mask = attention_mask.expand(batch, -1, -1, -1)
    mask = mask.gather(2, positions[:, None, :, None].expand(batch, mask.shape[1], -1, mask.shape[3]))
    out_masks, _ = inner(module, mask_queries, key, value, mask, **kwargs)  # (B, M, heads, head_dim)
    flat = out.reshape(-1, *out.shape[2:])
    return flat.index_copy(0, gate.rows, out_masks[valid]).view(out.shape), None


@contextmanager
def mask_query_attention(model: nn.Module):
    """While a gated model trains: attention backward over mask queries only (`_mask_query_attention`), for
    the sdpa implementation (others run as they are). The model's attention implementation is switched to a
    registered wrapper of itself for the duration; masks passed in stay in the original's format."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = model.config
    original = config._attn_implementation
    if original != "sdpa" or not is_gated(model):
        yield
        return
    name = "selfmtp_gated_sdpa"
    AttentionInterface.register(name, partial(_mask_query_attention, sdpa_attention_forward))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = original


class GatedModel(nn.Module):
    """Holds the gate and the trainable `<mtp>` embedding row; registered on the model as `gated`."""

    def __init__(self, gate: Gate, mtp_row: torch.Tensor, rank: int, alpha: float | None, head: bool):
        super().__init__()
        self.gate, self.rank, self.alpha, self.head = gate, rank, alpha, head
        self.mtp_embedding = nn.Parameter(mtp_row.detach().clone())


def apply_gate(model: nn.Module, *, mtp_token_id: int, rank: int = 0, alpha: float | None = None,
               head: bool = False) -> nn.Module:
    """Freeze `model`, wrap its decoder linears in gated deltas, add the gated `<mtp>` row; with `head`, gate the
    final norm and the output head too; in place."""
    if is_gated(model):
        raise ValueError("the model is already gated")
    model.requires_grad_(False)
    gate = Gate(mtp_token_id)
    embeddings = model.get_input_embeddings()
    model.gated = GatedModel(gate, embeddings.weight[mtp_token_id], rank, alpha, head)
    wrapped = 0
    for module in list(model.get_decoder().modules()):
        for child_name, child in list(module.named_children()):
            if child_name in GATED_TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, GatedLinear(child, gate, rank=rank, alpha=alpha))
                wrapped += 1
    for module in model.get_decoder().modules():
        if isinstance(getattr(module, "q_proj", None), GatedLinear):  # an attention: `_mask_query_attention`
            module._selfmtp_gate = gate
    gate.groups = group_deltas(model.get_decoder(), GatedLinear)
    if not wrapped:
        raise SelfMTPError(f"no decoder linear layer named {', '.join(GATED_TARGETS)} found: cannot gate this model")
    if head:
        _gate_norm_and_head(model, gate, rank=rank, alpha=alpha)

    def set_gate(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            gate.clear()
            gate.head_mask = None
        else:
            gate.set(input_ids)

    def clear_gate(_module, _args, _output):
        if head:
            gate.head_mask = gate.is_mask
        gate.clear()

    def put_mtp_row(_module, args, output):
        ids = args[0]
        if gate.is_mask is None or not gate.is_mask.any():
            return output
        row = model.gated.mtp_embedding.to(output.dtype)
        return torch.where((ids == gate.mtp_token_id)[..., None], row, output)

    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(set_gate, with_kwargs=True)
    decoder.register_forward_hook(clear_gate)
    embeddings.register_forward_hook(put_mtp_row)
    model.gated.mtp_embedding.requires_grad_(True)
    return model


def _gate_norm_and_head(model: nn.Module, gate: Gate, *, rank: int, alpha: float | None) -> None:
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    norm = getattr(decoder, "norm", None)
    if not isinstance(head, nn.Linear) or norm is None or not hasattr(norm, "variance_epsilon"):
        raise SelfMTPError("--gated-head needs a linear output head and an RMSNorm `norm` at the decoder's end "
                           "(Llama-style models): this model has neither")
    decoder.norm = GatedNorm(norm, gate)
    model.set_output_embeddings(GatedHead(head, gate, rank=rank, alpha=alpha))


def gated_head_logits(model: nn.Module, hidden: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """The output head on rows `hidden` (N, H), `is_mask` (N,) saying which are `<mtp>` positions (a gated
    head adds its delta there; any other head ignores it)."""
    head = model.get_output_embeddings()
    return head(hidden, is_mask=is_mask) if isinstance(head, GatedHead) else head(hidden)


def is_gated(model: nn.Module) -> bool:
    return isinstance(getattr(model, "gated", None), GatedModel)


def continue_gated(model: nn.Module, *, rank: int, head: bool = False) -> None:
    """Make a loaded gated model's deltas trainable again (a run that starts from a saved gated directory,
    e.g. the next session of a long run); everything else stays frozen."""
    if model.gated.rank != rank:
        raise SelfMTPError(f"the gated model has rank {model.gated.rank} deltas but --lora-rank is {rank}: "
                           "pass the rank it was trained with")
    if model.gated.head != head:
        raise SelfMTPError(f"the gated model was trained {'with' if model.gated.head else 'without'} a gated head: "
                           f"{'pass' if model.gated.head else 'drop'} --gated-head")
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    for name in gated_state(model):
        params[name].requires_grad_(True)


def gated_token_id(model: nn.Module) -> int | None:
    """The `<mtp>` id a gated model gates on; None for a model without a gate."""
    return model.gated.gate.mtp_token_id if is_gated(model) else None


def gated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gated weights (deltas and `<mtp>` row) by parameter name, CPU, contiguous."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if is_gated_weight(name)}


def is_gated_weight(name: str) -> bool:
    """Whether the parameter `name` of a gated model is a gated weight (a delta or the `<mtp>` row)."""
    return name.startswith("gated.") or ".lora_A" in name or ".lora_B" in name or name.endswith(".delta")


def load_gated_state(model: nn.Module, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy saved gated weights into a gated model; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    expected = set(gated_state(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise SelfMTPError(f"{where}: the gated weights do not fit this base model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise SelfMTPError(f"{where}: {name} has shape {tuple(tensor.shape)}, the base model needs "
                                   f"{tuple(params[name].shape)}: it was trained on another base")
            params[name].copy_(tensor)
