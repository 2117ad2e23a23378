"""Checkpoints of an FSDP run: sharded with torch.distributed.checkpoint, and the consolidated export.

A sharded checkpoint `checkpoints/step-NNNNNNN/` holds DCP's `.metadata` and one `__R_0.distcp`
per process (the trainable weights and AdamW states, each process writing its own shards) and
`state.pt` (step, scheduler, RNG, as in state.py). All processes write into one temp directory
that rank 0 renames onto the final name once everyone is done (files.swap_into_place: fsynced, an
existing one moved aside until the new one is durable): it appears complete or not at all.
The processes must share the file system (one node, or a shared mount across nodes).

Resume loads it into the same sharding layout; DCP also reshards when the process count changes,
but `selfmtp train --resume` keeps the world size fixed since the data order depends on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from selfmtp.errors import SelfMTPError
from selfmtp.files import make_dirs, swap_into_place
from selfmtp.training.state import prune_checkpoints

SHARDED_MARKER = ".metadata"  # DCP's index file: what tells a sharded checkpoint from a safetensors one


def _trainable_states(head: torch.nn.Module, optimizer):
    """DCP-ready (model, optimizer) state dicts holding only the trainable weights (the frozen base
    of a LoRA run is the starting checkpoint, which resume loads again)."""
    model_state, optim_state = get_state_dict(head, optimizer)
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_state.items() if k in trainable}, optim_state


def save_sharded_state(root: Path, step: int, head: torch.nn.Module, optimizer, scheduler, *, rank: int,
                       keep: int = 2) -> Path:
    """Collective: every process calls it. Writes `root/step-<step>` atomically."""
    root = Path(root)
    target = root / f"step-{step:07d}"
    tmp = root / f".{target.name}.tmp"  # the same name on every process
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        make_dirs(root)
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = _trainable_states(head, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if rank == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "state.pt")
        swap_into_place(tmp, target)
        prune_checkpoints(root, keep)
    dist.barrier()
    return target


def load_sharded_state(path: Path, head: torch.nn.Module, optimizer, scheduler) -> int:
    """Collective: restore a checkpoint written by `save_sharded_state`; returns its step."""
    path = Path(path)
    if not (path / SHARDED_MARKER).is_file():
        raise SelfMTPError(f"checkpoint {path} was not written by --parallel fsdp: resume it with --parallel ddp")
    model_state, optim_state = _trainable_states(head, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise SelfMTPError(f"cannot read sharded checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    set_state_dict(head, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_MARKER).is_file()


def consolidated_student(head: torch.nn.Module, student: torch.nn.Module, *, rank: int):
    """Collective: the whole student as an ordinary (unsharded, CPU) module on rank 0, None elsewhere.

    The full state dict is gathered to rank 0's CPU one tensor at a time (cpu_offload), and loaded
    into a skeleton built on the meta device, so no process ever holds a second full copy on the GPU."""
    full = get_model_state_dict(head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    from transformers import AutoModelForCausalLM

    lora = hasattr(student, "peft_config")
    base = student.get_base_model() if lora else student
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
        if lora:
            from peft import get_peft_model

            skeleton = get_peft_model(skeleton, student.peft_config["default"])
    shared = {}  # tied weights (embeddings = head): one tensor under several names
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        shared.setdefault(id(tensor), []).append(name)
    skeleton.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, strict=True, assign=True)
    for names in shared.values():  # assign=True gave each name its own copy: share them again
        first = skeleton.get_parameter(names[0])
        for name in names[1:]:
            module, _, attr = name.rpartition(".")
            setattr(skeleton.get_submodule(module), attr, first)
    return skeleton.eval()

