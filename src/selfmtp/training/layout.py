"""The blocked MTP training layout: many multi-token problems per sequence, one forward pass.

Pure tensor functions (no model), see METHOD.md "Training layout". Given a right-padded batch of
ground-truth (GT) sequences x_0..x_{n-1} we choose regions r with a prefix end i_r and a k_r, and
insert k_r - 1 `<mtp>` tokens right after x_{i_r}:

    GT:      x0 x1 x2 x3 x4 x5 ...
    layout:  x0 x1 x2 m1 m2 x3 x4 x5 ...       (one region: i_r = 2, k_r = 3)
    pos ids: 0  1  2  3  4  3  4  5            (mask j sits at i_r + j; GT keeps its index)

Attention (True = may attend): a GT token sees GT tokens up to itself and no mask; mask j of a
region sees GT tokens up to x_{i_r} and the masks of its own block (j' <= j when causal, all of
them when bidirectional). So GT logits equal a plain causal forward of x, whatever the layout.

Supervision: region r predicts x_{i_r + j} for j = 1..k_r, from the logits at x_{i_r} (j = 1) or at
mask j - 1 (j >= 2). Regions predict response tokens only. EOS convention: the first region whose
span reaches the GT EOS is the last one of its sequence; its targets past the EOS are EOS. A
sequence cut by `seq_len` (no EOS) gets regions shortened to the known tokens.

Sampling (`sample_regions`) and assembly (`assemble_layout`) are separate so that a trainer can
draw one plan for a global batch and assemble any slice of it (grad accumulation, data parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

K_SAMPLING = ("random", "static")
BLOCK_ATTENTION = ("causal", "bidirectional")


@dataclass
class RegionPlan:
    """Per sequence, per region slot: prefix end `starts` (B, M) and `ks` (B, M); k = 0 marks unused."""

    starts: torch.Tensor
    ks: torch.Tensor

    def rows(self, index) -> RegionPlan:
        return RegionPlan(self.starts[index], self.ks[index])

    @property
    def supervised_count(self) -> int:
        return int(self.ks.sum())


@dataclass
class MTPLayout:
    """Everything one forward pass over a blocked MTP batch needs; all tensors share a device."""

    input_ids: torch.Tensor  # (B, L) GT tokens with <mtp> blocks inserted, pad after the end
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool, student attention (True = may attend)
    teacher_attention_mask: torch.Tensor  # (B, 1, L, L) bool, always causal inside a block
    gt_positions: torch.Tensor  # (B, N) layout index of GT token t, -1 for padding
    layout_lengths: torch.Tensor  # (B,) real (non-pad) tokens per layout row
    # One entry per supervised position (S entries):
    sup_batch: torch.Tensor  # row in the batch
    sup_pos: torch.Tensor  # layout index whose logits predict the target
    sup_region: torch.Tensor  # region slot r within its row
    sup_j: torch.Tensor  # 1..k
    sup_target: torch.Tensor  # target x_{i_r + j} of `targets` (default the GT itself; EOS past the end)
    sup_past_eos: torch.Tensor  # bool: target lies after the GT EOS
    sup_fill: torch.Tensor  # layout index of mask j (filled with y'_j for the teacher); -1 for j = k
    sup_context: torch.Tensor  # layout index of GT x_{i_r+j-1} (at most the last real one): under a gate its
    # next-token logits in the same forward are the original model's choice for this target (offline)
    # Plain next-token pairs on GT positions whose target is a response token (prefix loss):
    ntp_batch: torch.Tensor
    ntp_pos: torch.Tensor
    ntp_target: torch.Tensor

    def to(self, device) -> MTPLayout:
        return MTPLayout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        return int(self.layout_lengths.sum())


def default_regions(seq_len: int, k_max: int) -> int:
    """Paper: M = N / (2 k_max) regions per sequence, at least one."""
    return max(1, seq_len // (2 * k_max))


def regions_for_masks(masks_per_row: int, k_max: int, *, k_sampling: str = "random", static_k: int | None = None) -> int:
    """Regions per row that insert about `masks_per_row` masks on average: a denser layout for gated training,
    where only mask positions cost a backward pass. A region holds k - 1 masks: k_max / 2 on average for
    k uniform in [2, k_max], static_k - 1 for static k. Rows too short for that many regions get fewer
    (`sample_regions` places at most one region per response position)."""
    per_region = (static_k - 1) if k_sampling == "static" else k_max / 2
    return max(1, round(masks_per_row / max(per_region, 1)))


def sample_regions(
    response_start: torch.Tensor,
    lengths: torch.Tensor,
    has_eos: torch.Tensor,
    *,
    k_max: int,
    regions: int,
    generator: torch.Generator,
    k_sampling: str = "random",
    static_k: int | None = None,
) -> RegionPlan:
    """Place up to `regions` regions over each response with a random offset and a k per region.

    Prefix ends lie in [response_start - 1, length - 2] (every target is a response token), spread
    with stride span // M from a random offset. k is uniform in [2, k_max] (`random`) or `static_k`.
    A fixed amount of randomness is drawn per row, so a row's plan does not depend on batch order.
    """
    if k_sampling not in K_SAMPLING:
        raise ValueError(f"k_sampling must be one of {K_SAMPLING}, got {k_sampling!r}")
    if k_sampling == "static" and (static_k is None or static_k < 1):
        raise ValueError("static k sampling needs static_k >= 1")
    batch = lengths.shape[0]
    u_offset = torch.rand(batch, generator=generator)
    u_k = torch.rand(batch, regions, generator=generator)
    lo = (response_start - 1).clamp(min=0)
    hi = lengths - 2
    span = (hi - lo + 1).clamp(min=0)
    stride = (span // regions).clamp(min=1)
    offset = (u_offset * stride).long().clamp(max=stride - 1)
    slot = torch.arange(regions)
    starts = lo[:, None] + offset[:, None] + slot[None, :] * stride[:, None]
    valid = starts <= hi[:, None]
    if k_sampling == "random":
        ks = 2 + (u_k * max(k_max - 1, 0)).long().clamp(max=max(k_max - 2, 0)) if k_max >= 2 else torch.ones_like(starts)
    else:
        ks = torch.full_like(starts, static_k)
    eos_index = (lengths - 1)[:, None]
    # Without EOS the tokens past the cut are unknown: shorten the region to the known tokens.
    ks = torch.where(has_eos[:, None], ks, torch.minimum(ks, eos_index - starts))
    # With EOS: the first region whose span reaches the EOS is the last of its row.
    reaches = valid & has_eos[:, None] & (starts + ks >= eos_index)
    earlier_reached = (reaches.long().cumsum(1) - reaches.long()) > 0
    valid = valid & ~earlier_reached
    ks = torch.where(valid, ks, torch.zeros_like(ks))
    starts = torch.where(valid, starts, torch.full_like(starts, -1))
    return RegionPlan(starts, ks)


def assemble_layout(
    input_ids: torch.Tensor,
    response_start: torch.Tensor,
    lengths: torch.Tensor,
    plan: RegionPlan,
    *,
    mtp_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    block_attention: str = "causal",
    targets: torch.Tensor | None = None,
) -> MTPLayout:
    """Insert the mask blocks of `plan` into `input_ids` and build ids, positions, masks, indices.

    `targets` (like `input_ids`) relabels what index t is supervised towards (a teacher's next-token
    choices, `objective.teacher_next_tokens`); by default it is the ground truth itself.
    """
    if block_attention not in BLOCK_ATTENTION:
        raise ValueError(f"block_attention must be one of {BLOCK_ATTENTION}, got {block_attention!r}")
    batch, n = input_ids.shape
    arange_n = torch.arange(n)
    valid = plan.ks > 0
    extra = (plan.ks - 1).clamp(min=0) * valid
    inserted = torch.zeros(batch, n, dtype=torch.long).scatter_add_(1, plan.starts.clamp(min=0), extra)
    gt_positions = arange_n[None, :] + inserted.cumsum(1) - inserted  # masks of x_t come after x_t
    real = arange_n[None, :] < lengths[:, None]
    gt_positions = torch.where(real, gt_positions, torch.full_like(gt_positions, -1))
    layout_lengths = lengths + extra.sum(1)
    width = int(layout_lengths.max()) if batch else 0

    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    pos = torch.zeros(batch, width, dtype=torch.long)
    gt_index = torch.full((batch, width), -1, dtype=torch.long)  # GT index of a GT slot
    anchor = torch.full((batch, width), -1, dtype=torch.long)  # last GT index a slot may see
    block = torch.full((batch, width), -1, dtype=torch.long)  # region slot of a mask

    rows, cols = real.nonzero(as_tuple=True)
    at = gt_positions[rows, cols]
    ids[rows, at], pos[rows, at], gt_index[rows, at], anchor[rows, at] = input_ids[rows, cols], cols, cols, cols

    k_max = int(plan.ks.max()) if plan.ks.numel() else 0
    j = torch.arange(1, max(k_max, 1))  # mask numbers 1..k_max-1
    has_mask = valid[:, :, None] & (j[None, None, :] < plan.ks[:, :, None])
    b_idx, r_idx, j_idx = has_mask.nonzero(as_tuple=True)
    start = plan.starts[b_idx, r_idx]
    at = gt_positions[b_idx, start] + j[j_idx]
    ids[b_idx, at], pos[b_idx, at], anchor[b_idx, at], block[b_idx, at] = mtp_token_id, start + j[j_idx], start, r_idx

    causal = _attention(gt_index, anchor, block, bidirectional=False)
    student = causal if block_attention == "causal" else _attention(gt_index, anchor, block, bidirectional=True)
    sup = _supervised_indices(input_ids if targets is None else targets, lengths, plan, gt_positions, eos_token_id)
    ntp = _next_token_pairs(input_ids, response_start, lengths, gt_positions)
    return MTPLayout(ids, pos, student, causal, gt_positions, layout_lengths, *sup, *ntp)


def padded_causal_attention(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, 1, W, W) attention of plain right-padded rows: the layout's rule with no mask blocks."""
    index = torch.arange(width, device=lengths.device).expand(len(lengths), width)
    real_index = index.masked_fill(index >= lengths[:, None], -1)
    return _attention(real_index, real_index, torch.full_like(index, -1), bidirectional=False)


