"""How a run spreads over processes and what precision it computes in.

--parallel ddp   every process holds the whole student (and teacher); DistributedDataParallel
                 averages gradients. With one process it is plain single-device training.
--parallel fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer, then the root
                 (embeddings, final norm, head), for the student and for a separate frozen teacher;
                 each process holds 1/world of every weight, gradient and AdamW state. The LoRA
                 teacher is the adapter-disabled student itself, through the same sharded root.
--dtype bfloat16 FSDP: `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (bf16 compute and
                 all-gathers, fp32 gradient reduction, fp32 master weights); DDP or one process:
                 autocast. The default (None) is bf16 on CUDA and float32 elsewhere.
--activation-checkpointing  transformers' non-reentrant gradient checkpointing per decoder layer.

Both averaging schemes divide the summed gradient by the world size, so the trainer's loss
normaliser (global supervised count / world) gives the gradient of one big batch either way.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from selfmtp.errors import SelfMTPError
from selfmtp.training.objective import SelectedLogits, adapter_disabled_teacher, frozen_teacher

PARALLEL = ("ddp", "fsdp")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_settings(config) -> None:
    """User errors of the parallel/precision settings (called from the trainer's validate)."""
    if config.parallel not in PARALLEL:
        raise SelfMTPError(f"--parallel must be one of {', '.join(PARALLEL)}")
    if config.dtype is not None and config.dtype not in COMPUTE_DTYPES:
        raise SelfMTPError(f"train computes in float32 or bfloat16 (master weights stay float32), not {config.dtype}")
    if config.parallel == "fsdp" and config.gated:  # its teacher would bypass the sharded root; untested
        raise SelfMTPError("--gated does not run under --parallel fsdp yet: use --parallel ddp (gated training keeps "
                           "no teacher copy, so DDP holds one model per device)")
    if config.parallel == "fsdp" and config.eval_decode_prompts:
        raise SelfMTPError("--eval-decode-prompts decodes on one process with the whole model: not with --parallel "
                           "fsdp (decode the exported final/ with `selfmtp bench` instead)")


def compute_dtype(config, device: torch.device) -> torch.dtype:
    if config.dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return COMPUTE_DTYPES[config.dtype]


def autocast(config, device: torch.device):
    """bf16 autocast outside FSDP (FSDP casts through its mixed-precision policy instead)."""
    if config.parallel == "fsdp" or compute_dtype(config, device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def init_process_group(config, device: str) -> bool:
    """Create the process group torchrun describes; FSDP needs one even for a single process.
    Returns whether we created it (and so must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized() or (world == 1 and config.parallel != "fsdp"):
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if world == 1 and "MASTER_ADDR" not in os.environ:  # `selfmtp train --parallel fsdp` without torchrun
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return True


def distribute(student, teacher_model, teacher, config, *, world: int, device: torch.device):
    """(the student's training module, the teacher callable) for `config.parallel`. The optimizer
    must be built after this: fully_shard replaces the student's parameters with sharded ones."""
    head = SelectedLogits(student)
    if config.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.parallel == "fsdp":
        dtype = compute_dtype(config, device)
        policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
        _shard(head, student, policy)
        if teacher_model is not None:
            teacher = frozen_teacher(teacher_model, wrap=lambda root: _shard(root, teacher_model, policy))
        elif config.lora_rank and teacher is not None:
            teacher = adapter_disabled_teacher(student, head=head)  # through the sharded root
        return head, teacher
    if world > 1:
        head = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    return head, teacher


def _shard(root: torch.nn.Module, lm: torch.nn.Module, policy: MixedPrecisionPolicy) -> torch.nn.Module:
    """fully_shard each decoder layer, then `root`, whose forward is what the trainer calls (the
    root's own parameters, embeddings and head, are gathered when it runs)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise SelfMTPError(f"--parallel fsdp: {type(lm).__name__} has no decoder .layers to shard")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    return root


@contextlib.contextmanager
def gradient_sync(head: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if enabled:
        yield
    elif isinstance(head, torch.nn.parallel.DistributedDataParallel):
        with head.no_sync():
            yield
    elif isinstance(head, FSDPModule):
        head.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            head.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(head: torch.nn.Module) -> bool:
    return isinstance(head, FSDPModule)
