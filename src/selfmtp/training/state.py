"""Resumable training state: trainable weights, optimizer, scheduler and RNG, written atomically.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` that appears complete or not at all:
    trainable.safetensors   every parameter with requires_grad (all of them, or LoRA + <mtp> rows)
    state.pt                step, optimizer and scheduler state dicts, RNG states (torch.save;
                            read back with torch.load(weights_only=True))
Frozen weights are not saved: they are the starting checkpoint, which resume loads again.

Beside the checkpoints, `run_config.json` records the settings a run started with and a fingerprint
of its model files. `--resume` refuses settings that change what the run learns (data, model, loss,
lr curve, seed...): resuming under them would silently train a different run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfmtp.errors import SelfMTPError
from selfmtp.files import atomic_dir_write, write_bytes_atomic

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_training_state(root: str | Path, step: int, model, optimizer, scheduler, *, keep: int = 2) -> Path:
    """Write `root/step-<step>` atomically and durably (files.atomic_dir_write), then keep only the newest
    `keep` checkpoints: older ones go only once the new one is on the disk."""
    root = Path(root)
    target = root / f"step-{step:07d}"
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")

    atomic_dir_write(target, write)
    prune_checkpoints(root, keep)
    return target


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0: delete none). Call only once the newest is
    durable. Each is first renamed to a hidden `.step-N.pruned` (which --resume clears), so a kill in the
    middle of a deletion never leaves a half-deleted `step-N` that looks like a checkpoint."""
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        doomed = old.with_name(f".{old.name}.pruned")
        shutil.rmtree(doomed, ignore_errors=True)  # one a kill left, if no --resume has cleared it
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_training_state(path: str | Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint written by `save_training_state`; returns its step."""
    path = Path(path)
    # Checkpoints appear whole (atomic rename), so a damaged one is the disk's doing, not a crash's.
    damaged = (f"checkpoint {path} is damaged: delete that folder to resume from the checkpoint before it"
               " (or train into a new --output)")
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        step, optimizer_state, scheduler_state, rng = (int(state["step"]), state["optimizer"], state["scheduler"],
                                                       state["rng_cpu"])
    except Exception as exc:
        raise SelfMTPError(f"{damaged} ({type(exc).__name__}: {str(exc)[:200]})") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        raise SelfMTPError(f"checkpoint {path} does not match this model/LoRA setting (different trainable weights)")
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise SelfMTPError(f"{damaged} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return step


RUN_SETTINGS = "run_config.json"
# Where and how a run executes, or what it reports, not what it learns: these may change on resume.
FREE_ON_RESUME = frozenset({
    "output", "resume", "progress", "device", "attn_implementation", "save_every", "keep_checkpoints",
    "eval_every", "eval_decode_prompts", "eval_decode_tokens", "eval_decode_tau", "parallel", "activation_checkpointing",
})  # eval_every only matters through whether rows are held out, which the trainer records on its own


def check_run_settings(out: Path, settings: dict, *, resume: bool, rank: int = 0, defaults: dict | None = None) -> None:
    """A fresh run records `settings` in `out/run_config.json`; a resumed one must match them, except
    FREE_ON_RESUME and `steps` / `cpu_budget` under a constant lr (a cosine curve is drawn to the old ones).
    A setting the record lacks (added to selfmtp after the run started) reads as its value in `defaults`.
    A run from before this record existed gets one now, unchecked."""
    path = Path(out) / RUN_SETTINGS
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
            raise SelfMTPError(f"{path} is damaged ({exc}): it records the settings this run started with; "
                               "restore it, or train into a new --output") from None
        recorded = {**(defaults or {}), **recorded}
        constant = recorded.get("lr_schedule") == settings.get("lr_schedule") == "constant"
        free = FREE_ON_RESUME | ({"steps", "cpu_budget"} if constant else set())
        changed = [f"{key}: {recorded.get(key)!r} -> {settings.get(key)!r}"
                   for key in sorted(set(recorded) | set(settings))
                   if key not in free and recorded.get(key) != settings.get(key)]
        if changed:
            raise SelfMTPError(f"{out} holds a run that started with other settings ({'; '.join(changed)}): "
                               "continue it with the original ones, or train into a new --output")
        return
    if rank == 0:
        write_bytes_atomic(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