def _attention(gt_index, anchor, block, *, bidirectional: bool) -> torch.Tensor:
    is_mask = block >= 0
    is_pad = anchor < 0
    width = gt_index.shape[1]
    sees_gt = (gt_index[:, None, :] >= 0) & (gt_index[:, None, :] <= anchor[:, :, None])
    same_block = is_mask[:, :, None] & is_mask[:, None, :] & (block[:, :, None] == block[:, None, :])
    if not bidirectional:
        same_block = same_block & torch.ones(width, width, dtype=torch.bool, device=block.device).tril()
    # A pad query attends to itself only (no empty softmax rows); nobody attends to a pad key.
    pad_self = is_pad[:, :, None] & torch.eye(width, dtype=torch.bool, device=block.device)
    return (sees_gt | same_block | pad_self)[:, None]


def _supervised_indices(targets, lengths, plan: RegionPlan, gt_positions, eos_token_id):
    k_max = int(plan.ks.max()) if plan.ks.numel() else 0
    j = torch.arange(1, k_max + 1)
    supervised = j[None, None, :] <= plan.ks[:, :, None]
    b_idx, r_idx, j_idx = supervised.nonzero(as_tuple=True)
    jj = j[j_idx]
    start = plan.starts[b_idx, r_idx]
    k = plan.ks[b_idx, r_idx]
    pos = gt_positions[b_idx, start] + jj - 1
    target_index = start + jj
    past_eos = target_index > lengths[b_idx] - 1
    target = targets[b_idx, target_index.clamp(max=targets.shape[1] - 1)]
    target = torch.where(past_eos, torch.full_like(target, eos_token_id), target)
    fill = torch.where(jj < k, pos + 1, torch.full_like(pos, -1))
    context = gt_positions[b_idx, torch.minimum(target_index - 1, lengths[b_idx] - 1)]
    return b_idx, pos, r_idx, jj, target, past_eos, fill, context


