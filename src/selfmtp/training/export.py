"""`selfmtp export`: a checkpoint of a `selfmtp train --gated` run as a gated model directory (a `--model` spec),
e.g. to evaluate or ship a run that is still going or was stopped early.

Reads the run's `run_config.json` (base model, seed, rank, alpha), loads the base, applies the gate, loads
the checkpoint's `trainable.safetensors` (which holds exactly the gated weights) and writes the directory
that the finished run's `final/` would be at that step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import apply_gate, is_gated, load_gated_state
from selfmtp.models.gated_dir import save_gated_dir
from selfmtp.models.loading import gated_base_spec, load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training.state import RUN_SETTINGS, STEP_DIR, list_checkpoints


def export_gated_checkpoint(run: str | Path, output: str | Path, *, step: int | None = None, bf16: bool = False) -> Path:
    """Write checkpoint `step` (default: the newest) of the gated run in `run` to `output`; returns the checkpoint read."""
    from safetensors.torch import load_file

    run = Path(run)
    try:
        settings = json.loads((run / RUN_SETTINGS).read_text())
    except (OSError, ValueError) as exc:
        raise SelfMTPError(f"{run} is not a readable training run ({run / RUN_SETTINGS}: {exc.__class__.__name__})") from None
    if not isinstance(settings, dict) or not settings.get("gated"):
        raise SelfMTPError(f"{run} is not a --gated run")
    checkpoints = list_checkpoints(run / "checkpoints")
    if step is not None:
        checkpoints = [c for c in checkpoints if int(STEP_DIR.match(c.name).group(1)) == step]
    if not checkpoints:
        raise SelfMTPError(f"no checkpoint{'' if step is None else f' at step {step}'} in {run / 'checkpoints'}")
    model, tokenizer = load_model(settings["model"], seed=settings["seed"])
    if not is_gated(model):  # a run that continued a saved gated directory loads gated already
        apply_gate(model, mtp_token_id=mtp_token_id(model), rank=settings["lora_rank"], alpha=settings["lora_alpha"],
                   head=settings.get("gated_head", False))  # fmt: skip
    load_gated_state(model, load_file(str(checkpoints[-1] / "trainable.safetensors")), where=str(checkpoints[-1]))
    base = gated_base_spec(settings["model"])  # the original model, as the run's own final/ names it
    save_gated_dir(model, tokenizer, output, base_spec=base, seed=settings["seed"],
                   k_max=settings.get("k_max"), dtype=torch.bfloat16 if bf16 else None)  # fmt: skip
    return checkpoints[-1]
