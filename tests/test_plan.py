"""The memory planner: known configurations, its arithmetic against independent counts, the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import load_script
from selfmtp.cli import main
from selfmtp.training.plan import KNOWN_SHAPES, choose, plan_memory, shape_for_model, shape_for_params

LLAMA_8B = KNOWN_SHAPES["Llama-3.1-8B"]
PAPER = dict(batch_rows=128, seq_len=160)  # the paper's global batch, 128 x 160 tokens


def test_known_shapes_have_their_published_sizes():
    # Published sizes: Llama-3.1-8B 8.03B, Qwen3-4B 4.02B, SmolLM2-135M 134.5M
    assert LLAMA_8B.parameters == pytest.approx(8.03e9, rel=0.005)
    assert KNOWN_SHAPES["Qwen3-4B"].parameters == pytest.approx(4.02e9, rel=0.005)
    assert KNOWN_SHAPES["SmolLM2-135M"].parameters == pytest.approx(134.5e6, rel=0.005)
    assert shape_for_params(8_000_000_000)[0] == "Llama-3.1-8B"


def test_parameter_count_matches_a_real_llama_module(tiny):
    model, _ = tiny
    shape = shape_for_model("tiny")
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    from selfmtp.models.loading import load_model

    model, _ = load_model("tiny", seed=0)  # its own copy: peft changes the module in place
    shape = shape_for_model("tiny")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    adapters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert shape.lora_parameters(4) == adapters + shape.hidden  # + the trainable <mtp> row


def test_8b_full_fine_tuning_with_a_teacher_needs_fsdp_on_four_80gb_gpus():
    ddp = [plan_memory(LLAMA_8B, gpus=4, parallel="ddp", checkpointing=c, grad_accum=32, **PAPER) for c in (0, 1)]
    assert not any(plan.fits(80) for plan in ddp)  # weights + grads + AdamW + teacher alone are > 130 GB
    chosen = choose(LLAMA_8B, gpus=4, gpu_memory_gb=80, **PAPER)
    assert chosen is not None and chosen.parallel == "fsdp" and chosen.fits(80)
    assert plan_memory(LLAMA_8B, gpus=4, parallel="fsdp", **PAPER).parts["teacher"] == 4 * LLAMA_8B.parameters // 4


def test_lora_8b_fits_one_gpu_and_has_no_teacher_copy():
    chosen = choose(LLAMA_8B, gpus=1, gpu_memory_gb=80, batch_rows=16, seq_len=160, lora_rank=16)
    assert chosen is not None and chosen.parts["teacher"] == 0
    assert choose(LLAMA_8B, gpus=1, gpu_memory_gb=80, **PAPER) is None  # full fine-tuning does not


def test_checkpointing_and_smaller_micro_batches_only_lower_activations():
    base = plan_memory(LLAMA_8B, gpus=4, parallel="fsdp", **PAPER)
    ckpt = plan_memory(LLAMA_8B, gpus=4, parallel="fsdp", checkpointing=True, **PAPER)
    accum = plan_memory(LLAMA_8B, gpus=4, parallel="fsdp", grad_accum=4, **PAPER)
    assert ckpt.parts["activations"] < base.parts["activations"] / 4
    assert accum.micro_batch == 8 and accum.parts["activations"] < base.parts["activations"] / 3
    for plan in (ckpt, accum):
        assert {k: v for k, v in plan.parts.items() if k != "activations"} == \
            {k: v for k, v in base.parts.items() if k != "activations"}


def test_cli_plan_prints_a_command_and_json(capsys):
    assert main(["plan", "--params", "8B", "--gpus", "4", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "--parallel fsdp" in out and "torchrun --nproc_per_node 4" in out
    assert main(["plan", "--model", "tiny", "--gpus", "2", "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"]["fits"] and report["shape"]["layers"] == 2


@pytest.mark.parametrize("argv", [["plan", "--gpus", "2"], ["plan", "--params", "lots"],
                                  ["plan", "--params", "8B", "--gpus", "0"]])
def test_cli_plan_user_errors(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("selfmtp: error:")


def _plan_check_script():
    return load_script("plan_check")


def _assert_planned_within_20_percent_of_measured(model, tmp_path, **settings):
    from conftest import gsm8k_style_lines

    data = tmp_path / "data.jsonl"
    data.write_text(gsm8k_style_lines(48))
    for rank in (0, 4):
        result = _plan_check_script().check(model, lora_rank=rank, data=str(data), workdir=tmp_path, **settings)
        for name, part in result["parts"].items():
            if part["measured"] == 0:  # no teacher copy with LoRA: the plan must say 0 too
                assert part["planned"] == 0, name
            else:
                assert 0.8 <= part["ratio"] <= 1.2, (rank, name, part)


def test_plan_matches_a_measured_tiny_training_step(tmp_path):
    # measured: real tensors of a real step (benchmarks/plan_check.py); 20%: the planner's per-token
    # formula leaves out small tensors (RoPE tables, index tensors, LoRA's scaling copies)
    _assert_planned_within_20_percent_of_measured("tiny", tmp_path, batch_size=4, seq_len=128, k_max=4)


@pytest.mark.slow
def test_plan_matches_a_measured_smollm2_training_step(tmp_path):
    _assert_planned_within_20_percent_of_measured("smollm2-135m", tmp_path, batch_size=2, seq_len=160, k_max=16)