def _next_token_pairs(input_ids, response_start, lengths, gt_positions):
    t = torch.arange(input_ids.shape[1])[None, :]
    pair = (t >= (response_start - 1).clamp(min=0)[:, None]) & (t <= (lengths - 2)[:, None])
    b_idx, t_idx = pair.nonzero(as_tuple=True)
    return b_idx, gt_positions[b_idx, t_idx], input_ids[b_idx, t_idx + 1]


def build_mtp_layout(
    input_ids: torch.Tensor,
    response_start: torch.Tensor,
    lengths: torch.Tensor,
    *,
    k_max: int,
    regions: int | None,
    generator: torch.Generator,
    mtp_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    k_sampling: str = "random",
    static_k: int | None = None,
    block_attention: str = "causal",
    targets: torch.Tensor | None = None,
) -> MTPLayout:
    """Sample a region plan for this batch and assemble it (CPU tensors in, CPU tensors out)."""
    has_eos = input_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0] == eos_token_id
    plan = sample_regions(
        response_start,
        lengths,
        has_eos & (lengths > 0),
        k_max=k_max,
        regions=regions or default_regions(input_ids.shape[1], k_max),
        generator=generator,
        k_sampling=k_sampling,
        static_k=static_k,
    )
    return assemble_layout(
        input_ids,
        response_start,
        lengths,
        plan,
        mtp_token_id=mtp_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        block_attention=block_attention,
        targets=targets,
    )


def fill_rollout(layout: MTPLayout, rollout: torch.Tensor) -> torch.Tensor:
    """Teacher input: the layout ids with mask j of every region replaced by the student's y'_j.

    `rollout` holds one token per supervised position (same order as `layout.sup_*`); y'_j is the
    prediction made at position j, and it fills the slot right after it (mask j).
    """
    ids = layout.input_ids.clone()
    keep = layout.sup_fill >= 0
    ids[layout.sup_batch[keep], layout.sup_fill[keep]] = rollout[keep].to(ids.dtype)
    return ids


def model_attention_mask(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The boolean layout mask in the form an attention implementation takes as a custom 4D mask.

    transformers passes a 4D mask through unchanged: `sdpa` reads a bool mask, but `eager` ADDS the
    mask to the scores, so it needs 0 where attending is allowed and a large negative elsewhere.
    """
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask
