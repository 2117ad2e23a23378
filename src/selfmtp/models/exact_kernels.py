"""Batch-invariant decoding kernels: every token's logits come out bit for bit the same whatever pass computes it.

Why: `verify` promises the same text as NTP greedy decoding of the same model and dtype. That holds only if
a token's logits do not depend on how many other tokens its pass feeds. In float32 the differences are in
the last bits and rarely flip an argmax; in bfloat16 every linear rounds its output to 8 bits of mantissa,
so a 1-ulp difference in an accumulator changes a hidden state, and greedy texts part after a few dozen
tokens (measured on smollm2-135m-mtp: verify:8 gave NTP's text on 3 of 8 prompts). Two kernels vary with
the pass (docs/measurements/decode-dtype-cpu has the kernel-level measurements):

- **attention**: SDPA of one query over the cached keys (an NTP pass) is another computation than the same
  query inside a pass of 9 queries with a mask over 8 more keys. `rowwise_attention` computes every query
  alone, over exactly the keys it may see, gathered in order: the call an NTP pass makes for that token.
- **linear layers**: a CPU GEMM may take another kernel (other blocking, another summation order) by the
  number of rows. `probe_linear_invariance` finds, per weight shape, the row counts whose every row equals
  that row computed alone (padded to `min_rows`); `RowChunkedLinear` then computes any number of rows in
  pieces of at most `chunk` rows, padded to at least `min_rows`. Measured, not assumed: the answer depends
  on the CPU, the dtype and the thread count (here bf16 was invariant up to 16 rows, float32 only from 2 rows on).
  The probe compares enough outputs to see a rare difference: in bf16 the accumulators of two kernels differ
  in their last float32 bits, and only about 1 output in 7,000 rounds to another bf16 value (the AMD EPYC's
  1536-wide down projection, 1 row against 2 or more); a probe of 16 rows missed it, and verify's text parted
  from NTP's on 14 of 16 prompts.
  Attention in a bf16 or fp16 model is computed in float32 (UPCAST_ATTENTION): cheaper per query, and more exact.

Lossy multi-token strategies (ConfAdapt, static:K > 1) promise no identity with NTP, so a pass that only their
rows make needs no batch invariance: `lossy_attention(model)` gives it one (upcast) SDPA call per layer instead
of one per query (at 9 queries and 200 keys: 131 us against 523; batched_attention_probe.txt). In an exact
pass the `<mtp>` masks at the end of every row only draft and no real token attends to them, so
`lossy_tail(model, n)` gives those n queries one call a layer beside the real tokens' one-query calls
(measured: a verify:8 pass at batch 16, 404 -> 320 ms; docs/measurements/decode-dtype-cpu/mask-tail-attention).

`make_decoding_exact(model)` installs both and returns what it found (for logs and results files). Every
row-wise operation of a Llama layer (norms, rotary, activations, residuals) is invariant as it is; the test
suite checks the whole model: cached logits of a multi-token pass == the same tokens fed one by one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.models.int8 import Int8Linear
from selfmtp.models.linears import linear_layers, replace_linears
from selfmtp.models.prepack import PrepackedLinear

ROWWISE_ATTENTION = "selfmtp_rowwise"
BATCHED_ATTENTION = "selfmtp_batched"  # one upcast SDPA call per layer: for passes of lossy rows only
PROBE_MAX_ROWS = 64  # row counts probed per weight shape (a tree-verify pass of K=8 feeds up to ~72 tokens)
# Outputs compared per row count: a kernel pair that rounds 1 bf16 output in 7,000 differently (measured: AMD
# EPYC, bf16, 1536 -> 576, 1 row against >= 2 rows, 1.4e-4 of 1.2M outputs) shows ~37 differences, missed
# with probability e^-37. The sample is capped so that narrow layers stay cheap to probe.
PROBE_OUTPUTS = 1 << 18
PROBE_SAMPLE_ROWS_MAX = 512
MIN_ROWS_CANDIDATES = (1, 2, 4, 8)  # padding a 1-row input to 2 rows costs nothing where GEMV is not invariant
USEFUL_CHUNK = 16  # a chunk this large covers every batch-1 verify pass in one call
# Attention of bf16/fp16 models runs in float32 (q, k, v upcast, the output cast back): it computes one query
# per call, and there torch's low-precision SDPA is the dear kernel. Measured on the AMD EPYC (avx512_bf16),
# 1 thread, one query over 201 cached keys, 9 heads / 3 KV heads, head dim 64: bf16 188.6 us, float32 33.7 us
# (docs/measurements/decode-dtype-amd-cpu). Exactness does not depend on it: every pass makes the same calls.
UPCAST_ATTENTION = (torch.bfloat16, torch.float16)
LINEAR_KINDS = (nn.Linear, Int8Linear, PrepackedLinear)
PREFIX, GATHERED_PREFIX, OWN_GATHER = 0, 1, 2  # where a query's keys come from (Layout.source)


def rowwise_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention for decoding in which each query row is computed as a one-query pass would compute it.

    query (B, H, Q, D); key/value (B, Hkv, S, D); attention_mask: None, or (B, 1, Q, S) bool (True: may attend)
    or additive float. A query's visible keys are gathered in order (a slice when they are a prefix, as in
    every NTP pass at batch 1), and SDPA runs on that one query: the same call, on the same numbers, as an
    NTP pass that computes this token.
    """
    if dropout:
        raise ValueError("rowwise attention is for inference (dropout must be 0)")
    out_dtype = query.dtype
    if out_dtype in UPCAST_ATTENTION:  # bf16/fp16 SDPA of one query is the dear kernel (UPCAST_ATTENTION)
        query, key, value = query.float(), key.float(), value.float()
    batch, heads, queries, _ = query.shape
    gqa = heads != key.shape[1]
    if queries == 1 and attention_mask is None:  # an NTP pass without pads: one query per row sees every key
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).to(out_dtype), None
    if is_causal is None:  # as transformers' sdpa decides it: causal when no mask was built
        is_causal = queries > 1 and attention_mask is None and getattr(module, "is_causal", True)
    layout = _layout(attention_mask, batch, queries, key.shape[2], query.device, is_causal)
    out = query.new_zeros(batch, queries, heads, value.shape[-1])
    exact = queries - _lossy_tail_of(module, layout, queries)
    if exact < queries:  # the mask rows' outputs are drafts only: one call for all of them, not one per query
        tail = F.scaled_dot_product_attention(query[:, :, exact:], key, value, attn_mask=layout.visible[:, None, exact:],
                                              scale=scaling, enable_gqa=gqa)  # fmt: skip
        out[:, exact:] = tail.transpose(1, 2)
    for b, (row_counts, row_source) in enumerate(zip(layout.counts, layout.source, strict=True)):
        row_keys = None  # the row's visible keys in order, gathered once for all its queries
        for i, (count, where) in enumerate(zip(row_counts[:exact], row_source[:exact], strict=True)):
            if count == 0:  # a pad query that sees nothing: its output is never read
                continue
            if where == PREFIX:
                k, v = key[b : b + 1, :, :count], value[b : b + 1, :, :count]
            elif where == GATHERED_PREFIX:
                if row_keys is None:
                    index = layout.order[b]
                    row_keys = key[b : b + 1].index_select(2, index), value[b : b + 1].index_select(2, index)
                k, v = row_keys[0][:, :, :count], row_keys[1][:, :, :count]
            else:  # its keys are not the first of its row's visible keys (a tree's branches): its own gather
                index = layout.visible[b, i].nonzero().squeeze(1)
                k, v = key[b : b + 1].index_select(2, index), value[b : b + 1].index_select(2, index)
            q = query[b : b + 1, :, i : i + 1]
            out[b, i] = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)[0, :, 0]
    return out.to(out_dtype), None


