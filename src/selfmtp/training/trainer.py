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
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from selfmtp.errors import Interrupted, SelfMTPError
from selfmtp.files import write_bytes_atomic
from selfmtp.models.loading import model_fingerprint, mtp_token_id
from selfmtp.progress import progress_bar
from selfmtp.training import parallel
from selfmtp.training.data import TokenRows
from selfmtp.training.layout import (
    BLOCK_ATTENTION,
    K_SAMPLING,
    assemble_layout,
    default_regions,
    regions_for_masks,
    sample_regions,
)
from selfmtp.training.objective import (
    PREFIX_TARGETS,
    SUPERVISION,
    TEACHER_MODES,
    SelectedLogits,
    StepStats,
    mtp_loss,
)
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

EVAL_SEED_OFFSET = 1_000_003
LR_SCHEDULES = ("constant", "cosine")
RELABEL_TOKENS = 8192  # positions per teacher pass when relabelling for offline supervision


@dataclass
class TrainConfig:
    data: str
    output: str = "runs/train"
    model: str = "tiny"
    teacher: str | None = None  # None: a frozen copy of the student's starting checkpoint
    template: str = "chat"
    seq_len: int = 160
    k_max: int = 16
    regions: int | None = None  # None: seq_len // (2 k_max)
    masks_per_row: int | None = None  # instead of regions: enough regions for about this many masks per row
    k_sampling: str = "random"
    static_k: int | None = None
    block_attention: str = "causal"
    teacher_mode: str = "hard"
    supervision: str = "online"
    prefix_loss: float = 0.0
    prefix_target: str = "ground-truth"  # ground-truth (the paper's ablation) | teacher (its next-token choice)
    lr: float = 1e-5
    warmup: int = 2000
    lr_schedule: str = "constant"  # after warm-up: constant (the paper) | cosine (decays to 0 at `steps`)
    weight_decay: float = 0.01  # PyTorch AdamW default
    clip: float = 1.0
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 50
    eval_size: int = 64
    eval_data: str | None = None
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_export: str = "merged"  # merged | adapter
    gated: bool = False  # deltas (LoRA with lora_rank, else full) acting only at <mtp> positions (models/gated.py)
    seed: int = 0
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    skip_bad_lines: bool = False
    strip_calculator: bool = True
    max_examples: int | None = None
    progress: bool = True
    eval_decode_prompts: int = 0  # >0: at every evaluation also decode this many held-out prompts (decode_eval.py)
    eval_decode_tokens: int = 64
    eval_decode_tau: float = 0.9
    parallel: str = "ddp"  # ddp | fsdp (parallel.py)
    dtype: str | None = None  # compute dtype: float32 | bfloat16; None: bf16 on CUDA, else float32
    activation_checkpointing: bool = False


