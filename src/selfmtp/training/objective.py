"""The online ("student forced") self-distillation objective, see METHOD.md "Online objective".

One step: the student runs on the MTP layout and rolls out y' = argmax at every supervised
position (no gradient through the choice); the teacher runs ONCE, without gradient, on the same
layout with mask j of every region replaced by y'_j (causal attention), which gives at x_{i_r} and
at each filled slot P_T(. | x_{1:i_r}, y'_{1:j-1}); targets are its argmax (hard) or the whole
distribution (soft, KL); the loss is averaged over supervised positions.

Offline supervision needs no teacher in the step: `teacher_next_tokens` relabels every training row
once with the teacher's next-token choices after the ground-truth prefix, and the layout carries them
as its targets (`assemble_layout(targets=...)`).

`<mtp>` is never a valid prediction: its logit is removed from student and teacher distributions.
Targets past the ground-truth EOS are EOS in every mode (the sequence is over there).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.models.gated import gated_head_logits, gated_token_id, mask_query_attention
from selfmtp.training.layout import MTPLayout, fill_rollout, model_attention_mask, padded_causal_attention

TEACHER_MODES = ("hard", "soft")
# online: the teacher on the student's rollout (the paper). offline: the teacher's argmax after the
# ground-truth prefix x_{1:i_r+j-1}: a distillation dataset of its next-token choices, made once
# (`teacher_next_tokens`), no rollout. ground-truth: x_{i_r+j} itself (no teacher).
SUPERVISION = ("online", "offline", "ground-truth")
# What the prefix loss on ground-truth positions aims at: the next ground-truth token (cross-entropy,
# plain NTP fine-tuning, the paper's ablation) or the teacher's next-token distribution there
# (KL(P_T || P_S): zero at step 0, it holds the student's own next-token predictions, and so ConfAdapt's
# always-accepted first token, where the original model had them).
PREFIX_TARGETS = ("ground-truth", "teacher")


class SelectedLogits(nn.Module):
    """A causal LM that returns logits only at chosen (row, position) pairs.

    The output head over a 49k vocabulary is a large part of a small model's cost; supervised
    positions are a fraction of the layout, so we run the decoder on everything and the head on
    those positions only. It is an nn.Module so DistributedDataParallel can wrap it.

    A gated model (models/gated.py) trains with its attention backward over mask queries only, and its
    real positions are the original model's, constants: the head runs on them without a graph, once per
    distinct position (a region's j = 1 position is also the context of its first target).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, rows, cols) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        implementation = getattr(decoder.config, "_attn_implementation", "sdpa")
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled() else decoder.dtype
        mask = model_attention_mask(attention_mask, implementation, dtype)
        token = gated_token_id(self.lm)
        gated = token is not None and torch.is_grad_enabled()
        with mask_query_attention(self.lm) if gated else nullcontext():
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).last_hidden_state
        if token is None:
            return self.lm.get_output_embeddings()(hidden[rows, cols])
        is_mask = input_ids[rows, cols] == token
        if not gated:
            return gated_head_logits(self.lm, hidden[rows, cols], is_mask)
        return _gated_head(self.lm, hidden, is_mask, rows, cols)


def _gated_head(lm: nn.Module, hidden: torch.Tensor, is_mask: torch.Tensor, rows, cols) -> torch.Tensor:
    """Logits at (rows, cols) of a gated forward: with a graph at mask positions, without one (each distinct
    real position once) elsewhere; in the order asked."""
    where_mask, where_real = is_mask.nonzero().squeeze(1), (~is_mask).nonzero().squeeze(1)
    flat = rows[where_real] * hidden.shape[1] + cols[where_real]
    distinct, inverse = torch.unique(flat, return_inverse=True)
    with torch.no_grad():
        real_in = hidden.reshape(-1, hidden.shape[-1])[distinct]
        real = gated_head_logits(lm, real_in, torch.zeros(len(distinct), dtype=torch.bool, device=hidden.device))[inverse]
    masked_in = hidden[rows[where_mask], cols[where_mask]]
    masked = gated_head_logits(lm, masked_in, torch.ones(len(where_mask), dtype=torch.bool, device=hidden.device))
    order = torch.cat([where_mask, where_real]).argsort()
    return torch.cat([masked, real.to(masked.dtype)])[order]