_lossy_tails: dict[int, int] = {}  # id(config) -> how many last queries of every pass are lossy (lossy_tail)


@contextmanager
def lossy_tail(model: nn.Module, queries: int):
    """For the duration, the last `queries` queries of every pass of `model` are `<mtp>` mask rows, whose
    outputs are drafts only: rowwise attention computes them in one batched call (not batch-invariant) and
    keeps the one-query call for every query before them. No real token attends to a mask (pass_layout), so
    every real row's output, and with it what verify accepts, is bit for bit unchanged; the masks' drafts may
    differ in their last bits, as a ConfAdapt pass's do. Measured on smollm2-135m-mtp (2-core Intel Xeon with AMX,
    bf16, 1 thread): a pass of 1 token + 7 masks 83.3 -> 77.8 ms at batch 1, 404 -> 320 ms at batch 16."""
    key = id(model.config)
    _lossy_tails[key] = queries
    try:
        yield
    finally:
        _lossy_tails.pop(key, None)


def _lossy_tail_of(module, layout: Layout, queries: int) -> int:
    """The lossy tail set for this module's model, 0 if any of its queries sees no key (a pad row: the
    one-query loop skips it, a batched call would make it NaN)."""
    config = getattr(module, "config", None)
    tail = min(_lossy_tails.get(id(config), 0), queries) if config is not None else 0
    if tail and any(0 in counts[queries - tail :] for counts in layout.counts):
        return 0
    return tail


