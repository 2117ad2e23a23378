"""--parallel fsdp (FSDP2 on gloo, CPU), --dtype bfloat16 and --activation-checkpointing on the tiny model.

Equality tolerance (1e-5 on losses and weights): a 2-process FSDP step computes the same sums as one
process with the double batch, in another order (two half-batch gradients reduce-scattered, vs one);
float32 rounding of that reordering is ~1e-7 per step and stays there over 3 Adam steps (seen:
4e-7 on losses, 3.5e-7 on weights), so 1e-5 fails only on a real difference such as a wrong
normaliser (1/2 of the gradient gives ~1e-3 on weights after one step at lr 3e-3)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import (
    SPLIT_BATCH_ATOL,
    assert_weights_close,
    final_weights,
    metrics,
    run_ddp,
    tiny_train_config,
)
from selfmtp.cli import main
from selfmtp.errors import SelfMTPError
from selfmtp.training.trainer import train


def spawn(cfg, world: int = 2) -> None:
    run_ddp(cfg, world)


def assert_same_run(a: Path, b: Path) -> None:
    for x, y in zip(metrics(a), metrics(b), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["supervised"] == y["supervised"]
    assert_weights_close(final_weights(a), final_weights(b), SPLIT_BATCH_ATOL)


def test_two_process_fsdp_resumed_from_a_sharded_checkpoint_equals_one_process_with_double_batch(data, tmp_path):
    fsdp = tiny_train_config(data, tmp_path / "fsdp", batch_size=2, steps=2, save_every=2, parallel="fsdp")
    spawn(fsdp)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-0000002"
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2
    assert not list(checkpoint.parent.glob(".*"))  # no temp directory left behind
    spawn(replace(fsdp, steps=3, resume=True))
    train(tiny_train_config(data, tmp_path / "single", batch_size=4, steps=3))  # uninterrupted, unsharded
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")

    from transformers import AutoModelForCausalLM  # the consolidated export is a stock checkpoint

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_two_process_fsdp_lora_with_activation_checkpointing_equals_one_process(data, tmp_path):
    # LoRA's teacher is the adapter-disabled student, run through the same sharded root
    spawn(tiny_train_config(data, tmp_path / "fsdp", batch_size=2, steps=3, lora_rank=4, parallel="fsdp",
                 activation_checkpointing=True))
    train(tiny_train_config(data, tmp_path / "single", batch_size=4, steps=3, lora_rank=4))
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # autocast / one-process FSDP with MixedPrecisionPolicy
def test_bfloat16_trains_and_tracks_float32(data, tmp_path, parallel):
    train(tiny_train_config(data, tmp_path / "fp32", steps=4))
    train(tiny_train_config(data, tmp_path / "bf16", steps=4, dtype="bfloat16", parallel=parallel))
    fp32, bf16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per operation); through 2 layers,
    # the head and 4 steps the loss (about 10) moves by ~0.1-0.5%: 2% fails only if bf16 is broken
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.02 * a["loss"]
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.1  # and it learns
    assert final_weights(tmp_path / "bf16")["model.norm.weight"].dtype == torch.float32  # fp32 master weights


@pytest.mark.parametrize("saved, resumed, message", [  # each message names the mode that wrote the checkpoint
    ("ddp", "fsdp", "was not written by --parallel fsdp: resume it with --parallel ddp"),
    ("fsdp", "ddp", "was written by --parallel fsdp: resume it with --parallel fsdp"),
])
def test_resume_refuses_a_checkpoint_of_the_other_parallel_mode(data, tmp_path, saved, resumed, message):
    train(tiny_train_config(data, tmp_path / "run", steps=1, save_every=1, parallel=saved))  # one process
    with pytest.raises(SelfMTPError, match=re.escape(message)):
        train(tiny_train_config(data, tmp_path / "run", steps=2, resume=True, parallel=resumed))


@pytest.mark.parametrize("extra, message", [
    (["--parallel", "fsdp", "--eval-decode-prompts", "2"], "not with --parallel fsdp"),
    (["--dtype", "float16"], "float32 or bfloat16"),
    (["--parallel", "fsdp", "--gated"], "--gated does not run under --parallel fsdp"),
])
def test_cli_parallel_user_errors(data, tmp_path, capsys, extra, message):
    argv = ["train", "--model", "tiny", "--data", data, "--output", str(tmp_path / "o"), "--steps", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfmtp: error:") and message in err
