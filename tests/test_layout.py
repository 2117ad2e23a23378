"""The blocked MTP layout against a naive, loop-based reference and against plain causal forwards."""

from __future__ import annotations

import pytest
import torch

from selfmtp.training.layout import (
    assemble_layout,
    build_mtp_layout,
    default_regions,
    fill_rollout,
    model_attention_mask,
    padded_causal_attention,
    regions_for_masks,
    sample_regions,
)

MTP, EOS, PAD = 99, 2, 0


def random_batch(generator, batch=6, n=48, vocab=90):
    """Rows of random tokens (3..vocab) with random prompt/response split; some end with EOS."""
    ids = torch.randint(3, vocab, (batch, n), generator=generator)
    lengths = torch.randint(4, n + 1, (batch,), generator=generator)
    starts = torch.stack([torch.randint(1, int(length) - 1, (1,), generator=generator)[0] for length in lengths])
    with_eos = torch.rand(batch, generator=generator) < 0.6
    for b in range(batch):
        if with_eos[b]:
            ids[b, lengths[b] - 1] = EOS
        ids[b, lengths[b]:] = PAD
    return ids, starts, lengths


def naive_layout(ids, lengths, starts, ks, bidirectional=False):
    """Slots built token by token; attention decided per (query, key) from the METHOD.md rules."""
    rows = []
    for b in range(ids.shape[0]):
        regions = {int(s): (r, int(k)) for r, (s, k) in enumerate(zip(starts[b], ks[b], strict=True)) if k > 0}
        slots = []  # (token, position, kind, gt index or region start, region, j)
        for t in range(int(lengths[b])):
            slots.append((int(ids[b, t]), t, "gt", t, -1, 0))
            if t in regions:
                r, k = regions[t]
                slots += [(MTP, t + j, "mask", t, r, j) for j in range(1, k)]
        rows.append(slots)
    width = max(len(s) for s in rows)
    out_ids = torch.full((len(rows), width), PAD)
    out_pos = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for b, slots in enumerate(rows):
        for q in range(width):
            if q >= len(slots):
                attn[b, 0, q, q] = True
                continue
            token, pos, kind, anchor, region, j = slots[q]
            out_ids[b, q], out_pos[b, q] = token, pos
            for key, (_, _, kkind, kanchor, kregion, kj) in enumerate(slots):
                if kkind == "gt":
                    attn[b, 0, q, key] = kanchor <= anchor
                elif kind == "mask" and kregion == region:
                    attn[b, 0, q, key] = bidirectional or kj <= j
    return out_ids, out_pos, attn


@pytest.mark.parametrize("k_sampling,static_k", [("random", None), ("static", 3), ("static", 1)])
@pytest.mark.parametrize("block_attention", ["causal", "bidirectional"])
def test_layout_matches_naive_reference_over_many_draws(k_sampling, static_k, block_attention):
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        ids, starts, lengths = random_batch(generator)
        layout = build_mtp_layout(
            ids, starts, lengths, k_max=6, regions=3, generator=generator, mtp_token_id=MTP, eos_token_id=EOS,
            pad_token_id=PAD, k_sampling=k_sampling, static_k=static_k, block_attention=block_attention,
        )
        plan_starts = torch.full((ids.shape[0], 3), -1)
        plan_ks = torch.zeros((ids.shape[0], 3), dtype=torch.long)
        for b, r, j in zip(layout.sup_batch.tolist(), layout.sup_region.tolist(), layout.sup_j.tolist(), strict=True):
            plan_ks[b, r] = max(plan_ks[b, r], j)
        for b, r, pos, j in zip(layout.sup_batch, layout.sup_region, layout.sup_pos, layout.sup_j, strict=True):
            if j == 1:
                plan_starts[b, r] = int(layout.position_ids[b, pos])
        ref_ids, ref_pos, ref_attn = naive_layout(ids, lengths, plan_starts, plan_ks, block_attention == "bidirectional")
        assert torch.equal(layout.input_ids, ref_ids)
        assert torch.equal(layout.position_ids, ref_pos)
        assert torch.equal(layout.attention_mask, ref_attn)
        assert torch.equal(layout.teacher_attention_mask, naive_layout(ids, lengths, plan_starts, plan_ks)[2])
        check_supervision(layout, ids, starts, lengths, plan_starts, plan_ks, k_sampling, static_k)