def load_config_file(path: str | Path) -> dict:
    """A JSON object of TrainConfig fields (a recipe); unknown keys are a user error."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SelfMTPError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise SelfMTPError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise SelfMTPError(f"{path}: expected a JSON object of training settings")
    unknown = sorted(set(values) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise SelfMTPError(f"{path}: unknown training settings: {', '.join(unknown)}")
    return values


def config_from_sources(overrides: dict, config_file: str | Path | None = None, *,
                        defaults: dict | None = None) -> TrainConfig:
    """TrainConfig from its own defaults, then `defaults`, then a JSON config file (a recipe), then
    `overrides` (e.g. the flags given on a command line): each source wins over the ones before it."""
    values = {**(defaults or {}), **(load_config_file(config_file) if config_file is not None else {}), **overrides}
    if not values.get("data"):
        raise SelfMTPError("--data is required (on the command line or in the --config file)")
    return TrainConfig(**values)


def validate(config: TrainConfig, *, check_files: bool = True) -> None:
    """Raise SelfMTPError for a bad setting; `check_files=False` for data that is still to be written."""
    checks = [
        (config.teacher_mode in TEACHER_MODES, f"--teacher must be one of {TEACHER_MODES}"),
        (config.supervision in SUPERVISION, f"--supervision must be one of {SUPERVISION}"),
        (config.prefix_target in PREFIX_TARGETS, f"--prefix-target must be one of {PREFIX_TARGETS}"),
        (config.prefix_target == "ground-truth" or config.supervision != "ground-truth",
         "--prefix-target teacher needs a teacher: --supervision online or offline"),
        (config.supervision != "offline" or config.teacher_mode == "hard",
         "--supervision offline learns the teacher's argmax: it takes --teacher hard (soft needs online)"),
        (config.block_attention in BLOCK_ATTENTION, f"--block-attention must be one of {BLOCK_ATTENTION}"),
        (config.k_sampling in K_SAMPLING, f"--k-sampling must be one of {K_SAMPLING}"),
        (config.k_max >= 1, "--k-max must be >= 1"),
        (config.k_sampling != "static" or (config.static_k or 0) >= 1, "--k-sampling static needs --static-k >= 1"),
        (config.static_k is None or config.static_k <= config.k_max, "--static-k must be <= --k-max"),
        (config.regions is None or config.regions >= 1, "--regions must be >= 1"),
        (config.masks_per_row is None or (config.masks_per_row >= 1 and config.regions is None),
         "--masks-per-row must be >= 1 and replaces --regions: give one of them"),
        (config.steps >= 1 and config.batch_size >= 1 and config.grad_accum >= 1, "--steps, --batch-size, --grad-accum must be >= 1"),
        (config.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {LR_SCHEDULES}"),
        (config.lr > 0 and config.warmup >= 0 and config.prefix_loss >= 0, "--lr must be > 0, --warmup and --prefix-loss >= 0"),
        (config.lora_rank >= 0, "--lora-rank must be >= 0"),
        (config.lora_export in ("merged", "adapter"), "--lora-export must be merged or adapter"),
        (not config.gated or (config.teacher is None and config.prefix_loss == 0),
         "--gated: the teacher is the original model inside the student's own forward, and real positions do not "
         "train: drop --teacher-model and --prefix-loss"),
        (config.eval_every >= 0 and config.save_every >= 0, "--eval-every and --save-every must be >= 0"),
        (config.eval_decode_prompts >= 0 and config.eval_decode_tokens >= 1, "--eval-decode-prompts must be >= 0, "
         "--eval-decode-tokens >= 1"),
        (0 < config.eval_decode_tau <= 1, "--eval-decode-tau must be in (0, 1]"),
        # Checked here, before minutes of model loading, not only where the data is read.
        (not check_files or Path(config.data).is_file(), f"data file not found: {config.data}"),
        (not check_files or config.eval_data is None or Path(config.eval_data).is_file(),
         f"eval data file not found: {config.eval_data}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SelfMTPError(message)
    parallel.check_settings(config)


@dataclass
class _Run:
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    student: torch.nn.Module  # the (possibly peft) model
    student_logits: torch.nn.Module  # SelectedLogits, DDP-wrapped when world > 1
    teacher: object
    tokenizer: object
    train_rows: TokenRows
    eval_rows: TokenRows | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    _perms: dict
    teacher_model: torch.nn.Module | None = None  # the separate teacher module, if any
    decode_eval: object = None  # DecodeEval (decode_eval.py) when eval_decode_prompts > 0


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group) from torchrun's env."""
    device, world = config.device, int(os.environ.get("WORLD_SIZE", "1"))
    created = parallel.init_process_group(config, device)
    rank = dist.get_rank() if world > 1 else 0
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return rank, world, torch.device(device), created


def _step_rows(run: _Run, step: int) -> torch.Tensor:
    """Indices of the global batch of `step` in an endless seeded epoch-wise shuffle."""
    n, cfg = len(run.train_rows), run.config
    size = cfg.batch_size * run.world * cfg.grad_accum
    out = []
    for g in range(step * size, (step + 1) * size):
        epoch = g // n
        if epoch not in run._perms:
            run._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))}
        out.append(run._perms[epoch][g % n])
    return torch.stack(out)


def _plan(cfg: TrainConfig, rows: TokenRows, tokenizer, seed: int):
    has_eos = rows.input_ids.gather(1, (rows.lengths - 1)[:, None])[:, 0] == tokenizer.eos_token_id
    return sample_regions(
        rows.response_start, rows.lengths, has_eos, k_max=cfg.k_max,
        regions=cfg.regions or _regions(cfg),
        generator=torch.Generator().manual_seed(seed), k_sampling=cfg.k_sampling, static_k=cfg.static_k,
    )


def _regions(cfg: TrainConfig) -> int:
    if cfg.masks_per_row:
        return regions_for_masks(cfg.masks_per_row, cfg.k_max, k_sampling=cfg.k_sampling, static_k=cfg.static_k)
    return default_regions(cfg.seq_len, cfg.k_max)


def _layout(run: _Run, rows: TokenRows, plan):
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    return assemble_layout(
        rows.input_ids, rows.response_start, rows.lengths, plan, mtp_token_id=mtp_token_id(run.student),
        eos_token_id=run.tokenizer.eos_token_id, pad_token_id=pad, block_attention=run.config.block_attention,
        targets=rows.targets,
    ).to(run.device)


