"""The trainer end to end on the tiny model: learning, exact resume, accumulation/DDP equivalence,
LoRA with a shared-weight teacher, stock-loadable output, and CLI errors."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import (
    SPLIT_BATCH_ATOL,
    assert_decisive,
    assert_weights_close,
    final_weights,
    gsm8k_style_lines,
    metrics,
    run_ddp,
    tiny_train_config,
)
from selfmtp.cli import main
from selfmtp.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def short_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = train(tiny_train_config(data, out, steps=16, eval_every=8, eval_size=8, save_every=8))
    return out, summary


def mtp_agreement(row: dict) -> float:
    """Mean rollout/teacher agreement over the MTP positions j >= 2."""
    rates = [r for r in row["agreement_by_j"][1:] if r is not None]
    return sum(rates) / len(rates)


def test_short_run_lowers_online_loss_and_raises_agreement(short_run):
    # The random tiny teacher nearly copies its input token (tied embeddings), so its targets are
    # learnable: mask 1 must learn to predict what the teacher says after x_{i_r}. Its next-token
    # argmax is near-uniform and fragile, so j = 1 agreement is not asserted here.
    out, summary = short_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = rows[:3], rows[-3:]

    def mean(values):
        return sum(values) / len(values)

    assert mean([r["loss"] for r in last]) < mean([r["loss"] for r in first]) - 1.0
    assert mean([mtp_agreement(r) for r in last]) > mean([mtp_agreement(r) for r in first]) + 0.1
    assert mean([r["confidence"] for r in last]) > 10 * mean([r["confidence"] for r in first])
    assert "eval_loss" in rows[7] and rows[15]["eval_loss"] < rows[7]["eval_loss"]
    assert len(rows[0]["agreement_by_j"]) == 4
    assert summary["last"]["step"] == 16 and (out / "summary.json").exists()


def test_final_checkpoint_loads_with_stock_transformers(short_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = short_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    assert model.config.mtp_mask_token_id == mtp and model.get_input_embeddings().weight.shape[0] > mtp
    ids = tokenizer("Natalia sold clips", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000008", "step-0000016"]


def test_resume_continues_exactly(data, tmp_path):
    whole = tmp_path / "whole"
    train(tiny_train_config(data, whole, steps=6, save_every=3))
    parts = tmp_path / "parts"
    train(tiny_train_config(data, parts, steps=3, save_every=3))
    train(tiny_train_config(data, parts, steps=6, save_every=3, resume=True))
    assert [r["loss"] for r in metrics(parts)] == [r["loss"] for r in metrics(whole)]
    assert_weights_close(final_weights(parts), final_weights(whole), 0.0)


def test_offline_training_frees_the_teacher_after_relabelling(data, tmp_path, monkeypatch):
    import selfmtp.training.trainer as trainer

    seen = []
    real_loop = trainer._loop
    monkeypatch.setattr(trainer, "_loop", lambda run, *a: seen.append(run.teacher) or real_loop(run, *a))
    train(tiny_train_config(data, tmp_path / "a", steps=1, supervision="offline"))
    train(tiny_train_config(data, tmp_path / "b", steps=1, supervision="offline", prefix_loss=1.0, prefix_target="teacher"))
    assert seen[0] is None and seen[1] is not None  # the KL prefix target still needs it in every step


def test_offline_resume_reuses_the_teacher_targets_and_continues_exactly(data, tmp_path, monkeypatch):
    import selfmtp.training.setup

    mine = tmp_path / "data.jsonl"  # rewritten below, so not the shared fixture file
    mine.write_text(Path(data).read_text())
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny_train_config(str(mine), whole, steps=4, save_every=2, supervision="offline"))
    train(tiny_train_config(str(mine), parts, steps=2, save_every=2, supervision="offline"))
    assert (parts / "teacher_targets.safetensors").is_file()

    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("a resumed run relabelled the data again")

    teachers = []
    real_build = selfmtp.training.setup.build_student_and_teacher
    monkeypatch.setattr(selfmtp.training.setup, "build_student_and_teacher",
                        lambda student, teacher_model, cfg: teachers.append(teacher_model) or real_build(student, teacher_model, cfg))
    monkeypatch.setattr(selfmtp.training.setup, "relabel_with_teacher", no_teacher_pass)
    train(tiny_train_config(str(mine), parts, steps=4, save_every=2, supervision="offline", resume=True))
    assert teachers == [None]  # the cached targets are all it needed from the teacher: not even loaded
    assert [r["loss"] for r in metrics(parts)] == [r["loss"] for r in metrics(whole)]
    assert_weights_close(final_weights(parts), final_weights(whole), 0.0)
    # other rows (the data file rewritten in place) are relabelled, not served stale targets
    mine.write_text(gsm8k_style_lines(40))
    with pytest.raises(AssertionError, match="relabelled the data again"):
        train(tiny_train_config(str(mine), parts, steps=6, save_every=2, supervision="offline", resume=True))


def test_cached_teacher_targets_are_keyed_by_rows_and_teacher(data, tmp_path):
    from selfmtp.models.loading import load_model
    from selfmtp.training.setup import _targets_key, load_rows, read_cached_targets

    _, tokenizer = load_model("tiny")
    rows, _, _ = load_rows(tiny_train_config(data, tmp_path), tokenizer)
    splits = {"train": rows}
    key = _targets_key(splits, "teacher-a")
    targets = torch.arange(rows.input_ids.numel()).view_as(rows.input_ids)
    from safetensors.torch import save_file

    save_file({"train": targets}, str(tmp_path / "cache.safetensors"), metadata={"key": key})
    assert torch.equal(read_cached_targets(tmp_path / "cache.safetensors", splits, key)["train"].targets, targets)
    assert read_cached_targets(tmp_path / "cache.safetensors", splits, _targets_key(splits, "teacher-b")) is None
    assert read_cached_targets(tmp_path / "missing.safetensors", splits, key) is None


def test_resume_refuses_other_settings_or_changed_model_files(data, tmp_path):
    from selfmtp.errors import SelfMTPError
    from selfmtp.models.loading import load_model, save_checkpoint

    out = tmp_path / "run"
    train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine"))
    assert json.loads((out / "run_config.json").read_text())["lr"] == 3e-3
    with pytest.raises(SelfMTPError, match=r"lr: 0.003 -> 0.001"):
        train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine", lr=1e-3, resume=True))
    with pytest.raises(SelfMTPError, match="steps: 2 -> 4"):  # the cosine curve was drawn to step 2
        train(tiny_train_config(data, out, steps=4, save_every=2, lr_schedule="cosine", resume=True))
    train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine", resume=True, keep_checkpoints=3))
    with pytest.raises(SelfMTPError, match="holds_out_eval_rows: False -> True"):  # it would change the train rows
        train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine", resume=True, eval_every=1))
    # a run from an older selfmtp did not record settings added since: they read as their defaults
    record = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({k: v for k, v in record.items() if k not in ("gated", "dtype")}))
    train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine", resume=True))
    with pytest.raises(SelfMTPError, match="gated: False -> True"):  # ... and a different value is still refused
        train(tiny_train_config(data, out, steps=2, save_every=2, lr_schedule="cosine", resume=True, gated=True))

    teacher = tmp_path / "teacher"
    save_checkpoint(*load_model("tiny"), teacher)
    named = tmp_path / "named"
    train(tiny_train_config(data, named, steps=2, save_every=2, teacher=str(teacher)))
    os.utime(teacher / "model.safetensors", ns=(0, 0))  # stands for a checkpoint rewritten in place
    with pytest.raises(SelfMTPError, match="teacher_files"):
        train(tiny_train_config(data, named, steps=4, save_every=2, teacher=str(teacher), resume=True))


def test_grad_accumulation_equals_big_batch(data, tmp_path):
    train(tiny_train_config(data, tmp_path / "big", batch_size=4, steps=2))
    train(tiny_train_config(data, tmp_path / "accum", batch_size=2, grad_accum=2, steps=2))
    for a, b in zip(metrics(tmp_path / "big"), metrics(tmp_path / "accum"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["agreement_by_j"] == b["agreement_by_j"]
    assert_weights_close(final_weights(tmp_path / "big"), final_weights(tmp_path / "accum"), SPLIT_BATCH_ATOL)


# offline: the processes share the relabelling, and a resume takes the cached targets on every process;
# online runs under a CPU budget too large to stop it, so the processes' per-step budget agreement (a collective
# only under a budget) runs as well, and the run still stops at --steps on both
@pytest.mark.parametrize("supervision", ["online", "offline"])
def test_two_process_ddp_equals_one_process_with_double_batch(data, tmp_path, supervision):
    budget = 1e6 if supervision == "online" else None
    ddp = tiny_train_config(data, tmp_path / "ddp", batch_size=2, steps=2, save_every=2, supervision=supervision,
                            cpu_budget=budget)  # fmt: skip
    run_ddp(ddp)
    if supervision == "offline":
        resumed = replace(ddp, steps=3, resume=True)
        run_ddp(resumed)
    steps = 3 if supervision == "offline" else 2
    train(tiny_train_config(data, tmp_path / "single", batch_size=4, steps=steps, supervision=supervision,
                            cpu_budget=budget))  # fmt: skip
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["stopped_by"] == "steps"
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "single"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["supervised"] == b["supervised"]
    assert_weights_close(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), SPLIT_BATCH_ATOL)


def test_lora_shares_weights_with_teacher_and_trains_mtp_row(data, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfmtp.models.loading import load_model

    out = tmp_path / "lora"
    summary = train(tiny_train_config(data, out, lora_rank=4, steps=3, lr=1e-2))
    base, tokenizer = load_model("tiny", seed=0)
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base_embed, merged_embed = base.get_input_embeddings().weight, merged.get_input_embeddings().weight
    assert not torch.equal(base_embed[mtp], merged_embed[mtp])  # <mtp> row trained
    assert torch.equal(base_embed[:mtp], merged_embed[:mtp])  # real token rows untouched
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight)
    total = sum(p.numel() for p in base.parameters())
    assert 0 < summary["trainable_parameters"] < total // 10
    adapter = tmp_path / "adapter"
    train(tiny_train_config(data, adapter, lora_rank=4, steps=3, lr=1e-2, lora_export="adapter"))
    assert (adapter / "final" / "adapter_config.json").exists() and (adapter / "final" / "tokenizer.json").exists()
    # The adapter directory is a model spec of its own: base + adapter, merged = the merged export.
    from_adapter, adapter_tokenizer = load_model(str(adapter / "final"))
    assert adapter_tokenizer.convert_tokens_to_ids("<mtp>") == mtp
    ids = torch.tensor([[5, 300, 41, 7, mtp, mtp, 2000]])
    with torch.no_grad():
        assert (from_adapter(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-5


def test_adapter_dir_with_a_missing_base_is_a_clean_error(tmp_path):
    from selfmtp.errors import SelfMTPError
    from selfmtp.models.loading import load_model

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "selfmtp.json").write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    with pytest.raises(SelfMTPError, match="could not load its base model"):
        load_model(str(tmp_path))
    (tmp_path / "selfmtp.json").write_text("{not json")
    with pytest.raises(SelfMTPError, match="unreadable adapter record"):
        load_model(str(tmp_path))


def test_lora_teacher_is_the_base_model(tiny):
    """The adapter-disabled student must give exactly the original model's logits."""
    import copy

    from peft import LoraConfig, get_peft_model

    from selfmtp.training.objective import SelectedLogits, adapter_disabled_teacher

    model, tokenizer = tiny
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    student = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear",
                                                              trainable_token_indices=[mtp], init_lora_weights=False))
    teacher = adapter_disabled_teacher(student)
    ids = torch.randint(10, 3000, (1, 12))
    pos = torch.arange(12)[None]
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    rows, cols = torch.zeros(12, dtype=torch.long), torch.arange(12)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
        adapted = SelectedLogits(student)(ids, pos, mask, rows, cols)
    assert (teacher(ids, pos, mask, rows, cols) - reference).abs().max() < 1e-5
    assert (adapted - reference).abs().max() > 1e-3


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent.jsonl"], "data file not found"),
    (["--k-sampling", "static"], "needs --static-k"),
    (["--resume"], "no checkpoint to resume"),
    (["--k-max", "0"], "--k-max must be"),
    (["--supervision", "offline", "--teacher", "soft"], "takes --teacher hard"),
])
def test_cli_user_errors(data, tmp_path, capsys, argv, message):
    base = ["train", "--model", "tiny", "--data", data, "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_trains_and_refuses_to_overwrite(data, tmp_path, capsys):
    argv = ["train", "--model", "tiny", "--data", data, "--output", str(tmp_path / "o"), "--no-progress",
            "--steps", "2", "--template", "plain", "--seq-len", "64", "--k-max", "4", "--batch-size", "2", "--json"]
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    try:
        assert main(argv) == 0
        assert not hf_logging.is_progress_bar_enabled()  # --no-progress reaches transformers' own bars
    finally:
        hf_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    output = capsys.readouterr()
    assert json.loads(output.out)["last"]["step"] == 2 and "Loading weights" not in output.err
    assert main(argv) == 2
    assert "already holds a training run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def default_steps(data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("default") / "o"
    train(tiny_train_config(data, out, steps=2, batch_size=2))
    return [r for r in metrics(out) if "loss" in r]


@pytest.mark.parametrize("overrides", [
    {"teacher_mode": "soft"},
    {"supervision": "ground-truth"},
    {"supervision": "offline", "prefix_loss": 1.0, "prefix_target": "teacher"},
    {"block_attention": "bidirectional"},
    {"k_sampling": "static", "static_k": 2},
    {"prefix_loss": 0.5},
])
def test_ablation_settings_train_end_to_end(data, tmp_path, overrides, default_steps):
    out = tmp_path / "o"
    train(tiny_train_config(data, out, steps=2, batch_size=2, **overrides))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["loss"] > 0 and ("prefix_loss" in rows[-1]) == ("prefix_loss" in overrides)
    # The setting reaches what the trainer computes: same seed, so the same rows (and, but for
    # static k, the same regions), yet another loss than the default hard/causal/online run, at the
    # first step or (a prefix loss, logged apart, only changes the update) at the second. Float noise
    # on a mean loss of ~10 is ~1e-6; an ignored setting gives the default losses to that noise. The
    # smallest real change, bidirectional blocks on the near-uniform tiny model, is 2.5e-4 here.
    assert [r["supervised"] for r in rows] == [r["supervised"] for r in default_steps] or "static_k" in overrides
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, default_steps, strict=True)) > 5e-5
    if overrides.get("k_sampling") == "static":
        assert rows[-1]["agreement_by_j"][2:] == [None, None]


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    from selfmtp.training.trainer import lr_multiplier

    constant = lr_multiplier(TrainConfig(data="x", warmup=4, steps=20))
    cosine = lr_multiplier(TrainConfig(data="x", warmup=4, steps=20, lr_schedule="cosine"))
    assert [constant(s) for s in range(4)] == [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert constant(19) == 1.0 and cosine(4) == 1.0
    assert cosine(12) == pytest.approx(0.5) and cosine(19) == pytest.approx(0.0096, abs=1e-4) and cosine(25) == 0.0
    decay = [cosine(s) for s in range(4, 20)]
    assert decay == sorted(decay, reverse=True)


def test_offline_relabelling_in_batches_equals_one_teacher_pass(peaked):
    """Batches group rows by length and cut them to their longest; every row must get what one pass
    over all rows gives."""
    from selfmtp.training.data import TokenRows
    from selfmtp.training.objective import frozen_teacher, teacher_next_tokens
    from selfmtp.training.setup import relabel_with_teacher

    model, tokenizer = copy.deepcopy(peaked.model), peaked.tokenizer  # frozen_teacher freezes its model
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 20, 5, 14, 20])
    ids = torch.randint(10, 3000, (5, 20), generator=generator) * (torch.arange(20)[None] < lengths[:, None])
    rows = TokenRows(ids, lengths, torch.tensor([2, 3, 1, 4, 2]))
    real = torch.arange(20)[None] < lengths[:, None]
    with torch.no_grad():  # batches of other shapes must not flip an argmax by float noise
        logits = model(input_ids=ids).logits
        logits[..., mtp] = float("-inf")
    assert_decisive(logits[real], "a teacher label")
    teacher = frozen_teacher(model)
    # 40 positions a pass: rows of length 20+20, then 14+9, then 5 (batched by length, longest first)
    relabelled = relabel_with_teacher(rows, teacher, mtp_token_id=mtp, max_tokens=40, device="cpu", progress=False)
    reference = teacher_next_tokens(teacher, ids, lengths, mtp_token_id=mtp)
    assert torch.equal(relabelled.targets[real], reference[real]) and torch.equal(relabelled.input_ids, ids)
    assert not torch.equal(reference[real], ids[real])  # an untrained teacher does not echo the data
    assert torch.equal(relabelled.take([3, 1]).targets, relabelled.targets[[3, 1]])


