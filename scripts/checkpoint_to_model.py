"""Export a full-parameter training checkpoint (runs/X/checkpoints/step-N) as a model directory.

For measuring a student before its run has finished (the final export only comes at the last step):

    python scripts/checkpoint_to_model.py --run runs/demo/train --step 400 --output /tmp/student-400

Reads the run's run_config.json for the base model, seed and k_max, loads the base with `<mtp>` the
way the trainer did, copies the checkpoint's trainable.safetensors into it (safetensors only: no
pickle is loaded) and writes a standard checkpoint that records k_max (the default K of `verify`).
LoRA runs are refused: their checkpoints hold the adapter only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from selfmtp.decoding.strategies import K_MAX_CONFIG_KEY
from selfmtp.models.loading import load_model, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the training run's output folder")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    run = Path(args.run)
    settings = json.loads((run / "run_config.json").read_text())
    if settings.get("lora_rank"):
        raise SystemExit("a LoRA run's checkpoint holds the adapter only: export it with the trainer")
    weights = load_file(str(run / "checkpoints" / f"step-{args.step:07d}" / "trainable.safetensors"))
    model, tokenizer = load_model(settings["model"], seed=settings["seed"])
    params = dict(model.named_parameters())
    if set(weights) != set(params):
        raise SystemExit(f"checkpoint and model {settings['model']} hold different weights")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    setattr(model.config, K_MAX_CONFIG_KEY, settings["k_max"])
    print(save_checkpoint(model, tokenizer, args.output))


if __name__ == "__main__":
    main()