def _loss(run: _Run, student, layout, normalizer=None, prefix_normalizer=None):
    cfg = run.config
    with parallel.autocast(cfg, run.device):
        return mtp_loss(
            student, run.teacher, layout, teacher_mode=cfg.teacher_mode, supervision=cfg.supervision,
            prefix_loss_weight=cfg.prefix_loss, prefix_target=cfg.prefix_target, mtp_token_id=mtp_token_id(run.student),
            eos_token_id=run.tokenizer.eos_token_id, k_max=cfg.k_max,
            normalizer=normalizer, prefix_normalizer=prefix_normalizer,
            targets_from_forward=cfg.gated and cfg.supervision == "offline",
        )


def train_step(run: _Run, step: int) -> StepStats:
    """One optimizer step (all micro-batches of this process); returns stats summed over processes."""
    cfg, b = run.config, run.config.batch_size
    rows = run.train_rows.take(_step_rows(run, step))
    plan = _plan(cfg, rows, run.tokenizer, seed=cfg.seed * 1_000_000_007 + step)
    first_target = (rows.response_start - 1).clamp(min=0)
    prefix_total = int((rows.lengths - 1 - first_target).clamp(min=0).sum())
    # DDP averages gradients over processes: scale the normaliser so the result is sum / global count.
    normalizer = max(plan.supervised_count, 1) / run.world
    prefix_normalizer = max(prefix_total, 1) / run.world
    total = None
    for micro in range(cfg.grad_accum):
        index = slice((micro * run.world + run.rank) * b, (micro * run.world + run.rank + 1) * b)
        layout = _layout(run, rows.take(index), plan.rows(index))
        last = micro == cfg.grad_accum - 1
        with parallel.gradient_sync(run.student_logits, enabled=last or run.world == 1):
            loss, stats = _loss(run, run.student_logits, layout, normalizer, prefix_normalizer)
            loss.backward()
        total = stats if total is None else total + stats
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.student.parameters() if p.requires_grad], cfg.clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _all_reduce(total, run.world)


def _all_reduce(stats: StepStats, world: int) -> StepStats:
    if world == 1:
        return stats
    t = stats.as_tensor()
    dist.all_reduce(t)
    return StepStats.from_tensor(t)


@torch.no_grad()
def evaluate(run: _Run) -> dict:
    """Held-out online loss and agreement with a fixed region plan (same every evaluation)."""
    rows, cfg = run.eval_rows, run.config
    plan = _plan(cfg, rows, run.tokenizer, seed=cfg.seed + EVAL_SEED_OFFSET)
    # FSDP: every process evaluates through the sharded root (its all-gathers are collective)
    student = run.student_logits if parallel.is_sharded(run.student_logits) else SelectedLogits(run.student)
    run.student.eval()
    total = None
    for lo in range(0, len(rows), cfg.batch_size):
        index = slice(lo, lo + cfg.batch_size)
        _, stats = _loss(run, student, _layout(run, rows.take(index), plan.rows(index)))
        total = stats if total is None else total + stats
    row = {f"eval_{key}": value for key, value in total.summary().items()}
    if run.decode_eval is not None:
        from selfmtp.training.decode_eval import decode_metrics

        row.update(decode_metrics(run.student, run.decode_eval))
    run.student.train()
    return row