def frozen_teacher(model: nn.Module, wrap=None):
    """Teacher = `model`, frozen IN PLACE: it is put in eval mode with requires_grad off for good.

    The model becomes the teacher (the trainer hands over one loaded for that role), so freezing it
    for good is the point: no dropout, and no gradient buffers or optimizer can ever reach it. To keep
    a model trainable, pass a copy (`copy.deepcopy(model)`). `wrap(head)` (e.g. FSDP sharding)
    returns the module actually called."""
    model.eval().requires_grad_(False)
    head = SelectedLogits(model)
    if wrap is not None:
        head = wrap(head)

    @torch.no_grad()
    def teacher(input_ids, position_ids, attention_mask, rows, cols):
        return head(input_ids, position_ids, attention_mask, rows, cols)

    return teacher


def gated_teacher(gated_model: nn.Module):
    """Teacher = the gated student itself, without gradient: the student-forced input holds no `<mtp>`, so
    the gate is closed everywhere and this is exactly the original model (one copy of the weights)."""
    head = SelectedLogits(gated_model)

    @torch.no_grad()
    def teacher(input_ids, position_ids, attention_mask, rows, cols):
        return head(input_ids, position_ids, attention_mask, rows, cols)

    return teacher


def adapter_disabled_teacher(peft_model: nn.Module, head: nn.Module | None = None):
    """Teacher = the student's own base weights with its LoRA adapter switched off (one copy).
    `head`: the student's own SelectedLogits module when it is wrapped (FSDP), else a new one."""
    head = head if head is not None else SelectedLogits(peft_model)

    @torch.no_grad()
    def teacher(input_ids, position_ids, attention_mask, rows, cols):
        with peft_model.disable_adapter():
            return head(input_ids, position_ids, attention_mask, rows, cols)

    return teacher


@dataclass
class StepStats:
    """Sums (not means) so micro-batches and processes can be added before dividing."""

    loss_sum: float
    count: int
    prefix_loss_sum: float
    prefix_count: int
    prefix_agree: int  # student argmax == prefix target at ground-truth positions
    confidence_sum: float  # student top-1 probability at MTP positions (j >= 2)
    confidence_count: int
    agree_hits: torch.Tensor  # (k_max,) rollout == target, by j
    agree_count: torch.Tensor  # (k_max,)
    tokens: int

    def as_tensor(self) -> torch.Tensor:
        head = torch.tensor([self.loss_sum, self.count, self.prefix_loss_sum, self.prefix_count, self.prefix_agree,
                             self.confidence_sum, self.confidence_count, self.tokens], dtype=torch.float64)
        return torch.cat([head, self.agree_hits.double(), self.agree_count.double()])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepStats:
        k = (t.numel() - 8) // 2
        v = t.tolist()
        return cls(v[0], int(v[1]), v[2], int(v[3]), int(v[4]), v[5], int(v[6]), t[8:8 + k].long(), t[8 + k:].long(),
                   int(v[7]))

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats.from_tensor(self.as_tensor() + other.as_tensor())

    def summary(self) -> dict:
        rate = [round(h / c, 6) if c else None for h, c in zip(self.agree_hits.tolist(), self.agree_count.tolist(), strict=True)]
        hits, total = int(self.agree_hits.sum()), int(self.agree_count.sum())
        out = {
            "loss": self.loss_sum / max(self.count, 1),
            "confidence": self.confidence_sum / self.confidence_count if self.confidence_count else None,
            "agreement": hits / total if total else None,
            "agreement_by_j": rate,
            "supervised": self.count,
        }
        if self.prefix_count:
            out["prefix_loss"] = self.prefix_loss_sum / self.prefix_count
            out["prefix_agreement"] = self.prefix_agree / self.prefix_count
        return out


def _without_mtp(logits: torch.Tensor, mtp_token_id: int | None) -> torch.Tensor:
    """Float logits with the `<mtp>` column at -inf. In place: a linear layer's backward does not
    need its output, and copying a (positions x vocab) matrix is a visible cost on CPU."""
    logits = logits.float()
    if mtp_token_id is not None and mtp_token_id < logits.shape[-1]:
        logits[:, mtp_token_id] = float("-inf")
    return logits


