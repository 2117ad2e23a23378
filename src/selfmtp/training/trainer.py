"""The online self-distillation trainer: `train(TrainConfig) -> summary dict`.

Per optimizer step: take the next global batch (batch_size x processes x grad_accum rows) from a
seeded epoch-wise shuffle, draw ONE region plan for it from a generator seeded by (seed, step),
and give each (micro-batch, process) its slice. Losses are divided by the supervised count of the
whole global batch, so grad accumulation and data parallel (DDP averages over processes) give
the gradient of one big batch, and the data/plan of a step depends only on (seed, step): resume
needs nothing but weights, optimizer, scheduler and RNG, and the same settings.

Output directory: `final/` (stock-transformers checkpoint, tokenizer with `<mtp>`), `metrics.jsonl`
(one JSON per step), `checkpoints/step-N/`, `run_config.json` (the settings and model-file
fingerprints, which --resume checks), `summary.json`, and with offline supervision
`teacher_targets.safetensors` (the relabelled rows, reused by --resume).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from selfmtp.errors import Interrupted, SelfMTPError
from selfmtp.files import write_json_atomic
from selfmtp.models.loading import model_fingerprint
from selfmtp.progress import progress_bar
from selfmtp.training import parallel
from selfmtp.training.budget import CpuBudget
from selfmtp.training.config import TrainConfig, lr_multiplier, setting_defaults, validate
from selfmtp.training.recovery import (
    StopRequest,
    how_to_continue,
    interrupted,
    prepare_output,
    truncate_metrics,
)
from selfmtp.training.setup import export_final, holds_out_eval_rows, set_up
from selfmtp.training.sharded_state import (
    consolidated_student,
    is_sharded_checkpoint,
    load_sharded_state,
    save_sharded_state,
)
from selfmtp.training.state import (
    check_run_settings,
    load_training_state,
    save_training_state,
)
from selfmtp.training.step import TrainRun, evaluate, prepare_decode_eval, train_step

RELABEL_TOKENS = 8192  # positions per teacher pass when relabelling for offline supervision


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group) from torchrun's env."""
    device, world = config.device, int(os.environ.get("WORLD_SIZE", "1"))
    created = parallel.init_process_group(config, device)
    rank = dist.get_rank() if world > 1 else 0
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return rank, world, torch.device(device), created


def train(config: TrainConfig) -> dict:
    """Train, write `config.output`, return a summary (also written to summary.json). Ctrl-C raises
    `Interrupted`, whose message says what was saved and how to continue (recovery.py)."""
    try:
        return _train(config)
    except Interrupted:
        raise
    except KeyboardInterrupt:  # outside the loop's graceful stop (loading, a second Ctrl-C)
        raise Interrupted(how_to_continue(Path(config.output))) from None


def _train(config: TrainConfig) -> dict:
    validate(config)
    started = time.perf_counter()
    rank, world, device, owns_group = _init_distributed(config)
    try:
        summary, stopped = _train_in_group(config, started, rank, world, device), None
    except Interrupted as stop:  # every process stops at the same step (agreed in the loop)
        summary, stopped = None, stop.with_traceback(None)  # its traceback would keep the run's frame alive
    if world > 1:
        dist.barrier()
    if owns_group:
        _destroy_process_group()
    if stopped is not None:
        raise stopped
    return summary


def _destroy_process_group() -> None:
    """Destroy the group once nothing else holds it. DDP's C++ reducer holds the group too, and a group
    whose last holder is the reducer is destroyed under the GIL: gloo's destructor then joins its worker
    threads, one of which may need the GIL to free the last collective's tensor, a deadlock (a rare CI
    hang at the end of a 2-process run). So the run's objects are freed first (gc: modules hold cycles),
    and the group dies here, in `destroy_process_group`, whose binding releases the GIL."""
    gc.collect()
    dist.destroy_process_group()


