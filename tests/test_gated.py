"""Gated MTP weights (models/gated.py): real positions are the base model bit for bit (logits and KV, in the
training layout and in cached decoding), gradients reach mask rows only, training under the gate, and the
gated final/ directory as a model spec (round trip, resume, DDP, clear errors)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics, run_ddp, tiny_train_config
from selfmtp.cli import main as cli_main
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.strategies import Static
from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import apply_gate, gated_state
from selfmtp.models.gated_dir import GATED_WEIGHTS, save_gated_dir
from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training.layout import fill_rollout, model_attention_mask
from selfmtp.training.objective import (
    SelectedLogits,
    frozen_teacher,
    gated_teacher,
    mtp_loss,
    teacher_next_tokens,
)
from selfmtp.training.trainer import TrainConfig, train
from test_objective import make_layout


def gated_tiny(rank: int, *, seed: int = 1, head: bool = False):
    """(base, gated, tokenizer): the tiny model, and a second copy with random non-zero gated deltas (with
    `head`, on the final norm and the output head too; the tiny model's head is tied to its embeddings)."""
    base, tokenizer = load_model("tiny", seed=0)
    gated, _ = load_model("tiny", seed=0)
    apply_gate(gated, mtp_token_id=mtp_token_id(gated), rank=rank, head=head)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gated.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return base, gated, tokenizer


def layout_batch(tokenizer, *, relabel=None):
    """(ids, lengths, layout): test_objective's two GT rows (one padded after EOS) and a layout over them."""
    ids, layout = make_layout(tokenizer, relabel=relabel)
    return ids, torch.tensor([ids.shape[1], 30]), layout


def mtp_token_id_of(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<mtp>")


def forward_with_kv(model, layout):
    out = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                attention_mask=model_attention_mask(layout.attention_mask, "sdpa"), use_cache=True)
    return out.logits, out.past_key_values


def kv_rows(cache, keep: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, keys and values of the positions `keep` (B, L) as (n, heads, dim)."""
    return [t.transpose(1, 2)[keep] for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize(("rank", "head"), [(0, False), (4, False), (0, True), (4, True)])
@pytest.mark.parametrize("grad", [False, True])  # the inference path and the training (mask-rows-only) path
def test_real_positions_are_the_base_model_bit_for_bit_in_the_training_layout(rank, head, grad):
    base, gated, tokenizer = gated_tiny(rank, head=head)
    _, _, layout = layout_batch(tokenizer)
    is_mask = layout.input_ids == mtp_token_id_of(tokenizer)
    assert is_mask.any()
    with torch.no_grad():
        base_logits, base_kv = forward_with_kv(base, layout)
    with torch.set_grad_enabled(grad):
        logits, kv = forward_with_kv(gated, layout)
    assert torch.equal(logits[~is_mask], base_logits[~is_mask])
    for ours, theirs in zip(kv_rows(kv, ~is_mask), kv_rows(base_kv, ~is_mask), strict=True):
        assert torch.equal(ours, theirs)
    # Mask rows differ: the deltas and the gated <mtp> row act there.
    assert (logits[is_mask] - base_logits[is_mask]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("head", [False, True])
def test_real_positions_are_the_base_model_in_cached_decoding(head):
    """Prefill, then a pass of new real tokens plus masks at the tail (the decode loop's shape): logits and
    cache entries of the real tokens are the base model's."""
    base, gated, tokenizer = gated_tiny(4, head=head)
    mask = mtp_token_id_of(tokenizer)
    prompt = torch.tensor([tokenizer.encode("Natalia sold clips to 48 of her friends in April")])
    step = torch.tensor([[11, 12, 13, mask, mask, mask]])
    outs = []
    for model in (base, gated):
        with torch.inference_mode():
            first = model(input_ids=prompt, use_cache=True)
            again = copy.deepcopy(first.past_key_values)  # a pass appends to the cache it is given
            second = model(input_ids=step, past_key_values=first.past_key_values, use_cache=True)
            kept = model(input_ids=step, past_key_values=again, use_cache=True, logits_to_keep=4)
        outs.append((first.logits, second.logits, second.past_key_values))
        # The head's mask rows follow logits_to_keep's slice. Not torch.equal: a 4-row and a 6-row head GEMM
        # round differently once threads split the rows (2.4e-7 seen at 2 threads, logits <= ~10); a delta on
        # the wrong rows moves logits by ~0.1-1 (deltas are 0.2 x randn).
        assert torch.allclose(kept.logits, second.logits[:, -4:], rtol=0, atol=1e-5)
    (b1, b2, b_kv), (g1, g2, g_kv) = outs
    assert torch.equal(b1, g1) and torch.equal(b2[:, :3], g2[:, :3])
    real = torch.ones(1, prompt.shape[1] + step.shape[1], dtype=torch.bool)
    real[:, -3:] = False
    for ours, theirs in zip(kv_rows(g_kv, real), kv_rows(b_kv, real), strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(b2[:, 3:], g2[:, 3:])


def test_static1_of_a_gated_model_is_transformers_greedy_of_the_base():
    base, gated, tokenizer = gated_tiny(0)
    prompts = [tokenizer.encode(text) for text in ("The capital of France is", "x", "Once upon a time, there")]
    results = generate_batch(gated, prompts, Static(1), max_new_tokens=12, pad_token_id=0)
    for prompt, result in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        expected = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == expected


@pytest.mark.parametrize("head", [False, True])
def test_gradients_reach_mask_rows_only_and_a_step_changes_only_gated_weights(head):
    _, gated, tokenizer = gated_tiny(4, head=head)
    _, _, layout = layout_batch(tokenizer)
    is_mask = layout.input_ids == mtp_token_id_of(tokenizer)
    grads = []

    def keep_grad(_module, _args, out):  # every decoder layer's output hidden states
        (out[0] if isinstance(out, tuple) else out).register_hook(grads.append)

    hooks = [layer.register_forward_hook(keep_grad) for layer in gated.model.layers]
    gated.train()
    loss, _ = mtp_loss(SelectedLogits(gated), None, layout, supervision="offline", mtp_token_id=mtp_token_id_of(tokenizer),
                       eos_token_id=tokenizer.eos_token_id, targets_from_forward=True)
    before = {name: t.clone() for name, t in gated.state_dict().items()}
    trainable = [p for p in gated.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert len(grads) == len(gated.model.layers)
    for grad in grads:
        assert torch.equal(grad[~is_mask], torch.zeros_like(grad[~is_mask]))
        assert grad[is_mask].abs().sum() > 0
    optimizer.step()
    after = gated.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == set(gated_state(gated))  # every gated weight, the <mtp> row among them, and nothing else
    assert "gated.mtp_embedding" in changed
    assert ("lm_head.lora_B" in changed and "model.norm.delta" in changed) == head


@pytest.mark.parametrize("rank", [0, 4])
def test_the_gated_head_trains_from_mask_rows_only_and_changes_their_logits_only(rank):
    """A gated head's delta (and the final norm's) get a gradient from the logits of mask rows and none from real
    rows; with the head's delta zeroed, mask logits change and real ones do not."""
    base, gated, tokenizer = gated_tiny(rank, head=True)
    mask = mtp_token_id_of(tokenizer)
    ids = torch.tensor([tokenizer.encode("Natalia sold clips to 48 of her friends") + [mask] * 3])
    is_mask = ids == mask
    head_weights = [p for name, p in gated.named_parameters() if name.startswith(("lm_head.", "model.norm.")) and p.requires_grad]
    assert len(head_weights) == (3 if rank else 2)
    for rows, expect_grad in ((~is_mask, False), (is_mask, True)):
        gated.zero_grad(set_to_none=True)
        logits = gated(input_ids=ids).logits
        logits[rows].square().sum().backward()
        grads = [p.grad for p in head_weights]
        assert all(g is None or not g.any() for g in grads) if not expect_grad else all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        before = gated(input_ids=ids).logits
        for name, p in gated.named_parameters():
            if name.startswith("lm_head.") and not name.endswith("lora_A"):
                p.zero_()
        after = gated(input_ids=ids).logits
        reference = base(input_ids=ids).logits
    assert torch.equal(after[~is_mask], before[~is_mask]) and torch.equal(after[~is_mask], reference[~is_mask])
    assert (after[is_mask] - before[is_mask]).abs().amax(-1).min() > 0


def test_in_forward_targets_are_the_base_models_relabelling():
    """Offline under the gate: targets read from the student's own forward equal a separate relabelling pass
    of the base model (teacher_next_tokens), so loss and agreement match."""
    base, gated, tokenizer = gated_tiny(4)
    teacher = frozen_teacher(base)
    _, _, layout = layout_batch(tokenizer)
    _, _, reference = layout_batch(tokenizer, relabel=lambda ids, lengths: teacher_next_tokens(
        teacher, ids, lengths, mtp_token_id=mtp_token_id_of(tokenizer)))
    common = dict(supervision="offline", mtp_token_id=mtp_token_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        ours, ours_stats = mtp_loss(SelectedLogits(gated), None, layout, targets_from_forward=True, **common)
        theirs, their_stats = mtp_loss(SelectedLogits(gated), None, reference, **common)
    assert torch.equal(ours_stats.agree_hits, their_stats.agree_hits)
    assert abs(ours.item() - theirs.item()) < 1e-5  # same targets; the head ran on more rows (float32 matmul order)
    assert ours_stats.summary()["agreement_by_j"][0] == 1.0  # j = 1 is a real position: the base's own choice


def test_soft_in_forward_targets_are_kl_to_the_base_models_distribution():
    """Offline soft under the gate: the loss is KL(P_base || P_student) with P_base the base model's next-token
    distribution after the ground-truth prefix (a separate base pass here), one-hot EOS past the end."""
    from selfmtp.training.objective import distillation_loss

    base, gated, tokenizer = gated_tiny(4)
    _, _, layout = layout_batch(tokenizer)
    mask = mtp_token_id_of(tokenizer)
    with torch.no_grad():
        loss, stats = mtp_loss(SelectedLogits(gated), None, layout, teacher_mode="soft", supervision="offline",
                               mtp_token_id=mask, eos_token_id=tokenizer.eos_token_id, targets_from_forward=True)
        student = SelectedLogits(gated)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                        layout.sup_batch, layout.sup_pos)
        teacher = frozen_teacher(base)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                       layout.sup_batch, layout.sup_context)
        student[:, mask] = teacher[:, mask] = float("-inf")
        eos = torch.full_like(layout.sup_target, tokenizer.eos_token_id)
        targets = torch.where(layout.sup_past_eos, eos, teacher.argmax(-1))
        expected = distillation_loss(torch.log_softmax(student, -1), teacher, "soft", targets=targets,
                                     forced=layout.sup_past_eos).mean()
    assert abs(loss.item() - expected.item()) < 1e-5  # the same sums over rows in another order (float32)
    assert stats.summary()["agreement_by_j"][0] == 1.0


def test_online_teacher_is_the_base_model_on_the_rollout():
    base, gated, tokenizer = gated_tiny(0)
    _, _, layout = layout_batch(tokenizer)
    rollout = torch.randint(10, 3000, (layout.sup_pos.numel(),), generator=torch.Generator().manual_seed(3))
    filled = fill_rollout(layout, rollout)
    args = (filled, layout.position_ids, layout.teacher_attention_mask, layout.sup_batch, layout.sup_pos)
    assert torch.equal(gated_teacher(gated)(*args), frozen_teacher(base)(*args))


# ---------------------------------------------------------------------------------------------
# Training runs, save/load


def gated_config(data, out: Path, **overrides) -> TrainConfig:
    """The tiny training run with gated LoRA deltas and offline targets (the gated recipe's supervision)."""
    return tiny_train_config(data, out, **{"gated": True, "lora_rank": 4, "supervision": "offline", **overrides})


def gated_weights(out: Path) -> dict:
    return load_file(str(Path(out) / "final" / GATED_WEIGHTS))


@pytest.mark.parametrize("supervision", ["offline", "online"])
def test_gated_run_saves_a_model_spec_that_loads_with_the_gate(data, tmp_path, supervision):
    out = tmp_path / "run"
    train(gated_config(data, out, steps=3, lr=1e-2, supervision=supervision, save_every=3))
    loaded, tokenizer = load_model(str(out / "final"))
    trained = load_file(str(out / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    assert set(trained) == set(gated_state(loaded))
    for name, tensor in gated_state(loaded).items():
        assert torch.equal(tensor, trained[name])
    base, _ = load_model("tiny", seed=0)
    _, _, layout = layout_batch(tokenizer)
    is_mask = layout.input_ids == mtp_token_id_of(tokenizer)
    with torch.no_grad():
        ours, theirs = forward_with_kv(loaded, layout)[0], forward_with_kv(base, layout)[0]
    assert torch.equal(ours[~is_mask], theirs[~is_mask]) and not torch.equal(ours[is_mask], theirs[is_mask])
    # The base itself is untouched: stock transformers still loads and decodes it (no gate, no deltas).
    # final/ holds the deltas, no base weights; its config.json only makes a stock load name `selfmtp export`
    assert not (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "final" / "config.json").read_text())["selfmtp_format"] == "gated"
    assert loaded.config.selfmtp_k_max == 4  # the trained k_max: bare `verify` takes it


def test_export_gated_checkpoint_writes_the_step_with_its_k_max_or_one_error_line(data, tmp_path, capsys):
    def export(argv):  # `selfmtp export RUN ...`
        return cli_main(["export", *argv])

    out = tmp_path / "run"
    train(gated_config(data, out, steps=2, save_every=1, k_max=3))
    assert export([str(out), "--step", "1", "--output", str(tmp_path / "step1")]) == 0
    loaded, _ = load_model(str(tmp_path / "step1"))
    step1 = load_file(str(out / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    assert all(torch.equal(tensor, step1[name]) for name, tensor in gated_state(loaded).items())
    assert loaded.config.selfmtp_k_max == 3
    # a run that continues the exported directory (the next session of a long run) exports too, and names
    # the original base, not the directory it started from
    more = tmp_path / "more"
    train(gated_config(data, more, model=str(tmp_path / "step1"), steps=1, save_every=1, k_max=3))
    assert export([str(more), "--output", str(tmp_path / "more1")]) == 0
    record = json.loads((tmp_path / "more1" / "selfmtp.json").read_text())
    assert record["base_model"] == "tiny"
    continued = load_file(str(more / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    assert all(torch.equal(t, continued[n]) for n, t in gated_state(load_model(str(tmp_path / "more1"))[0]).items())
    capsys.readouterr()
    for run in (out, tmp_path / "none"):  # no checkpoint at that step; no run at all
        assert export([str(run), "--step", "7", "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("selfmtp: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_a_gated_head_run_trains_saves_and_exports_its_head(data, tmp_path):
    """`--gated-head` end to end: final/ and an exported checkpoint carry the head's and norm's deltas (trained:
    non-zero), and load with the gate on them."""
    out = tmp_path / "run"
    train(gated_config(data, out, steps=2, lr=1e-2, save_every=2, gated_head=True))
    assert cli_main(["export", str(out), "--output", str(tmp_path / "exported")]) == 0
    trained = load_file(str(out / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert trained["lm_head.lora_B"].abs().sum() > 0 and trained["model.norm.delta"].abs().sum() > 0
    for directory in (out / "final", tmp_path / "exported"):
        loaded, _ = load_model(str(directory))
        assert loaded.gated.head and set(gated_state(loaded)) == set(trained)
        assert all(torch.equal(t, trained[n]) for n, t in gated_state(loaded).items())


def test_gated_dir_with_a_missing_or_other_base_is_a_clean_error(data, tmp_path):
    out = tmp_path / "run"
    train(gated_config(data, out, steps=1))
    record_path = out / "final" / "selfmtp.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(record | {"base_model": str(tmp_path / "gone")}))
    with pytest.raises(SelfMTPError, match="could not load its base model"):
        load_model(str(out / "final"))
    record_path.write_text(json.dumps(record | {"base_model": "tiny:intermediate=96"}))
    with pytest.raises(SelfMTPError, match="trained on another base"):
        load_model(str(out / "final"))
    record_path.write_text(json.dumps(record | {"base_seed": 5}))  # tiny: same shapes, other weights
    with pytest.raises(SelfMTPError, match="fingerprint mismatch"):
        load_model(str(out / "final"))


def test_gated_resume_continues_exactly(data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(gated_config(data, whole, steps=6, save_every=3))
    train(gated_config(data, parts, steps=3, save_every=3))
    train(gated_config(data, parts, steps=6, save_every=3, resume=True))
    assert [r["loss"] for r in metrics(parts)] == [r["loss"] for r in metrics(whole)]
    ours, theirs = gated_weights(parts), gated_weights(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gated_training_lowers_the_loss(data, tmp_path):
    train(gated_config(data, tmp_path / "run", steps=12, lr=2e-2, lora_rank=0))
    rows = metrics(tmp_path / "run")
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])


def test_two_process_ddp_equals_one_process_with_double_batch(data, tmp_path):
    ddp = gated_config(data, tmp_path / "ddp", batch_size=2, steps=2, save_every=2)
    run_ddp(ddp)
    train(replace(ddp, output=str(tmp_path / "single"), batch_size=4))
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "single"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["supervised"] == b["supervised"]  # float32 sum order
    ours, theirs = gated_weights(tmp_path / "ddp"), gated_weights(tmp_path / "single")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5  # same: gradients summed differently


@pytest.mark.parametrize("head", [False, True])
def test_mask_row_gradients_equal_a_naive_gated_forward(monkeypatch, head):
    """Reference: every row computes base + gate * delta with plain autograd (no detaching, no row selection),
    attention runs once over every query with a graph, and the head runs on every position with one."""
    from contextlib import nullcontext

    from selfmtp.models import gated as gated_module
    from selfmtp.training import objective

    _, model, tokenizer = gated_tiny(4, head=head)
    _, _, layout = layout_batch(tokenizer)
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        loss, _ = mtp_loss(SelectedLogits(model), None, layout, supervision="offline",
                           mtp_token_id=mtp_token_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           targets_from_forward=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    ours = grads()

    def naive_forward(self, x):
        gate = (torch.zeros(self.gate.numel, dtype=x.dtype).index_fill_(0, self.gate.rows, 1.0))
        return self.base(x) + gate.view(*x.shape[:-1], 1) * self.delta_of(x)

    def naive_head(self, x, is_mask):
        return self.base(x) + is_mask.to(x.dtype)[..., None] * self.delta_of(x)

    monkeypatch.setattr(gated_module.GatedLinear, "forward", naive_forward)
    monkeypatch.setattr(gated_module.GatedNorm, "forward", naive_forward)
    monkeypatch.setattr(gated_module.GatedHead, "forward", naive_head)
    monkeypatch.setattr(objective, "mask_query_attention", lambda model: nullcontext())
    monkeypatch.setattr(objective, "_gated_head", lambda lm, hidden, is_mask, rows, cols: gated_module.gated_head_logits(
        lm, hidden[rows, cols], is_mask))
    reference = grads()
    for name, grad in reference.items():
        assert grad.abs().max() > 0
        # float32 sums over different row sets and orders: relative error ~1e-6, far below a wrong gradient
        assert torch.allclose(ours[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(("flags", "message"), [
    (["--gated", "--prefix-loss", "1"], "--gated: the teacher is the original model"),
    (["--gated", "--teacher-model", "tiny"], "--gated: the teacher is the original model"),
    (["--masks-per-row", "32", "--regions", "4"], "--masks-per-row must be >= 1 and replaces --regions"),
    (["--gated-head"], "--gated-head goes with --gated"),
])
def test_cli_user_errors(data, tmp_path, capsys, flags, message):
    from selfmtp.cli import main

    assert main(["train", "--data", data, "--model", "tiny", "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfmtp: error: ") and message in err and len(err.splitlines()) == 1


def test_a_gated_head_round_trips_through_save_and_load(tmp_path):
    """save_gated_dir -> load_model: the head's and norm's deltas come back with the gate on them (the same logits
    everywhere), the head stays tied to the embeddings, and the embeddings are the base's."""
    base, gated, tokenizer = gated_tiny(0, head=True)
    save_gated_dir(gated, tokenizer, tmp_path / "head", base_spec="tiny", seed=0)
    loaded, _ = load_model(str(tmp_path / "head"))
    assert {"lm_head.delta", "model.norm.delta"} <= set(gated_state(loaded))
    assert all(torch.equal(t, gated_state(gated)[n]) for n, t in gated_state(loaded).items())
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, base.get_input_embeddings().weight)
    _, _, layout = layout_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(forward_with_kv(loaded, layout)[0], forward_with_kv(gated, layout)[0])


def test_bf16_export_stores_the_gated_weights_rounded_and_loads_them(tmp_path):
    """What a committed checkpoint holds (`save_gated_dir(dtype=bfloat16)`): the deltas rounded to bf16,
    loaded back into float32 parameters exactly; the base's <mtp> surgery rows are kept in float32."""
    _, gated, tokenizer = gated_tiny(rank=4, head=True)
    save_gated_dir(gated, tokenizer, tmp_path / "bf16", base_spec="tiny", seed=0, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "bf16" / GATED_WEIGHTS))
    deltas = gated_state(gated)
    assert all(stored[name].dtype == torch.bfloat16 for name in deltas)
    assert {t.dtype for name, t in stored.items() if name not in deltas} == {torch.float32}
    loaded, _ = load_model(str(tmp_path / "bf16"))
    for name, tensor in gated_state(loaded).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, deltas[name].to(torch.bfloat16).float())
    assert any(not torch.equal(deltas[n], deltas[n].to(torch.bfloat16).float()) for n in deltas)  # it did round


def test_smollm2_mtp_alias_names_a_packaged_gated_dir_on_the_smollm2_base():
    from selfmtp.models.adapters import base_spec
    from selfmtp.models.gated_dir import is_gated_dir
    from selfmtp.models.loading import ALIASES, parse_model_spec

    assert parse_model_spec("smollm2-135m-mtp").kind == "alias"
    path = ALIASES["smollm2-135m-mtp"]()
    assert is_gated_dir(path) and base_spec(path) == "smollm2-135m"
    assert (path / GATED_WEIGHTS).stat().st_size < 45e6  # committed to git: bf16 LoRA r64 deltas only (39 MB)


def test_a_run_continues_from_a_saved_gated_directory(data, tmp_path):
    """The next session of a long run: `--model DIR --gated` trains DIR's deltas further (no second gate),
    and its final/ still names the original base."""
    train(gated_config(data, tmp_path / "first", steps=2))
    first = gated_weights(tmp_path / "first")
    with pytest.raises(SelfMTPError, match="rank 4 deltas but --lora-rank is 8"):
        train(gated_config(data, tmp_path / "bad", model=str(tmp_path / "first" / "final"), lora_rank=8, steps=1))
    with pytest.raises(SelfMTPError, match="trained without a gated head: drop --gated-head"):
        train(gated_config(data, tmp_path / "bad2", model=str(tmp_path / "first" / "final"), gated_head=True, steps=1))
    train(gated_config(data, tmp_path / "second", model=str(tmp_path / "first" / "final"), steps=1, lr=1e-6))
    second = gated_weights(tmp_path / "second")
    assert set(second) == set(first)
    # one step at lr 1e-6 moves each weight by ~1e-6 (Adam's first step is lr-sized): it started from `first`
    assert all(float((second[k] - first[k]).abs().max()) < 1e-5 for k in first)
    assert any(not torch.equal(second[k], first[k]) for k in first)
    record = json.loads((tmp_path / "second" / "final" / "selfmtp.json").read_text())
    assert record["base_model"] == "tiny"