def mtp_loss(
    student,
    teacher,
    layout: MTPLayout,
    *,
    teacher_mode: str = "hard",
    supervision: str = "online",
    prefix_loss_weight: float = 0.0,
    prefix_target: str = "ground-truth",
    mtp_token_id: int | None = None,
    eos_token_id: int | None = None,
    k_max: int | None = None,
    normalizer: float | None = None,
    prefix_normalizer: float | None = None,
    targets_from_forward: bool = False,
) -> tuple[torch.Tensor, StepStats]:
    """Loss of one MTP batch and its statistics.

    `student` and `teacher` are callables (input_ids, position_ids, attention_mask, rows, cols) ->
    logits at those positions (`SelectedLogits`, `frozen_teacher`, `adapter_disabled_teacher`).
    The loss is sum / `normalizer` (default: this batch's supervised count), so a trainer can
    normalise by the count of a whole accumulated or distributed batch. The optional prefix loss
    adds next-token terms at ground-truth positions, towards the ground truth (the paper's
    ablation) or towards the teacher's own next-token distribution there (`prefix_target="teacher"`,
    KL: it anchors plain k=1 decoding to the original model, whatever text the data holds).
    `targets_from_forward` (gated models, offline): the target of each supervised position is the argmax
    at the GT position before it in the SAME forward, which under the gate is the original model's
    next-token choice: offline supervision with no teacher and no relabelling pass. With
    `teacher_mode="soft"` the loss is KL to the original model's whole distribution there instead.
    """
    _check_modes(teacher_mode, supervision, prefix_target, soft_offline=targets_from_forward)
    n_sup, use_prefix = layout.sup_pos.numel(), prefix_loss_weight > 0
    teacher_prefix = use_prefix and prefix_target == "teacher"
    online = supervision == "online"
    if (online or teacher_prefix) and teacher is None:
        raise ValueError("online supervision and a teacher prefix target need a teacher")
    rows, cols = layout.sup_batch, layout.sup_pos
    if use_prefix:
        rows, cols = torch.cat([rows, layout.ntp_batch]), torch.cat([cols, layout.ntp_pos])
    if targets_from_forward:  # the GT positions before each target: the original model's choices (gated)
        rows, cols = torch.cat([rows, layout.sup_batch]), torch.cat([cols, layout.sup_context])
    logits = _without_mtp(student(layout.input_ids, layout.position_ids, layout.attention_mask, rows, cols), mtp_token_id)
    if targets_from_forward:
        logits, in_forward = logits[: len(rows) - n_sup], logits[len(rows) - n_sup:].detach()
        eos = torch.full_like(layout.sup_target, eos_token_id if eos_token_id is not None else 0)
        layout = replace(layout, sup_target=torch.where(layout.sup_past_eos, eos, in_forward.argmax(dim=-1)))
    log_probs = torch.log_softmax(logits, dim=-1)
    student_lp, prefix_lp = log_probs[:n_sup], log_probs[n_sup:]
    with torch.no_grad():
        top_lp, rollout = student_lp.max(dim=-1)

    t_sup, t_prefix = _teacher_logits(teacher, layout, rollout if online else None, teacher_prefix, mtp_token_id)
    if online:
        eos = torch.full_like(layout.sup_target, eos_token_id if eos_token_id is not None else 0)
        targets = torch.where(layout.sup_past_eos, eos, t_sup.argmax(dim=-1))
        per_position = distillation_loss(student_lp, t_sup, teacher_mode, targets=targets, forced=layout.sup_past_eos)
    elif targets_from_forward and teacher_mode == "soft":  # gated offline: the original model's distribution
        targets = layout.sup_target
        per_position = distillation_loss(student_lp, in_forward, "soft", targets=targets, forced=layout.sup_past_eos)
    else:  # the ground truth, or the teacher's choices the layout was relabelled with (offline)
        targets, per_position = layout.sup_target, -student_lp.gather(1, layout.sup_target[:, None])[:, 0]

    loss_sum = per_position.sum()
    loss = loss_sum / (normalizer if normalizer is not None else max(n_sup, 1))
    prefix_sum, prefix_agree = torch.zeros((), dtype=loss.dtype), 0
    if use_prefix:
        prefix_sum, prefix_agree = _prefix_term(prefix_lp, t_prefix, layout.ntp_target)
        denom = prefix_normalizer if prefix_normalizer is not None else max(layout.ntp_pos.numel(), 1)
        loss = loss + prefix_loss_weight * prefix_sum / denom

    stats = _stats(layout, top_lp, rollout, targets, loss_sum, prefix_sum if use_prefix else None, prefix_agree, k_max)
    return loss, stats


def _teacher_logits(teacher, layout: MTPLayout, rollout, teacher_prefix: bool, mtp_token_id):
    """(teacher logits at the supervised positions or None, at the prefix positions or None) from ONE
    teacher pass. With a `rollout` (online) the pass is on the student-forced layout; ground-truth
    positions never see a mask or a rollout token, so the teacher's logits there are its plain
    next-token predictions either way."""
    if rollout is None and not teacher_prefix:
        return None, None
    wanted = []  # (rows, cols): the supervised positions (online), then the prefix positions
    if rollout is not None:
        wanted.append((layout.sup_batch, layout.sup_pos))
    if teacher_prefix:
        wanted.append((layout.ntp_batch, layout.ntp_pos))
    rows, cols = (torch.cat(part) for part in zip(*wanted, strict=True))
    ids = fill_rollout(layout, rollout) if rollout is not None else layout.input_ids
    with torch.no_grad():
        logits = _without_mtp(teacher(ids, layout.position_ids, layout.teacher_attention_mask, rows, cols), mtp_token_id)
    if rollout is None:
        return None, logits
    n_sup = layout.sup_pos.numel()
    return logits[:n_sup], (logits[n_sup:] if teacher_prefix else None)