def _train_in_group(config: TrainConfig, started: float, rank: int, world: int, device) -> dict:
    """Everything that holds the process group (the DDP module) lives in this frame, so it is freed when
    this returns, before the group is destroyed (`_destroy_process_group`)."""
    out, resuming, resume_from = prepare_output(config, rank)
    if world > 1:
        dist.barrier()  # every process checks the output directory before rank 0 writes to it
    torch.manual_seed(config.seed)
    run, trainable, data_info = _set_up_run(
        config, out, resuming=resuming, rank=rank, world=world, device=device
    )
    start = _load_state(run, resume_from) if resume_from else 0
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and resuming:  # rows after the checkpoint (or all, starting over) are recomputed
        truncate_metrics(metrics_path, start if resume_from else -1)
    if world > 1:
        dist.barrier()  # every process reads the truncated log
    if resume_from:
        run.budget.resume_from(metrics_path, start)
    history = _loop(run, start, metrics_path, out)
    final_dir = out / "final"
    _export(run, final_dir)
    steps_done = history[-1]["step"] if history else start
    summary = {
        "final_dir": str(final_dir), "output": str(out), "steps": steps_done, "resumed_from": start,
        "stopped_by": "cpu_budget" if steps_done < config.steps else "steps",
        "cpu_s": round(run.budget.spent, 3), "cpu_budget": config.cpu_budget,
        "world_size": world, "rank": rank, "seconds": round(time.perf_counter() - started, 3),
        "trainable_parameters": trainable,
        "first": history[0] if history else None, "last": history[-1] if history else None,
        **data_info, "config": asdict(config),
    }  # fmt: skip
    if rank == 0:
        write_json_atomic(out / "summary.json", summary)  # demo reads it
    return summary


def _set_up_run(config: TrainConfig, out: Path, *, resuming: bool, rank: int, world: int, device):
    """Check the settings against the run's record, load models and data, build the optimizer:
    (the run, its trainable parameter count, what the data loading reports)."""
    model_key = model_fingerprint(config.model, seed=config.seed)
    teacher_key = model_fingerprint(config.teacher, seed=config.seed) if config.teacher else model_key
    derived = {
        "model_files": model_key,
        "teacher_files": teacher_key,
        "holds_out_eval_rows": holds_out_eval_rows(config),
    }
    check_run_settings(out, asdict(config) | derived, resume=resuming, rank=rank, defaults=setting_defaults())
    return build_run(config, device, out / "teacher_targets.safetensors", resuming=resuming, teacher_key=teacher_key,
                     rank=rank, world=world)  # fmt: skip


def build_run(config: TrainConfig, device, targets_cache: Path, *, resuming: bool = False, teacher_key: str,
              rank: int = 0, world: int = 1):  # fmt: skip
    """Load models and data and build the optimizer and schedule (what the loop steps; benchmarks/measure_train.py
    steps runs built here too): (the run, its trainable parameter count, what the data loading reports)."""
    setup = set_up(config, device, targets_cache, resume=resuming, teacher_key=teacher_key, rank=rank, world=world,
                   relabel_tokens=RELABEL_TOKENS)  # fmt: skip
    student = setup.student
    student.train()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)  # before any sharding
    student_logits, teacher = parallel.distribute(
        student, setup.teacher_model, setup.teacher, config, world=world, device=device
    )
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    budget = CpuBudget(config.cpu_budget)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, budget.fraction))
    run = TrainRun(config, rank, world, device, student, student_logits, teacher, setup.tokenizer, setup.train_rows,
                   setup.eval_rows, optimizer, scheduler, {}, setup.teacher_model, budget=budget)  # fmt: skip
    if rank == 0 and run.eval_rows is not None and config.eval_every and config.eval_decode_prompts:
        prepare_decode_eval(run)
    return run, trainable, setup.data_info