class FakeCpuClock:
    """Stands for time.process_time in training/budget.py: `setup` CPU seconds at the first step, then
    1.0 per train_step, so the budget's arithmetic is exact, whatever this CPU's speed."""

    def __init__(self, monkeypatch, setup: float):
        import selfmtp.training.budget as budget
        import selfmtp.training.trainer as trainer

        self.now = setup
        real_step = trainer.train_step
        monkeypatch.setattr(budget, "process_cpu_seconds", lambda: self.now)
        monkeypatch.setattr(trainer, "train_step", lambda run, step: self.tick() or real_step(run, step))

    def tick(self) -> None:
        self.now += 1.0


def test_cpu_budget_stops_before_a_step_would_overrun_and_decays_the_cosine_over_it(data, tmp_path, monkeypatch):
    import math

    FakeCpuClock(monkeypatch, setup=5.0)
    out = tmp_path / "run"
    summary = train(tiny_train_config(data, out, steps=100, cpu_budget=9.5, lr_schedule="cosine", save_every=3))
    rows = metrics(out)
    # 5 s set-up, then 1 s per step: after step 4 (9 s) a fifth step would end at 10 > 9.5
    assert [r["cpu_s"] for r in rows] == [6.0, 7.0, 8.0, 9.0]
    assert (summary["steps"], summary["stopped_by"], summary["cpu_s"]) == (4, "cpu_budget", 9.0)
    assert (out / "final" / "model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003", "step-0000004"]  # the last one too
    # step s+1's lr is drawn when step s ends (inside it), from the CPU spent at the boundary before: 0, 5, 6, 7 s
    expected = [3e-3 * 0.5 * (1 + math.cos(math.pi * spent / 9.5)) for spent in (0.0, 5.0, 6.0, 7.0)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)  # float64 arithmetic of the same formula


def test_cpu_budget_counts_earlier_processes_on_resume(data, tmp_path, monkeypatch):
    clock = FakeCpuClock(monkeypatch, setup=5.0)
    out = tmp_path / "run"
    train(tiny_train_config(data, out, steps=100, cpu_budget=9.5, save_every=2))
    clock.now = 5.0  # a new process: its own set-up again
    summary = train(tiny_train_config(data, out, steps=100, cpu_budget=16.5, save_every=2, resume=True))
    # 9 s before (step 4's row) + 5 s set-up = 14; steps 5 and 6 end at 15 and 16, a 7th would pass 16.5
    assert [r["cpu_s"] for r in metrics(out)] == [6.0, 7.0, 8.0, 9.0, 15.0, 16.0]
    assert (summary["resumed_from"], summary["steps"], summary["stopped_by"]) == (4, 6, "cpu_budget")
    clock.now = 5.0  # the budget already spent: a resume trains nothing and exports the same weights
    before = final_weights(out)
    assert train(tiny_train_config(data, out, steps=100, cpu_budget=16.5, save_every=2, resume=True))["steps"] == 6
    assert_weights_close(final_weights(out), before, 0.0)