@dataclass(frozen=True)
class Layout:
    """Which keys each query of a pass sees, worked out once per pass (every layer gets the same mask).

    A query whose visible keys are keys[:count] reads a slice of the cache (PREFIX: every NTP pass at batch 1).
    Otherwise (left pads, holes of rejected drafts) its row's visible keys are gathered once per layer, in order
    (`order`), and a query that sees the first `count` of them reads a slice of that (GATHERED_PREFIX: a chain of
    drafts sees nested key sets, so a verify row of 9 queries gathers once, not 9 times); only a query that sees
    another subset gathers its own (OWN_GATHER). Each way hands SDPA the same numbers in the same order: what a one-token pass of
    that query would attend over.
    """

    visible: torch.Tensor  # (B, Q, S) bool
    counts: list  # [[int]]: keys each query sees
    source: list  # [[PREFIX | GATHERED_PREFIX | OWN_GATHER]]
    order: list  # [(U_b,) long tensor | None]: row b's visible keys in order, where a query reads a slice of them


_last_layout: list = [None, None]  # (the mask, its layout): every layer of a pass gets the same mask object


def _layout(mask, batch: int, queries: int, keys: int, device, is_causal) -> Layout:
    key = (mask, batch, queries, keys, is_causal)
    cached_key, layout = _last_layout
    if cached_key is not None and cached_key[0] is mask and mask is not None and cached_key[1:] == key[1:]:
        return layout
    visible = _visible_keys(mask, batch, queries, keys, device, is_causal)
    counts = visible.sum(-1)
    is_prefix = visible.cumprod(-1).sum(-1) == counts  # the visible keys are keys[:count]
    source = torch.where(is_prefix, PREFIX, OWN_GATHER)
    order = [None] * batch
    if not bool(is_prefix.all()):
        union = visible.any(1)  # (B, S): keys some query of the row sees
        # a stable sort puts each row's visible keys first, in their order
        ranked = torch.sort((~union).to(torch.uint8), dim=1, stable=True).indices
        in_order = visible.gather(2, ranked[:, None, :].expand(-1, queries, -1))
        nested = in_order.cumprod(-1).sum(-1) == counts  # the query sees the first `count` of its row's keys
        source = torch.where(is_prefix, PREFIX, torch.where(nested, GATHERED_PREFIX, OWN_GATHER))
        widths = union.sum(-1).tolist()
        order = [ranked[b, : widths[b]] if bool((source[b] == GATHERED_PREFIX).any()) else None for b in range(batch)]
    layout = Layout(visible, counts.tolist(), source.tolist(), order)
    _last_layout[:] = [key, layout]  # holds the mask, so its identity cannot be reused while cached
    return layout


def _visible_keys(mask, batch: int, queries: int, keys: int, device, is_causal) -> torch.Tensor:
    """(B, Q, S) bool: which keys each query may attend to."""
    if mask is None:
        if queries == 1 or not is_causal:
            return torch.ones(batch, queries, keys, dtype=torch.bool, device=device)
        offset = keys - queries  # causal over the new tokens, after the cached ones
        return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(offset).expand(batch, -1, -1)
    if mask.dtype != torch.bool:  # additive: 0 where visible, a huge negative (or -inf) elsewhere; no biases
        if bool(((mask != 0) & (mask > -1e4)).any()):
            raise ValueError("rowwise attention takes boolean masks or additive ones of 0 and large negatives only")
        mask = mask == 0
    return mask[:, 0].expand(batch, queries, keys)


