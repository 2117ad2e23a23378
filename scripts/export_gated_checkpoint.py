"""Turn a checkpoint of a `selfmtp train --gated` run into a gated model directory (a `--model` spec), e.g.
to evaluate or commit a run that is still going or was stopped early.

    PYTHONPATH=src python scripts/export_gated_checkpoint.py runs/gated/train --output runs/gated/step-300 [--step 300] [--bf16]

Reads the run's `run_config.json` (base model, seed, rank, alpha), loads the base, applies the gate, loads the
checkpoint's `trainable.safetensors` (which holds exactly the gated weights) and writes the directory that the
finished run's `final/` would be at that step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import apply_gate, is_gated, load_gated_state
from selfmtp.models.gated_dir import save_gated_dir
from selfmtp.models.loading import gated_base_spec, load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training.state import RUN_SETTINGS, STEP_DIR, list_checkpoints


def export(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the training output directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--step", type=int, help="default: the newest checkpoint")
    parser.add_argument("--bf16", action="store_true", help="store the gated weights in bfloat16 (half the size)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        settings = json.loads((run / RUN_SETTINGS).read_text())
    except (OSError, ValueError) as exc:
        raise SelfMTPError(f"{run} is not a readable training run ({run / RUN_SETTINGS}: {exc.__class__.__name__})") from None
    if not isinstance(settings, dict) or not settings.get("gated"):
        raise SelfMTPError(f"{run} is not a --gated run")
    checkpoints = list_checkpoints(run / "checkpoints")
    if args.step is not None:
        checkpoints = [c for c in checkpoints if int(STEP_DIR.match(c.name).group(1)) == args.step]
    if not checkpoints:
        raise SelfMTPError(f"no checkpoint{'' if args.step is None else f' at step {args.step}'} in {run / 'checkpoints'}")
    model, tokenizer = load_model(settings["model"], seed=settings["seed"])
    if not is_gated(model):  # a run that continued a saved gated directory loads gated already
        apply_gate(model, mtp_token_id=mtp_token_id(model), rank=settings["lora_rank"], alpha=settings["lora_alpha"],
                   head=settings.get("gated_head", False))
    load_gated_state(model, load_file(str(checkpoints[-1] / "trainable.safetensors")), where=str(checkpoints[-1]))
    base = gated_base_spec(settings["model"])  # the original model, as the run's own final/ names it
    save_gated_dir(model, tokenizer, args.output, base_spec=base, seed=settings["seed"],
                   k_max=settings.get("k_max"), dtype=torch.bfloat16 if args.bf16 else None)
    print(f"{checkpoints[-1]} -> {args.output}")


def main(argv: list[str] | None = None) -> int:
    """A user mistake (no such run, no checkpoint) is one `selfmtp: error:` line and exit status 2."""
    try:
        export(argv)
    except SelfMTPError as exc:
        print(f"selfmtp: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