def _prefix_term(prefix_lp, t_prefix, ground_truth) -> tuple[torch.Tensor, int]:
    """(summed next-token loss at ground-truth positions, count where the student's argmax is its
    target): KL(P_T || P_S) to the teacher whatever teacher_mode (0 at step 0, no push to sharpen),
    else cross-entropy to the ground truth."""
    if t_prefix is not None:
        total, targets = distillation_loss(prefix_lp, t_prefix, "soft").sum(), t_prefix.argmax(dim=-1)
    else:
        total, targets = -prefix_lp.gather(1, ground_truth[:, None])[:, 0].sum(), ground_truth
    return total, int((prefix_lp.detach().argmax(dim=-1) == targets).sum())


@torch.no_grad()
def teacher_next_tokens(teacher, input_ids: torch.Tensor, lengths: torch.Tensor, *, mtp_token_id: int | None) -> torch.Tensor:
    """Offline targets of right-padded ground-truth rows: out[b, t] is the teacher's argmax after
    x_{0:t-1} for 1 <= t < length (x_t elsewhere). A layout assembled with `targets=out` trains mask j
    of region r towards P_T(. | x_{1:i_r+j-1}); one plain causal teacher pass per row serves every step
    and region plan. `teacher` is a callable like `frozen_teacher`'s; tensors are on its device."""
    batch, n = input_ids.shape
    index = torch.arange(n, device=input_ids.device)
    mask = padded_causal_attention(lengths, n)
    rows, cols = (index[None, :] < lengths[:, None] - 1).nonzero(as_tuple=True)
    logits = _without_mtp(teacher(input_ids, index.expand(batch, n), mask, rows, cols), mtp_token_id)
    out = input_ids.clone()
    out[rows, cols + 1] = logits.argmax(dim=-1)
    return out


def distillation_loss(student_lp, t_logits, teacher_mode: str, *, targets=None, forced=None) -> torch.Tensor:
    """Per-position loss towards the teacher: cross-entropy to its argmax (hard) or KL(P_T || P_S)
    (soft; zero when the student equals the teacher). `targets`/`forced` override the teacher's
    choice at some positions (EOS past the end of a sequence) with a one-hot target."""
    if targets is None:
        targets = t_logits.argmax(dim=-1)
    if teacher_mode == "hard":
        return -student_lp.gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        t_probs = torch.softmax(t_logits, dim=-1)
        if forced is not None:
            t_probs[forced] = F.one_hot(targets[forced], t_probs.shape[-1]).to(t_probs.dtype)
    return (torch.xlogy(t_probs, t_probs) - t_probs * student_lp.masked_fill(t_probs == 0, 0)).sum(-1)


def _check_modes(teacher_mode: str, supervision: str, prefix_target: str, *, soft_offline: bool = False) -> None:
    for value, allowed, name in ((teacher_mode, TEACHER_MODES, "teacher_mode"), (supervision, SUPERVISION, "supervision"),
                                 (prefix_target, PREFIX_TARGETS, "prefix_target")):  # fmt: skip
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if supervision == "offline" and teacher_mode != "hard" and not soft_offline:
        raise ValueError("offline supervision learns the teacher's argmax (hard); soft targets need online or gating")


def _stats(layout, top_lp, rollout, targets, loss_sum, prefix_sum, prefix_agree, k_max) -> StepStats:
    k_max = k_max or (int(layout.sup_j.max()) if layout.sup_j.numel() else 1)
    j0 = (layout.sup_j - 1).cpu()
    agree = (rollout == targets).cpu().long()
    hits = torch.zeros(k_max, dtype=torch.long).index_add_(0, j0, agree)
    count = torch.zeros(k_max, dtype=torch.long).index_add_(0, j0, torch.ones_like(agree))
    mtp = layout.sup_j >= 2
    return StepStats(
        loss_sum=float(loss_sum.detach()),
        count=int(layout.sup_pos.numel()),
        prefix_loss_sum=float(prefix_sum.detach()) if prefix_sum is not None else 0.0,
        prefix_count=int(layout.ntp_pos.numel()) if prefix_sum is not None else 0,
        prefix_agree=prefix_agree,
        confidence_sum=float(top_lp[mtp].exp().sum()),
        confidence_count=int(mtp.sum()),
        agree_hits=hits,
        agree_count=count,
        tokens=layout.num_tokens,
    )
