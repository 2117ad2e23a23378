"""The online objective against independent plain causal forwards of student and teacher."""

from __future__ import annotations

import copy

import pytest
import torch

from selfmtp.training.layout import build_mtp_layout
from selfmtp.training.objective import SelectedLogits, frozen_teacher, mtp_loss, teacher_next_tokens


def make_layout(tokenizer, *, k_sampling="random", static_k=None, k_max=5, seed=0, block_attention="causal",
                relabel=None):
    """Two GT rows (one padded after EOS) and a layout over them; `relabel(ids, lengths)` gives its targets."""
    generator = torch.Generator().manual_seed(seed)
    n = 40
    ids = torch.randint(10, 3000, (2, n), generator=generator)
    lengths = torch.tensor([n, 30])
    ids[1, 29] = tokenizer.eos_token_id
    ids[1, 30:] = 0
    targets = relabel(ids, lengths) if relabel is not None else None
    return ids, build_mtp_layout(
        ids, torch.tensor([6, 4]), lengths, k_max=k_max, regions=3, generator=generator,
        mtp_token_id=tokenizer.convert_tokens_to_ids("<mtp>"), eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        k_sampling=k_sampling, static_k=static_k, block_attention=block_attention, targets=targets,
    )


def perturbed(model, scale=0.05, seed=1):
    """A student that differs from the teacher (as after some training)."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return student


def loss_of(student, teacher, layout, tokenizer, **kw):
    teacher_fn = frozen_teacher(teacher) if teacher is not None else None
    return mtp_loss(SelectedLogits(student), teacher_fn, layout,
                    mtp_token_id=tokenizer.convert_tokens_to_ids("<mtp>"), eos_token_id=tokenizer.eos_token_id, **kw)


def test_static_k1_step0_soft_loss_is_zero_and_hard_agrees(tiny):
    model, tokenizer = tiny
    _, layout = make_layout(tokenizer, k_sampling="static", static_k=1)
    assert int(layout.sup_j.max()) == 1
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)
    soft, _ = loss_of(student, teacher, layout, tokenizer, teacher_mode="soft")
    assert abs(soft.item()) < 1e-6
    hard, stats = loss_of(student, teacher, layout, tokenizer, teacher_mode="hard")
    assert stats.summary()["agreement"] == 1.0
    # Hard CE against the model's own argmax is its own -log max p (not 0: one-hot target).
    with torch.no_grad():
        logits = SelectedLogits(student)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                         layout.sup_batch, layout.sup_pos)
        logits[:, tokenizer.convert_tokens_to_ids("<mtp>")] = float("-inf")
        expected = -torch.log_softmax(logits, -1).max(-1).values.mean()
    assert abs(hard.item() - float(expected)) < 1e-5


def test_targets_are_teacher_argmax_on_student_rollout(tiny):
    """Reference: per region, the student's plain forward on prefix + masks gives y'; the teacher's
    plain forward on prefix + y' gives the targets; the loss is CE of the student to them."""
    model, tokenizer = tiny
    ids, layout = make_layout(tokenizer, seed=2)
    student, teacher = perturbed(model), copy.deepcopy(model)
    mtp, eos = tokenizer.convert_tokens_to_ids("<mtp>"), tokenizer.eos_token_id
    loss, stats = loss_of(student, teacher, layout, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, r in sorted({(int(b), int(r)) for b, r in zip(layout.sup_batch, layout.sup_region, strict=True)}):
            mine = (layout.sup_batch == b) & (layout.sup_region == r)
            k = int(mine.sum())
            start = int(layout.position_ids[b, layout.sup_pos[mine][0]])
            prefix = ids[b, :start + 1]
            s_logits = student(input_ids=torch.cat([prefix, torch.full((k - 1,), mtp)])[None]).logits[0, start:]
            s_logits[:, mtp] = float("-inf")
            rollout = s_logits.argmax(-1)
            t_logits = teacher(input_ids=torch.cat([prefix, rollout[:-1]])[None]).logits[0, start:]
            t_logits[:, mtp] = float("-inf")
            targets = torch.where(layout.sup_past_eos[mine], torch.tensor(eos), t_logits.argmax(-1))
            total += float(torch.nn.functional.cross_entropy(s_logits, targets, reduction="sum"))
            count += k
    assert count == stats.count and abs(loss.item() - total / count) < 1e-4


def test_ground_truth_supervision_uses_layout_targets(tiny):
    model, tokenizer = tiny
    _, layout = make_layout(tokenizer, seed=3)
    student = perturbed(model)
    loss, stats = loss_of(student, None, layout, tokenizer, supervision="ground-truth")
    with torch.no_grad():
        logits = SelectedLogits(student)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                         layout.sup_batch, layout.sup_pos)
        logits[:, tokenizer.convert_tokens_to_ids("<mtp>")] = float("-inf")
        expected = torch.nn.functional.cross_entropy(logits, layout.sup_target)
    assert abs(loss.item() - float(expected)) < 1e-5
    assert stats.summary()["agreement_by_j"][0] is not None


def test_prefix_loss_adds_weighted_ntp_cross_entropy(tiny):
    model, tokenizer = tiny
    ids, layout = make_layout(tokenizer, seed=4)
    student, teacher = perturbed(model), copy.deepcopy(model)
    base, _ = loss_of(student, teacher, layout, tokenizer)
    with_prefix, stats = loss_of(student, teacher, layout, tokenizer, prefix_loss_weight=0.5)
    with torch.no_grad():
        logits = student(input_ids=ids[0:1]).logits[0, 5:39]  # row 0: response starts at 6, length 40
        ce0 = torch.nn.functional.cross_entropy(logits, ids[0, 6:40], reduction="sum")
        logits = student(input_ids=ids[1:2, :30]).logits[0, 3:29]  # row 1: response starts at 4, length 30
        ce1 = torch.nn.functional.cross_entropy(logits, ids[1, 4:30], reduction="sum")
    expected_prefix = float(ce0 + ce1) / (34 + 26)
    assert stats.prefix_count == 60
    assert abs(with_prefix.item() - base.item() - 0.5 * expected_prefix) < 1e-3