def batched_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, computed in float32 for bf16/fp16 models (UPCAST_ATTENTION): one call for all queries.
    Not batch-invariant (a query's output depends on the others in the call): for lossy passes only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out_dtype = query.dtype
    if out_dtype in UPCAST_ATTENTION:
        query, key, value = query.float(), key.float(), value.float()
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(out_dtype), weights


@contextmanager
def _instead_of_rowwise(model: nn.Module, implementation: str):
    """For the duration, a model with the rowwise attention runs `implementation` (others are left as they are)."""
    config = model.config
    original = config._attn_implementation
    if original == ROWWISE_ATTENTION:
        config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = original


def lossy_attention(model: nn.Module):
    """`batched_attention` for the duration: for a pass whose every row decodes lossily with masks (module docstring)."""
    return _instead_of_rowwise(model, BATCHED_ATTENTION)


def stock_attention(model: nn.Module):
    """transformers' own SDPA for the duration (a baseline such as `generate` measured as users run it)."""
    return _instead_of_rowwise(model, "sdpa")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for name, attention in ((ROWWISE_ATTENTION, rowwise_attention), (BATCHED_ATTENTION, batched_attention)):
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # boolean 4D masks


# ---------------------------------------------------------------------------------------------
# Linear layers


@dataclass(frozen=True)
class RowInvariance:
    """For one weight shape: inputs of `min_rows` to `chunk` rows give every row as a one-row input (padded
    to `min_rows`) gives it."""

    min_rows: int
    chunk: int


class RowChunkedLinear(nn.Module):
    """`nn.Linear` whose rows are computed in pieces of `min_rows` to `chunk` rows (see the module docstring);
    `weight` and `bias` are the original Parameters (state dicts and tied embeddings are unchanged)."""

    def __init__(self, linear: nn.Module, invariance: RowInvariance):
        super().__init__()
        self.inner = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows, self.chunk = invariance.min_rows, invariance.chunk

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if self.min_rows <= rows <= self.chunk:
            return self.inner(x)
        out = torch.cat([_padded_call(self.inner, piece, self.min_rows) for piece in flat.split(self.chunk)])
        return out.view(*x.shape[:-1], self.out_features)


def _padded_call(linear: nn.Module, rows: torch.Tensor, min_rows: int) -> torch.Tensor:
    if rows.shape[0] >= min_rows:
        return linear(rows)
    pad = rows.new_zeros(min_rows - rows.shape[0], rows.shape[1])
    return linear(torch.cat([rows, pad]))[: rows.shape[0]]


@torch.inference_mode()
def probe_linear_invariance(linear: nn.Module, *, max_rows: int = PROBE_MAX_ROWS, seed: int = 0) -> RowInvariance:
    """Run `linear` on inputs of 1..max_rows rows of a fixed random sample and find where every row equals that row alone.

    The sample has enough rows for PROBE_OUTPUTS outputs (at least max_rows, at most PROBE_SAMPLE_ROWS_MAX).
    For each candidate `min_rows`, `chunk` is the largest n such that for every row count from min_rows to n,
    the sample fed in pieces of that many rows gives each row bit for bit as the row alone (padded to min_rows
    with zeros) gives it. The first candidate whose chunk reaches USEFUL_CHUNK wins, else the one with the
    largest chunk; a kernel that is invariant nowhere gets (1, 1): every row computed alone (exact, and as slow
    as NTP per row)."""
    weight = linear.weight
    sample_rows = min(max(max_rows, -(-PROBE_OUTPUTS // linear.out_features)), max(max_rows, PROBE_SAMPLE_ROWS_MAX))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sample_rows, linear.in_features, generator=generator).to(weight.device, _activation_dtype(linear))
    best = RowInvariance(1, 1)
    for min_rows in MIN_ROWS_CANDIDATES:
        alone = torch.cat([_padded_call(linear, row, min_rows) for row in x.split(1)])
        chunk = 0
        for n in range(min_rows, max_rows + 1):
            whole = sample_rows - sample_rows % n  # pieces of exactly n rows
            if not torch.equal(torch.cat([linear(piece) for piece in x[:whole].split(n)]), alone[:whole]):
                break
            chunk = n
        if chunk >= min(USEFUL_CHUNK, max_rows):
            return RowInvariance(min_rows, chunk)
        if chunk > best.chunk:
            best = RowInvariance(min_rows, chunk)
    return best


def _activation_dtype(linear: nn.Module) -> torch.dtype:
    dtype = getattr(linear, "activation_dtype", None) or linear.weight.dtype
    return dtype if dtype.is_floating_point else torch.bfloat16


@dataclass
class ExactKernels:
    """What `make_decoding_exact` installed: for logs, `--json` output and results files."""

    attention: str
    threads: int
    linears: dict  # "in x out dtype": {"min_rows", "chunk", "layers"}
    chunked_layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def make_decoding_exact(model: nn.Module, *, max_rows: int = PROBE_MAX_ROWS) -> ExactKernels:
    """Install rowwise attention and row-invariant linears on `model` (inference only); see the module docstring."""
    _register()
    model.config._attn_implementation = ROWWISE_ATTENTION
    probes: dict[tuple, RowInvariance] = {}
    layers: dict[tuple, int] = {}
    for linear in linear_layers(model, LINEAR_KINDS):
        key = (linear.in_features, linear.out_features, str(_activation_dtype(linear)).removeprefix("torch."))
        if key not in probes:
            probes[key] = probe_linear_invariance(linear, max_rows=max_rows)
        layers[key] = layers.get(key, 0) + 1

    def chunked(linear: nn.Module) -> nn.Module:  # always: past the probed row counts nothing is known
        key = (linear.in_features, linear.out_features, str(_activation_dtype(linear)).removeprefix("torch."))
        return RowChunkedLinear(linear, probes[key])

    swapped = replace_linears(model, chunked, LINEAR_KINDS)
    report = {f"{i}x{o} {d}": {**asdict(inv), "layers": layers[(i, o, d)]} for (i, o, d), inv in probes.items()}
    return ExactKernels(ROWWISE_ATTENTION, torch.get_num_threads(), report, swapped)