def _build_decode_eval(run: _Run) -> None:
    """Fix the decode-eval prompts and their reference continuations: the named teacher's greedy text,
    else the student's own (call this before any training or resume: it is then the original model)."""
    from selfmtp.training.decode_eval import build_decode_eval

    cfg, tok = run.config, run.tokenizer
    run.student.eval()
    run.decode_eval = build_decode_eval(
        run.eval_rows, cfg.eval_decode_prompts, run.teacher_model if cfg.teacher else run.student,
        tau=cfg.eval_decode_tau, k_max=cfg.k_max, max_new_tokens=cfg.eval_decode_tokens,
        stop_token_ids={tok.eos_token_id}, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    run.student.train()


def lr_multiplier(config: TrainConfig):
    """Linear warm-up, then constant or a cosine decay to 0 at the last step."""

    def multiplier(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


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
    out, resuming, resume_from = prepare_output(config, rank)
    if world > 1:
        dist.barrier()  # every process checks the output directory before rank 0 writes to it
    torch.manual_seed(config.seed)
    model_key = model_fingerprint(config.model, seed=config.seed)
    teacher_key = model_fingerprint(config.teacher, seed=config.seed) if config.teacher else model_key
    derived = {"model_files": model_key, "teacher_files": teacher_key, "holds_out_eval_rows": holds_out_eval_rows(config)}
    check_run_settings(out, asdict(config) | derived, resume=resuming, rank=rank)
    setup = set_up(config, device, out / "teacher_targets.safetensors", resume=resuming,
                   teacher_key=teacher_key, rank=rank, world=world, relabel_tokens=RELABEL_TOKENS)
    student, tokenizer, teacher_model, teacher = setup.student, setup.tokenizer, setup.teacher_model, setup.teacher
    train_rows, eval_rows, data_info = setup.train_rows, setup.eval_rows, setup.data_info
    student.train()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    student_logits, teacher = parallel.distribute(student, teacher_model, teacher, config, world=world, device=device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    run = _Run(config, rank, world, device, student, student_logits, teacher, tokenizer, train_rows, eval_rows,
               optimizer, scheduler, {}, teacher_model)
    if rank == 0 and eval_rows is not None and config.eval_every and config.eval_decode_prompts:
        _build_decode_eval(run)
    start = _load_state(run, resume_from) if resume_from else 0
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and resuming:  # rows after the checkpoint (or all, starting over) are recomputed
        truncate_metrics(metrics_path, start if resume_from else -1)
    history = _loop(run, start, metrics_path, out)
    final_dir = out / "final"
    if parallel.is_sharded(student_logits):  # gathered once, at the end, to rank 0's CPU
        student = consolidated_student(student_logits, student, rank=rank)
    if rank == 0:
        export_final(student, tokenizer, final_dir, config)
    summary = {
        "final_dir": str(final_dir), "output": str(out), "steps": config.steps, "resumed_from": start,
        "world_size": world, "rank": rank, "seconds": round(time.perf_counter() - started, 3),
        "trainable_parameters": trainable,
        "first": history[0] if history else None, "last": history[-1] if history else None,
        **data_info, "config": asdict(config),
    }
    if rank == 0:
        write_bytes_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())  # demo reads it
    if world > 1:
        dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return summary


def describe_summary(summary: dict) -> str:
    """Two lines for a person: steps, time and last loss; where the final checkpoint is."""
    last = summary["last"] or {}
    return (
        f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.4f}\n"
        f"final checkpoint: {summary['final_dir']}"
    )


def _save_state(run: _Run, root: Path, step: int) -> None:
    if parallel.is_sharded(run.student_logits):
        save_sharded_state(root, step, run.student_logits, run.optimizer, run.scheduler, rank=run.rank,
                           keep=run.config.keep_checkpoints)
    elif run.rank == 0:
        save_training_state(root, step, run.student, run.optimizer, run.scheduler, keep=run.config.keep_checkpoints)


def _load_state(run: _Run, path: Path) -> int:
    if parallel.is_sharded(run.student_logits):
        return load_sharded_state(path, run.student_logits, run.optimizer, run.scheduler)
    if is_sharded_checkpoint(path):
        raise SelfMTPError(f"checkpoint {path} was written by --parallel fsdp: resume it with --parallel fsdp")
    return load_training_state(path, run.student, run.optimizer, run.scheduler)


def _loop(run: _Run, start: int, metrics_path: Path, out: Path) -> list[dict]:
    cfg, history = run.config, []
    bar = progress_bar(total=cfg.steps, initial=start, desc="train", disable=not cfg.progress or run.rank != 0)
    with bar, open(metrics_path, "a") if run.rank == 0 else contextlib.nullcontext() as metrics_file, \
            StopRequest() as stop:
        if start == 0 and run.decode_eval is not None:  # the untrained baseline of the decode curve
            metrics_file.write(json.dumps({"step": 0, **evaluate(run)}) + "\n")
        for step in range(start, cfg.steps):
            tick, lr = time.perf_counter(), run.scheduler.get_last_lr()[0]
            stats = train_step(run, step)
            seconds = time.perf_counter() - tick
            row = {"step": step + 1, **stats.summary(), "lr": lr,
                   "tokens_per_s": round(stats.tokens / seconds, 1), "step_seconds": round(seconds, 4)}
            if run.device.type == "cuda":  # this process's peak so far, beside `selfmtp plan`'s figure
                row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 1e9, 3)
            everyone = parallel.is_sharded(run.student_logits)  # FSDP: evaluation and saving are collective
            if (run.rank == 0 or everyone) and run.eval_rows is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row.update(evaluate(run))
            if run.rank == 0:  # before the checkpoint: a kill in between leaves a row that resume drops
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            stopping = stop.agreed(run.world, run.device)
            periodic = cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps)
            if periodic or stopping:
                _save_state(run, out / "checkpoints", step + 1)
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if stopping:
                if run.world > 1:
                    dist.barrier()  # no process exits while the first one is still writing the checkpoint
                raise interrupted(out, step + 1)
    return history