def _export(run: TrainRun, final_dir: Path) -> None:
    """Write final/ from rank 0 (FSDP: the student gathered once, at the end, to rank 0's CPU)."""
    student = run.student
    if parallel.is_sharded(run.student_logits):
        student = consolidated_student(run.student_logits, student, rank=run.rank)
    if run.rank == 0:
        export_final(student, run.tokenizer, final_dir, run.config)


def describe_summary(summary: dict) -> str:
    """Two lines for a person: steps, time and last loss; where the final checkpoint is."""
    last = summary["last"] or {}
    return (
        f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.4f}\n"
        f"final checkpoint: {summary['final_dir']}"
    )


def _save_state(run: TrainRun, root: Path, step: int) -> None:
    if parallel.is_sharded(run.student_logits):
        save_sharded_state(
            root,
            step,
            run.student_logits,
            run.optimizer,
            run.scheduler,
            rank=run.rank,
            keep=run.config.keep_checkpoints,
        )
    elif run.rank == 0:
        save_training_state(
            root, step, run.student, run.optimizer, run.scheduler, keep=run.config.keep_checkpoints
        )


def _load_state(run: TrainRun, path: Path) -> int:
    if parallel.is_sharded(run.student_logits):
        return load_sharded_state(path, run.student_logits, run.optimizer, run.scheduler)
    if is_sharded_checkpoint(path):
        raise SelfMTPError(
            f"checkpoint {path} was written by --parallel fsdp: resume it with --parallel fsdp"
        )
    return load_training_state(path, run.student, run.optimizer, run.scheduler)


def _loop(run: TrainRun, start: int, metrics_path: Path, out: Path) -> list[dict]:
    cfg, history = run.config, []
    bar = progress_bar(
        total=cfg.steps, initial=start, desc="train", disable=not cfg.progress or run.rank != 0
    )
    with (
        bar,
        open(metrics_path, "a") if run.rank == 0 else contextlib.nullcontext() as metrics_file,
        StopRequest() as stop,
    ):
        if start == 0 and run.decode_eval is not None:  # the untrained baseline of the decode curve
            metrics_file.write(json.dumps({"step": 0, **evaluate(run)}) + "\n")
        run.budget.start(run.world, run.device)
        for step in range(start, cfg.steps):
            if run.budget.exhausted():  # (a resumed run whose budget is already spent)
                break
            tick, lr = time.perf_counter(), run.scheduler.get_last_lr()[0]
            stats = train_step(run, step)
            seconds = time.perf_counter() - tick
            run.budget.step_done(run.world, run.device)
            row = {
                "step": step + 1,
                **stats.summary(),
                "lr": lr,
                "tokens_per_s": round(stats.tokens / seconds, 1),
                "step_seconds": round(seconds, 4),
                "cpu_s": round(run.budget.spent, 3),  # the run's CPU so far (budget.py): --resume reads it
            }
            if run.device.type == "cuda":  # this process's peak so far, beside `selfmtp plan`'s figure
                row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 1e9, 3)
            everyone = parallel.is_sharded(run.student_logits)  # FSDP: evaluation and saving are collective
            if (
                (run.rank == 0 or everyone)
                and run.eval_rows is not None
                and cfg.eval_every
                and (step + 1) % cfg.eval_every == 0
            ):
                row.update(evaluate(run))
            if run.rank == 0:  # before the checkpoint: a kill in between leaves a row that resume drops
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            stopping = stop.agreed(run.world, run.device)
            spent = run.budget.exhausted()
            last = step + 1 == cfg.steps or spent
            periodic = cfg.save_every and ((step + 1) % cfg.save_every == 0 or last)
            if periodic or stopping:
                if run.rank == 0:  # the rows up to the checkpoint survive a power loss with it
                    os.fsync(metrics_file.fileno())
                _save_state(run, out / "checkpoints", step + 1)
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if stopping:
                if run.world > 1:
                    dist.barrier()  # no process exits while the first one is still writing the checkpoint
                raise interrupted(out, step + 1)
            if spent:
                break
    return history
