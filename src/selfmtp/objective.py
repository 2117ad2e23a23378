"""The online ("student forced") self-distillation objective, see METHOD.md "Online objective".

One step: the student runs on the MTP layout and rolls out y' = argmax at every supervised
position (no gradient through the choice); the teacher runs ONCE, without gradient, on the same
layout with mask j of every region replaced by y'_j (causal attention), which gives at x_{i_r} and
at each filled slot P_T(. | x_{1:i_r}, y'_{1:j-1}); targets are its argmax (hard) or the whole
distribution (soft, KL); the loss is averaged over supervised positions.

`<mtp>` is never a valid prediction: its logit is removed from student and teacher distributions.
Targets past the ground-truth EOS are EOS in every mode (the sequence is over there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfmtp.layout import MTPLayout, fill_rollout, model_attention_mask

TEACHER_MODES = ("hard", "soft")
SUPERVISION = ("online", "ground-truth")
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
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, rows, cols) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        implementation = getattr(decoder.config, "_attn_implementation", "sdpa")
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled() else decoder.dtype
        mask = model_attention_mask(attention_mask, implementation, dtype)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).last_hidden_state
        return self.lm.get_output_embeddings()(hidden[rows, cols])


def frozen_teacher(model: nn.Module):
    """Teacher = a separate frozen model (eval mode, no grad)."""
    model.eval().requires_grad_(False)
    head = SelectedLogits(model)

    @torch.no_grad()
    def teacher(input_ids, position_ids, attention_mask, rows, cols):
        return head(input_ids, position_ids, attention_mask, rows, cols)

    return teacher


def adapter_disabled_teacher(peft_model: nn.Module):
    """Teacher = the student's own base weights with its LoRA adapter switched off (one copy)."""
    head = SelectedLogits(peft_model)

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
) -> tuple[torch.Tensor, StepStats]:
    """Loss of one MTP batch and its statistics.

    `student` and `teacher` are callables (input_ids, position_ids, attention_mask, rows, cols) ->
    logits at those positions (`SelectedLogits`, `frozen_teacher`, `adapter_disabled_teacher`).
    The loss is sum / `normalizer` (default: this batch's supervised count), so a trainer can
    normalise by the count of a whole accumulated or distributed batch.
    """
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
    if supervision not in SUPERVISION:
        raise ValueError(f"supervision must be one of {SUPERVISION}, got {supervision!r}")
    if prefix_target not in PREFIX_TARGETS or (prefix_target == "teacher" and supervision != "online"):
        raise ValueError(f"prefix_target must be one of {PREFIX_TARGETS} ('teacher' needs online supervision)")
    n_sup, use_prefix = layout.sup_pos.numel(), prefix_loss_weight > 0
    rows, cols = layout.sup_batch, layout.sup_pos
    if use_prefix:
        rows, cols = torch.cat([rows, layout.ntp_batch]), torch.cat([cols, layout.ntp_pos])
    logits = student(layout.input_ids, layout.position_ids, layout.attention_mask, rows, cols)
    log_probs = torch.log_softmax(_without_mtp(logits, mtp_token_id), dim=-1)
    student_lp, prefix_lp = log_probs[:n_sup], log_probs[n_sup:]
    with torch.no_grad():
        top_lp, rollout = student_lp.max(dim=-1)
    past_eos = layout.sup_past_eos
    eos = torch.full_like(layout.sup_target, eos_token_id if eos_token_id is not None else 0)

    prefix_targets, prefix_teacher_lp = layout.ntp_target, None
    if supervision == "ground-truth":
        targets, per_position = layout.sup_target, -student_lp.gather(1, layout.sup_target[:, None])[:, 0]
    else:
        teacher_ids = fill_rollout(layout, rollout)
        with torch.no_grad():
            # Ground-truth positions see no filled slot, so one teacher pass also scores them.
            t_rows, t_cols = (rows, cols) if use_prefix and prefix_target == "teacher" else (layout.sup_batch, layout.sup_pos)
            t_logits = teacher(teacher_ids, layout.position_ids, layout.teacher_attention_mask, t_rows, t_cols)
            t_logits = _without_mtp(t_logits, mtp_token_id)
            if t_logits.shape[0] > n_sup:
                prefix_teacher_lp = torch.log_softmax(t_logits[n_sup:], dim=-1)
                t_logits, prefix_targets = t_logits[:n_sup], prefix_teacher_lp.argmax(dim=-1)
            targets = torch.where(past_eos, eos, t_logits.argmax(dim=-1))
        if teacher_mode == "hard":
            per_position = -student_lp.gather(1, targets[:, None])[:, 0]
        else:
            with torch.no_grad():
                t_probs = torch.softmax(t_logits, dim=-1)
                t_probs[past_eos] = F.one_hot(eos[past_eos], t_probs.shape[-1]).to(t_probs.dtype)
            # KL(P_T || P_S): zero when the student equals the teacher.
            per_position = (torch.xlogy(t_probs, t_probs) - t_probs * student_lp.masked_fill(t_probs == 0, 0)).sum(-1)

    loss_sum = per_position.sum()
    loss = loss_sum / (normalizer if normalizer is not None else max(n_sup, 1))
    prefix_sum, prefix_agree = torch.zeros((), dtype=loss.dtype), 0
    if use_prefix:
        if prefix_teacher_lp is None:
            prefix_sum = -prefix_lp.gather(1, prefix_targets[:, None])[:, 0].sum()
        else:  # KL(P_T || P_S); <mtp> is -inf in both (0 * -inf terms masked out)
            t_probs = prefix_teacher_lp.exp()
            prefix_sum = (t_probs * (prefix_teacher_lp - prefix_lp).masked_fill(t_probs == 0, 0)).sum()
        prefix_agree = int((prefix_lp.detach().argmax(dim=-1) == prefix_targets).sum())
        denom = prefix_normalizer if prefix_normalizer is not None else max(layout.ntp_pos.numel(), 1)
        loss = loss + prefix_loss_weight * prefix_sum / denom

    stats = _stats(layout, top_lp, rollout, targets, loss_sum, prefix_sum if use_prefix else None, prefix_agree, k_max)
    return loss, stats


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
