"""Setting up a training run: models, data rows, student/teacher wiring (full fine-tuning or LoRA), the
final export.

Full fine-tuning: every student parameter trains; the teacher is a separate frozen model.
LoRA (peft): the student is the base model with adapters on every linear layer plus trainable
`<mtp>` embedding rows (peft `trainable_token_indices`); unless a different teacher is named, the
teacher is the SAME module with the adapter disabled, so the weights exist once in memory.

Gated (`--gated`, models/gated.py): deltas that act only at `<mtp>` positions, so the student's own forward
is the original model at every real position: the online teacher is the student without gradient on the
rollout-filled input, and offline targets are read from the student's forward itself (no teacher copy, no
relabelling pass).

Offline supervision: the training rows are relabelled once with the teacher's next-token choices
(`set_up`), and the relabelled targets are kept in the run folder, where --resume finds them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from selfmtp.files import atomic_dir_write, write_bytes_atomic
from selfmtp.models.adapters import write_base_record
from selfmtp.models.loading import load_model, save_checkpoint
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.progress import progress_bar
from selfmtp.training.data import TokenRows, read_examples, tokenize_examples
from selfmtp.training.objective import (
    adapter_disabled_teacher,
    frozen_teacher,
    gated_teacher,
    teacher_next_tokens,
)


@dataclass
class Setup:
    """What a training run works with. `teacher_model` is a separate teacher module (None with LoRA's
    adapter-disabled teacher, ground truth, or once an offline run no longer needs it); `teacher` is
    the callable the objective uses, None when no step needs one."""

    student: torch.nn.Module
    tokenizer: object
    teacher_model: torch.nn.Module | None
    teacher: object
    train_rows: TokenRows
    eval_rows: TokenRows | None
    data_info: dict


def set_up(config, device, cache: Path, *, resume: bool, teacher_key: str, rank: int = 0, world: int = 1,
           relabel_tokens: int) -> Setup:
    """Load the student and the rows, and the teacher only where something needs it. Offline
    supervision gives the rows the teacher's targets, cached in `cache`; a resumed run whose cache
    matches its rows and `teacher_key` does not load a teacher for them at all."""
    student, tokenizer = load_model(config.model, seed=config.seed, device=device,
                                    attn_implementation=config.attn_implementation)
    train_rows, eval_rows, info = load_rows(config, tokenizer)
    splits = {"train": train_rows} | ({"eval": eval_rows} if eval_rows is not None else {})
    offline = config.supervision == "offline" and not config.gated  # gated: targets come from the forward
    key = _targets_key(splits, teacher_key) if offline else ""
    cached = read_cached_targets(cache, splits, key) if offline and resume else None
    if offline and world > 1 and not _everyone(cached is not None, device):
        cached = None  # relabelling is collective: all processes take the cache or none does
    in_steps = config.supervision == "online" or config.prefix_target == "teacher"
    for_eval = bool(config.teacher and config.eval_every and config.eval_decode_prompts)
    needed = in_steps or for_eval or (offline and cached is None)
    teacher_model = None
    if config.teacher is not None and needed:
        teacher_model, _ = load_model(config.teacher, seed=config.seed, device=device,
                                      attn_implementation=config.attn_implementation)
    elif (config.teacher is None and not config.lora_rank and not config.gated and needed
          and config.supervision != "ground-truth"):
        teacher_model = copy.deepcopy(student)  # the starting checkpoint, frozen
    student, teacher = build_student_and_teacher(student, teacher_model, config)
    if offline:
        if cached is None:
            cached = {name: relabel_with_teacher(rows, teacher, rank=rank, world=world, max_tokens=relabel_tokens,
                                                 mtp_token_id=mtp_token_id(student), device=device,
                                                 progress=config.progress) for name, rows in splits.items()}
            if rank == 0:
                tensors = {name: rows.targets.contiguous() for name, rows in cached.items()}
                write_bytes_atomic(cache, safetensors_bytes(tensors, metadata={"key": key}))
        splits = cached
        if not (in_steps or for_eval):  # all it gives is in the rows now: free its memory for training
            teacher = teacher_model = None
    return Setup(student, tokenizer, teacher_model, teacher, splits["train"], splits.get("eval"), info)


def load_rows(config, tokenizer) -> tuple[TokenRows, TokenRows | None, dict]:
    """(train rows, held-out rows or None, counts): --eval-data, else --eval-size rows held out by seed."""
    read = dict(skip_bad_lines=config.skip_bad_lines, strip_calculator=config.strip_calculator)
    examples, skipped = read_examples(config.data, limit=config.max_examples, **read)
    rows = tokenize_examples(examples, tokenizer, template=config.template, seq_len=config.seq_len)
    info = {"examples": len(examples), "skipped_lines": skipped, "dropped_too_long": rows.dropped}
    if config.eval_data:
        eval_examples, _ = read_examples(config.eval_data, **read)
        eval_rows = tokenize_examples(eval_examples[: config.eval_size], tokenizer, template=config.template,
                                      seq_len=config.seq_len)
        return rows, eval_rows, info
    held_out = min(config.eval_size, len(rows) // 10) if holds_out_eval_rows(config) else 0
    if held_out == 0:
        return rows, None, info
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))
    return rows.take(order[held_out:]), rows.take(order[:held_out]), info


def holds_out_eval_rows(config) -> bool:
    """Whether `load_rows` takes evaluation rows out of the training data (it changes what trains)."""
    return bool(config.eval_every) and not config.eval_data


def build_student_and_teacher(student, teacher_model, config):
    """Returns (student module to train, teacher callable or None). With LoRA and no `teacher_model`
    the teacher is the adapter-disabled student; without LoRA, None means no teacher (ground truth)."""
    from selfmtp.models.gated import is_gated

    teacher = None
    if config.gated:  # gated deltas, models/gated.py: the teacher is the same module with the gate closed
        from selfmtp.models.gated import apply_gate, continue_gated

        if is_gated(student):  # --model names a gated directory: train its deltas further
            continue_gated(student, rank=config.lora_rank, head=config.gated_head)
        else:
            student = apply_gate(student, mtp_token_id=mtp_token_id(student), rank=config.lora_rank,
                                 alpha=config.lora_alpha, head=config.gated_head)
        return student, (gated_teacher(student) if config.supervision == "online" else None)
    if teacher_model is not None:
        if teacher_model.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
            from selfmtp.errors import SelfMTPError

            raise SelfMTPError("the teacher's vocabulary differs from the student's: they must share a tokenizer")
        teacher = frozen_teacher(teacher_model)
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or 2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            trainable_token_indices=[mtp_token_id(student)],
        )
        student = get_peft_model(student, lora)
        if teacher_model is None:
            teacher = adapter_disabled_teacher(student)
    else:
        student.requires_grad_(True)
    return student, teacher


def export_final(student, tokenizer, final_dir: Path, config) -> Path:
    """Full model: a standard checkpoint. LoRA: merged weights (default) or the adapter alone. Gated: the
    gated weights beside a record of the base spec (models/gated.py).

    The config records the trained k_max, the default K of the exact `verify` strategy."""
    from selfmtp.models.mtp_token import K_MAX_CONFIG_KEY

    setattr(student.config, K_MAX_CONFIG_KEY, config.k_max)
    if config.gated:
        from selfmtp.models.gated_dir import save_gated_dir
        from selfmtp.models.loading import gated_base_spec

        return save_gated_dir(student, tokenizer, final_dir, base_spec=gated_base_spec(config.model), seed=config.seed,
                              k_max=config.k_max)
    if not config.lora_rank:
        return save_checkpoint(student, tokenizer, final_dir)
    if config.lora_export == "adapter":
        from selfmtp.models.hf_files import write_custom_generate

        def write(tmp: Path) -> None:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_base_record(tmp, config.model)
            write_custom_generate(tmp)  # used once transformers (with peft) or `selfmtp export` makes it a model

        atomic_dir_write(final_dir, write)
        return final_dir
    merged = student.merge_and_unload()
    return save_checkpoint(merged, tokenizer, final_dir)


def relabel_with_teacher(rows: TokenRows, teacher, *, mtp_token_id: int, max_tokens: int, device, rank: int = 0,
                         world: int = 1, progress: bool = True) -> TokenRows:
    """`rows` with `targets` = the teacher's next-token choices (offline supervision), made once before
    training instead of one teacher pass per step. Processes split the batches and share the result.

    Batches hold rows of similar length (longest first) and at most `max_tokens` positions, padding
    included: every position's logits are computed, and with a 128k vocabulary that is what bounds
    memory, not the row count."""
    targets = torch.zeros_like(rows.input_ids)
    batches = _length_sorted_batches(rows.lengths, max_tokens)
    for index in progress_bar(batches[rank::world], desc="teacher targets", disable=not progress or rank != 0):
        part = rows.take(index)
        width = int(part.lengths.max())  # rows are right-padded: skip the all-pad tail
        targets[index, :width] = teacher_next_tokens(
            teacher, part.input_ids[:, :width].to(device), part.lengths.to(device), mtp_token_id=mtp_token_id
        ).cpu()
    if world > 1:  # each row was filled by exactly one process, zeros elsewhere
        targets = targets.to(device)
        dist.all_reduce(targets)
        targets = targets.cpu()
    return replace(rows, targets=targets)


def _length_sorted_batches(lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    order = torch.argsort(lengths, descending=True, stable=True)
    batches, start = [], 0
    while start < len(order):
        size = max(1, max_tokens // max(int(lengths[order[start]]), 1))  # the first row is the longest
        batches.append(order[start:start + size])
        start += size
    return batches


def _everyone(flag: bool, device) -> bool:
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def read_cached_targets(cache: Path, splits: dict[str, TokenRows], key: str) -> dict[str, TokenRows] | None:
    """The rows with their cached teacher targets, or None when `cache` is missing, damaged, or was made
    from other rows or another teacher (`key`)."""
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), "pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            cached = {name: replace(rows, targets=handle.get_tensor(name)) for name, rows in splits.items()}
    except Exception:  # damaged (safetensors raises its own error types): relabelling rewrites it
        return None
    if any(rows.targets.shape != rows.input_ids.shape for rows in cached.values()):
        return None
    return cached


def _targets_key(splits: dict[str, TokenRows], teacher_key: str) -> str:
    """sha256 of the rows' token ids and lengths and of the teacher's identity."""
    digest = hashlib.sha256(teacher_key.encode())
    for name, rows in sorted(splits.items()):
        digest.update(name.encode())
        for tensor in (rows.input_ids, rows.lengths):
            digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()
