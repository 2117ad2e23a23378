"""How one forward pass is laid out for a batch of rows, and how its logits are read.

Every row feeds its new real tokens right-aligned at a common column (left pads before them),
then its `<mtp>` mask blocks, so the masks of every row sit at the end: one crop of the cache
serves all rows and the proposals are the last logits of every row. Position ids are counted per
row over real tokens only, and an explicit 4-D attention mask hides pads and holes, so each row
sees exactly what it would see alone. `Plan` is what one row feeds; `pass_layout` turns the plans
into model inputs; `attention_mask` builds the mask; `greedy_readout` reads the proposals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """What one row feeds in one pass: real tokens (pending, then `drafts` drafts), then `blocks` mask blocks.

    Every row but an exact one feeds its pending tokens and one block of k-1 masks. `tree`: a block
    after the last pending token and after every draft (decoding/verify.py), else one after the last.
    """

    real: list[int]
    drafts: int
    blocks: int
    n_masks: int
    tree: bool = False

    @property
    def masks(self) -> int:
        return self.blocks * self.n_masks


def pass_layout(plans: list[Plan], real_count: torch.Tensor, pad_id: int, mask_id: int | None):
    """Fed tokens of every row -> input_ids (cpu), position_ids, fed (True = not a pad), within.

    Row i: [pads][real tokens ending at the common column real_width][its mask blocks][fillers up to
    the widest row's masks] (fillers are pads). Position ids continue each row's count of real
    tokens; block b follows real token number b of the checked ones (tree) or the last one and
    continues its position. `within` (batch, width, width) is causal, except that a tree row's
    block sees only its own prefix and itself; None when no row is a tree (plain causal).
    """
    real_width = max(len(p.real) for p in plans)
    width = real_width + max(p.masks for p in plans)
    device = real_count.device
    input_ids = torch.full((len(plans), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(plans), width, dtype=torch.long)
    fed = torch.zeros(len(plans), width, dtype=torch.bool)
    tree = any(p.tree and p.blocks for p in plans)
    within = torch.ones(len(plans), width, width, dtype=torch.bool).tril() if tree else None
    counts = real_count.tolist()
    for i, plan in enumerate(plans):
        first = real_width - len(plan.real)
        input_ids[i, first:real_width] = torch.tensor(plan.real)
        position_ids[i, first:real_width] = torch.arange(counts[i], counts[i] + len(plan.real))
        fed[i, first : real_width + plan.masks] = True
        input_ids[i, real_width : real_width + plan.masks] = mask_id if plan.masks else pad_id
        for b in range(plan.blocks):
            after = real_width - 1 - (plan.drafts - b if plan.tree else 0)  # column of the token the block follows
            start = real_width + b * plan.n_masks
            block = slice(start, start + plan.n_masks)
            position_ids[i, block] = torch.arange(1, plan.n_masks + 1) + counts[i] + after - first
            if plan.tree:
                within[i, block, after + 1 : start] = False  # not the later drafts, not the other blocks
    return input_ids, position_ids.to(device), fed.to(device), within.to(device) if tree else None


def attention_mask(
    key_is_real: torch.Tensor, fed: torch.Tensor, within: torch.Tensor | None = None
) -> torch.Tensor | None:
    """4-D bool mask (batch, 1, fed, cache+fed), True = may attend; None for plain causal without pads.

    Every query sees the real cache columns (pads and holes hidden); among the fed columns it sees
    those `within` (batch, fed, fed) allows, causal when None (a draft tree gives each mask block its
    own prefix only), and never a pad. Every query attends to itself, so a pad's (masked, never read)
    KV stay finite: a NaN there would poison every row that multiplies it by 0.
    """
    if within is None and bool(fed.all()) and bool(key_is_real.all()):
        return None  # no pads anywhere: let the model build its own causal mask
    batch, width = fed.shape
    itself = torch.eye(width, dtype=torch.bool, device=fed.device)
    if within is None:
        within = torch.ones(width, width, dtype=torch.bool, device=fed.device).tril()
    new_keys = (within & fed[:, None, :]) | itself
    past_keys = key_is_real[:, None, :].expand(batch, width, key_is_real.shape[1])
    return torch.cat([past_keys, new_keys.expand(batch, width, width)], dim=2)[:, None]


def greedy_readout(logits: torch.Tensor, mask_id: int | None):
    """(batch, k, vocab) logits -> (confidences, proposals), both (batch, k) on the cpu.

    `<mtp>` is never proposed: fed back as a real token it would only derail an untrained model.
    """
    logits = logits.float()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    confidences, proposals = torch.softmax(logits, dim=-1).max(dim=-1)
    return confidences.cpu(), proposals.cpu()