def check_supervision(layout, ids, response_start, lengths, plan_starts, plan_ks, k_sampling, static_k):
    for b in range(ids.shape[0]):
        length, has_eos = int(lengths[b]), bool(ids[b, lengths[b] - 1] == EOS)
        used = [(int(s), int(k)) for s, k in zip(plan_starts[b], plan_ks[b], strict=True) if k > 0]
        assert used == sorted(used)
        for number, (start, k) in enumerate(used):
            assert response_start[b] - 1 <= start <= length - 2  # every target is a response token
            if k_sampling == "static":
                assert k == static_k or (not has_eos and k == length - 1 - start)
            else:
                assert 1 <= k <= 6 and (k >= 2 or not has_eos)
            if has_eos and start + k >= length - 1:  # reaches the EOS: must be the last region
                assert number == len(used) - 1
            if not has_eos:
                assert start + k <= length - 1  # only known tokens are targets
    for b, pos, j, target, past, fill in zip(layout.sup_batch, layout.sup_pos, layout.sup_j, layout.sup_target,
                                             layout.sup_past_eos, layout.sup_fill, strict=True):
        start = int(layout.position_ids[b, pos]) - int(j) + 1
        gt_index = start + int(j)
        assert bool(past) == (gt_index > lengths[b] - 1)
        assert int(target) == (EOS if past else int(ids[b, gt_index]))
        if int(fill) >= 0:
            assert layout.input_ids[b, fill] == MTP and layout.position_ids[b, fill] == start + int(j)


def test_regions_spread_over_long_responses():
    generator = torch.Generator().manual_seed(0)
    n, k_max, response_start = 160, 16, 20
    plan = sample_regions(torch.tensor([response_start] * 4), torch.tensor([n] * 4), torch.zeros(4, dtype=torch.bool),
                          k_max=k_max, regions=default_regions(n, k_max), generator=generator)
    assert default_regions(n, k_max) == 5
    assert (plan.ks > 0).sum(1).tolist() == [5, 5, 5, 5]
    assert len({tuple(s.tolist()) for s in plan.starts}) > 1  # random offsets differ between rows
    # Every prefix ends inside the response (its targets are response tokens), in order, and the
    # regions of a row cover the response: consecutive starts one stride (~ span / 5) apart.
    span = n - 2 - (response_start - 1)
    assert int(plan.starts.min()) >= response_start - 1 and int(plan.starts.max()) <= n - 2
    gaps = plan.starts.diff(dim=1)
    assert (gaps > 0).all() and (gaps >= span // 5 - 1).all() and (plan.starts[:, -1] - plan.starts[:, 0] >= span // 2).all()


@pytest.mark.parametrize(("k_sampling", "static_k"), [("static", 5), ("random", None)])
def test_masks_per_row_gives_about_that_many_masks(k_sampling, static_k):
    generator = torch.Generator().manual_seed(0)
    n, k_max, target = 400, 8, 64
    regions = regions_for_masks(target, k_max, k_sampling=k_sampling, static_k=static_k)
    assert regions == 16  # 64 masks / 4 per region (k - 1 = 4 static; k_max / 2 = 4 for k uniform in [2, 8])
    plan = sample_regions(torch.tensor([10] * 32), torch.tensor([n] * 32), torch.zeros(32, dtype=torch.bool),
                          k_max=k_max, regions=regions, generator=generator, k_sampling=k_sampling, static_k=static_k)
    masks = (plan.ks - 1).clamp(min=0).sum(1).float()
    if k_sampling == "static":
        assert masks.tolist() == [64.0] * 32  # long rows: every region fits whole
    else:  # 512 draws of k - 1 (sd 2.0 each): the mean is 4 +- 0.09, so +-10% is > 4 standard errors
        assert abs(masks.mean().item() - target) < 0.1 * target


def test_sup_context_is_the_ground_truth_token_before_each_target():
    ids, starts, lengths = random_batch(torch.Generator().manual_seed(3))
    layout = build_mtp_layout(ids, starts, lengths, k_max=6, regions=4, generator=torch.Generator().manual_seed(4),
                              mtp_token_id=MTP, eos_token_id=EOS, pad_token_id=PAD)
    b = layout.sup_batch
    # position of the predicting slot is i_r + j - 1 for every j (x_{i_r} for j = 1, mask j - 1 after it)
    before_target = torch.minimum(layout.position_ids[b, layout.sup_pos], lengths[b] - 1)
    assert torch.equal(layout.position_ids[b, layout.sup_context], before_target)
    assert not (layout.input_ids[b, layout.sup_context] == MTP).any()
    assert torch.equal(layout.input_ids[b, layout.sup_context], ids[b, before_target])


def test_fill_rollout_replaces_exactly_the_masks():
    generator = torch.Generator().manual_seed(3)
    ids, starts, lengths = random_batch(generator)
    layout = build_mtp_layout(ids, starts, lengths, k_max=5, regions=2, generator=generator, mtp_token_id=MTP,
                              eos_token_id=EOS, pad_token_id=PAD)
    rollout = torch.arange(layout.sup_pos.numel()) + 1000
    filled = fill_rollout(layout, rollout)
    assert not (filled == MTP).any()
    changed = filled != layout.input_ids
    assert torch.equal(changed, layout.input_ids == MTP)
    keep = layout.sup_fill >= 0
    assert torch.equal(filled[layout.sup_batch[keep], layout.sup_fill[keep]], rollout[keep])


def _tiny_layout(tokenizer, n=40, k_max=6, seed=0, block_attention="causal"):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 2000, (3, n), generator=generator)
    lengths = torch.tensor([n, n - 7, n - 15])
    for b, length in enumerate(lengths):
        ids[b, length - 1] = tokenizer.eos_token_id
        ids[b, length:] = PAD
    starts = torch.tensor([5, 8, 3])
    layout = build_mtp_layout(ids, starts, lengths, k_max=k_max, regions=3, generator=generator,
                              mtp_token_id=tokenizer.convert_tokens_to_ids("<mtp>"),
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=PAD, block_attention=block_attention)
    return ids, lengths, layout


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layout_logits_equal_plain_causal_forward(attn, tiny):
    from selfmtp.models.loading import load_model

    model, tokenizer = load_model("tiny", seed=0, attn_implementation=attn)
    ids, lengths, layout = _tiny_layout(tokenizer)
    assert layout.sup_j.max() >= 3
    with torch.no_grad():
        mask = model_attention_mask(layout.attention_mask, attn)
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids, attention_mask=mask).logits
        for b, length in enumerate(lengths.tolist()):
            plain = model(input_ids=ids[b:b + 1, :length]).logits[0]
            at = layout.gt_positions[b, :length]
            assert (logits[b, at] - plain).abs().max() < 1e-5
        # Each mask block behaves like the masks appended to its prefix in a plain causal forward.
        mtp = tokenizer.convert_tokens_to_ids("<mtp>")
        checked = 0
        for b, pos, r, j, fill in zip(layout.sup_batch, layout.sup_pos, layout.sup_region, layout.sup_j, layout.sup_fill, strict=True):
            if j != 1 or fill < 0:
                continue
            start = int(layout.position_ids[b, pos])
            k = int(((layout.sup_batch == b) & (layout.sup_region == r)).sum())
            checked += 1
            prefix = torch.cat([ids[b, :start + 1], torch.full((k - 1,), mtp)])[None]
            plain = model(input_ids=prefix).logits[0, start:]
            assert (logits[b, pos:pos + k] - plain).abs().max() < 1e-5
        assert checked >= 3


