"""CPU prepacked linears (models/prepack.py): same results as nn.Linear up to summation order, the
same parameters, repacking after an in-place change, autograd untouched, exact decoding still exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.api import MTPModel
from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import apply_gate
from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.models.prepack import PrepackedLinear, prepack_available, prepack_linears

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN")

# oneDNN and MKL sum the 64-term dot products in different orders: float32 rounding of terms of size
# ~1 leaves differences of a few 1e-7 per product; 1e-5 is that with a wide margin, and far below
# any difference a wrong weight, bias or row order would make (those are O(0.1) here).
ATOL = 1e-5


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 7, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_nn_linear_for_one_and_many_rows(shape, bias):
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = linear(x)
        packed = PrepackedLinear(linear)
        got = packed(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert packed.weight is linear.weight and packed.bias is linear.bias  # no copy, no rename


def test_an_in_place_weight_change_is_repacked_and_autograd_runs_plain_linear():
    linear = nn.Linear(32, 16)
    packed = PrepackedLinear(linear)
    x = torch.randn(5, 32)
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # a training step or a load_state_dict would do this in place
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=ATOL, rtol=0)
    out = packed(x)  # grad enabled and the weight requires grad: the autograd path, not the stale-able pack
    out.sum().backward()
    torch.testing.assert_close(linear.weight.grad, torch.ones(16, 1) * x.sum(0, keepdim=True))


def test_prepack_swaps_every_linear_and_keeps_the_state_dict_and_tied_head():
    model, _ = load_model("tiny", seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_prepack_refuses_other_dtypes_with_one_clear_error():
    with pytest.raises(SelfMTPError, match="float32 or bfloat16"):
        load_model("tiny", seed=0, dtype="float16", prepack=True)


# bf16 outputs have 8 mantissa bits: two kernels' float32 accumulators that differ in their last bits round
# to bf16 values 1 ulp apart (2^-8 relative, ~4e-3 at size 1); 2e-2 absolute covers a few ulps of outputs of
# size ~1-3, while a wrong weight, bias or row order moves outputs by O(0.1-1).
BF16_ATOL = 2e-2


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_bf16_prepacked_linear_matches_stock_bf16_for_every_row_count_one_included(rows):
    linear = nn.Linear(64, 48).bfloat16().requires_grad_(False)
    packed = PrepackedLinear(linear)
    x = torch.randn(rows, 64).bfloat16()
    with torch.inference_mode():
        got, expected = packed(x), linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=BF16_ATOL, rtol=0)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    with pytest.MonkeyPatch.context() as patch:  # one row goes through the packed weight too (not F.linear)
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a))
        with torch.inference_mode():
            packed(x)
    assert calls == [1]


def test_bf16_on_a_cpu_is_packed_by_default_and_float32_is_not():
    bf16, _ = load_model("tiny", seed=0, dtype="bfloat16", exact_kernels="auto")
    float32, _ = load_model("tiny", seed=0)
    stock, _ = load_model("tiny", seed=0, dtype="bfloat16", prepack=False)
    assert bf16.selfmtp_decode["prepacked"] and not float32.selfmtp_decode["prepacked"]
    assert not stock.selfmtp_decode["prepacked"]
    # the batch-invariant kernels wrap (and probed) the packed layers: none is left unchunked
    assert not any(type(m) in (nn.Linear, PrepackedLinear) and "inner" not in name
                   for name, m in bf16.named_modules())  # fmt: skip
    assert sum(type(m) is PrepackedLinear for m in bf16.modules()) == sum(type(m) is nn.Linear for m in stock.modules())
    assert not any(type(m) is PrepackedLinear for model in (float32, stock) for m in model.modules())


@pytest.mark.parametrize("head", [False, True])
def test_gated_real_positions_are_still_the_base_model_bit_for_bit(head):
    base, _ = load_model("tiny", seed=0, prepack=True)
    gated, _ = load_model("tiny", seed=0)
    apply_gate(gated, mtp_token_id=mtp_token_id(gated), rank=4, head=head)
    with torch.no_grad():
        for p in gated.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    prepack_linears(gated)  # the gated deltas stay plain; the base linears under them are packed
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    masked = ids.clone()
    masked[:, 8:] = mtp_token_id(gated)
    with torch.no_grad():
        real, mixed = base(masked).logits, gated(masked).logits
    assert torch.equal(real[:, :8], mixed[:, :8])  # same kernels on the same rows: exactly equal
    assert not torch.allclose(real[:, 8:], mixed[:, 8:])


def test_exact_decoding_on_a_prepacked_model_equals_its_static_1_and_the_stock_model():
    # The final norm scaled 40x (as conftest's `peaked`) makes greedy margins ~40x the float noise of
    # a kernel change, so stock and packed kernels pick the same tokens; verify rows feed 2+ tokens
    # (the packed path) where static:1 feeds one (MKL's GEMV), and must still give the same tokens.
    def sharpened(prepack: bool) -> MTPModel:
        model, tokenizer = load_model("tiny", seed=0, prepack=prepack)
        with torch.no_grad():
            model.model.norm.weight.mul_(40.0)
        return MTPModel(model, tokenizer)

    stock, packed = sharpened(False), sharpened(True)
    prompts = ["The quick brown fox", "Once upon a time there was"]
    decode = dict(max_new_tokens=24, chat=False, batch_size=2)
    reference = [r.token_ids for r in stock.generate(prompts, strategy="static:1", **decode)]
    assert [r.token_ids for r in packed.generate(prompts, strategy="static:1", **decode)] == reference
    assert [r.token_ids for r in packed.generate(prompts, strategy="verify:4", **decode)] == reference
    assert [r.token_ids for r in packed.generate(prompts, strategy="static:3", **decode)] != reference


def test_a_linear_made_under_inference_mode_packs_and_runs():
    # inference tensors have no version counter: packing must not read one (a model loaded in inference_mode)
    with torch.inference_mode():
        linear = nn.Linear(32, 16).bfloat16()
        packed = PrepackedLinear(linear)
        x = torch.randn(3, 32).bfloat16()
        torch.testing.assert_close(packed(x).float(), linear(x).float(), atol=BF16_ATOL, rtol=0)