def test_prefix_loss_to_teacher_is_kl_to_the_teachers_plain_distribution(tiny):
    model, tokenizer = tiny
    ids, layout = make_layout(tokenizer, seed=4)
    student, teacher = perturbed(model), perturbed(model, scale=0.03, seed=7)
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    base, _ = loss_of(student, teacher, layout, tokenizer)
    anchored, stats = loss_of(student, teacher, layout, tokenizer, prefix_loss_weight=0.5, prefix_target="teacher")
    kl, agree = 0.0, 0
    with torch.no_grad():
        for row, start, length in ((0, 6, 40), (1, 4, 30)):
            s_logits = student(input_ids=ids[row : row + 1, :length]).logits[0, start - 1 : length - 1]
            t_logits = teacher(input_ids=ids[row : row + 1, :length]).logits[0, start - 1 : length - 1]
            keep = torch.arange(s_logits.shape[-1]) != mtp  # <mtp> is never a prediction
            s_logits, t_logits = s_logits[:, keep], t_logits[:, keep]
            t_lp, s_lp = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
            kl += float(torch.nn.functional.kl_div(s_lp, t_lp, log_target=True, reduction="sum"))
            agree += int((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
    assert stats.prefix_count == 60 and stats.summary()["prefix_agreement"] == agree / 60
    assert 0 < agree < 60  # the perturbed student disagrees somewhere: the check can fail
    assert kl > 0 and abs(anchored.item() - base.item() - 0.5 * kl / 60) < 1e-4
    same, same_stats = loss_of(teacher, teacher, layout, tokenizer, prefix_loss_weight=0.5, prefix_target="teacher")
    assert abs(same_stats.summary()["prefix_loss"]) < 1e-5 and same_stats.summary()["prefix_agreement"] == 1.0
    with pytest.raises(ValueError, match="online"):
        loss_of(student, None, layout, tokenizer, supervision="ground-truth", prefix_loss_weight=0.5,
                prefix_target="teacher")


@pytest.mark.parametrize("teacher_mode", ["hard", "soft"])
def test_teacher_gets_no_gradient_and_never_changes(tiny, teacher_mode):
    model, tokenizer = tiny
    _, layout = make_layout(tokenizer, seed=5)
    student, teacher = perturbed(model), copy.deepcopy(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(2):
        loss, _ = loss_of(student, teacher, layout, tokenizer, teacher_mode=teacher_mode)
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_eager_and_sdpa_give_the_same_loss(tiny):
    from selfmtp.models.loading import load_model

    model, tokenizer = tiny
    eager, _ = load_model("tiny", seed=0, attn_implementation="eager")
    _, layout = make_layout(tokenizer, seed=6)
    # frozen_teacher freezes the teacher it is handed: give it a copy, never the shared fixture
    a, _ = loss_of(perturbed(model), copy.deepcopy(model), layout, tokenizer)
    b, _ = loss_of(perturbed(eager), eager, layout, tokenizer)
    # Eager and SDPA attention sum in a different order: float32 noise ~1e-6 on a loss of ~11 (ln 49k);
    # 1e-4 is 100x that, while a wrong mask changes the loss by >1e-2.
    assert abs(a.item() - b.item()) < 1e-4


def test_offline_targets_are_teacher_argmax_on_the_ground_truth_prefix(tiny):
    """Reference: one plain causal teacher forward over the GT sequence; mask j of region r is
    trained towards the teacher's argmax after x_{1:i_r+j-1} (EOS past the GT end)."""
    model, tokenizer = tiny
    student, teacher = perturbed(model), perturbed(model, scale=0.02, seed=3)
    mtp, eos = tokenizer.convert_tokens_to_ids("<mtp>"), tokenizer.eos_token_id

    def relabel(ids, lengths):
        return teacher_next_tokens(frozen_teacher(teacher), ids, lengths, mtp_token_id=mtp)

    ids, layout = make_layout(tokenizer, seed=7, relabel=relabel)
    _, gt_layout = make_layout(tokenizer, seed=7)  # the same plan over the same rows, GT targets
    assert torch.equal(layout.input_ids, gt_layout.input_ids) and torch.equal(layout.sup_pos, gt_layout.sup_pos)
    loss, stats = loss_of(student, None, layout, tokenizer, supervision="offline")
    with torch.no_grad():
        t_plain = teacher(input_ids=ids).logits  # row 1's pads come after its EOS: causal, unseen
        t_plain[..., mtp] = float("-inf")
        gt_index = layout.position_ids[layout.sup_batch, layout.sup_pos]
        targets = t_plain[layout.sup_batch, gt_index.clamp(max=ids.shape[1] - 1)].argmax(-1)
        targets = torch.where(layout.sup_past_eos, torch.tensor(eos), targets)
        s_logits = SelectedLogits(student)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                           layout.sup_batch, layout.sup_pos)
        s_logits[:, mtp] = float("-inf")
        expected = torch.nn.functional.cross_entropy(s_logits, targets)
    assert abs(loss.item() - float(expected)) < 1e-5
    # ...which differs from both the online targets and the ground truth for this perturbed pair
    online, _ = loss_of(student, teacher, gt_layout, tokenizer, supervision="online")
    gt, _ = loss_of(student, None, gt_layout, tokenizer, supervision="ground-truth")
    assert abs(online.item() - loss.item()) > 1e-4 and abs(gt.item() - loss.item()) > 1e-4