def test_bidirectional_blocks_change_only_masks(tiny):
    model, tokenizer = tiny
    ids, lengths, causal = _tiny_layout(tokenizer)
    _, _, bidir = _tiny_layout(tokenizer, block_attention="bidirectional")
    assert torch.equal(causal.input_ids, bidir.input_ids)
    with torch.no_grad():
        a = model(input_ids=causal.input_ids, position_ids=causal.position_ids, attention_mask=causal.attention_mask).logits
        b = model(input_ids=bidir.input_ids, position_ids=bidir.position_ids, attention_mask=bidir.attention_mask).logits
    gt = causal.input_ids != tokenizer.convert_tokens_to_ids("<mtp>")
    assert (a[gt] - b[gt]).abs().max() < 1e-5
    assert (a[~gt] - b[~gt]).abs().max() > 1e-4


def test_assemble_slices_equal_whole_batch():
    generator = torch.Generator().manual_seed(5)
    ids, starts, lengths = random_batch(generator, batch=4)
    has_eos = ids.gather(1, (lengths - 1)[:, None])[:, 0] == EOS
    plan = sample_regions(starts, lengths, has_eos, k_max=5, regions=2, generator=generator)
    whole = assemble_layout(ids, starts, lengths, plan, mtp_token_id=MTP, eos_token_id=EOS, pad_token_id=PAD)
    half = assemble_layout(ids[2:], starts[2:], lengths[2:], plan.rows(slice(2, 4)), mtp_token_id=MTP,
                           eos_token_id=EOS, pad_token_id=PAD)
    width = half.input_ids.shape[1]
    assert torch.equal(whole.input_ids[2:, :width], half.input_ids)
    assert int(whole.sup_batch.ge(2).sum()) == half.sup_pos.numel()


def test_padded_causal_attention_is_causal_over_real_tokens_and_self_for_pads():
    lengths, width = torch.tensor([5, 2, 0]), 5
    mask = padded_causal_attention(lengths, width)
    assert mask.shape == (3, 1, width, width)
    for b, length in enumerate(lengths.tolist()):
        for q in range(width):
            for k in range(width):
                expected = (k <= q < length) if q < length else (k == q)
                assert bool(mask[b, 0, q, k]) == expected, (b, q, k)
