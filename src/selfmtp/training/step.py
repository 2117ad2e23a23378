"""One optimizer step and the held-out evaluation, on a `TrainRun` (the models, data and optimizer
of a run that `trainer.train` sets up).

The data and region plan of a step depend only on (seed, step); losses are divided by the supervised
count of the whole global batch, so grad accumulation and data parallel give one big batch's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training import parallel
from selfmtp.training.config import TrainConfig
from selfmtp.training.data import TokenRows
from selfmtp.training.layout import assemble_layout, default_regions, regions_for_masks, sample_regions
from selfmtp.training.objective import SelectedLogits, StepStats, mtp_loss

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class TrainRun:
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
    _perms: dict  # epoch -> its shuffle of the training rows (only the current epoch is kept)
    teacher_model: torch.nn.Module | None = None  # the separate teacher module, if any
    decode_eval: object = None  # DecodeEval (decode_eval.py) when eval_decode_prompts > 0
    budget: object = None  # CpuBudget (budget.py): the CPU this run has used, its stop under --cpu-budget


def step_rows(run: TrainRun, step: int) -> torch.Tensor:
    """Indices of the global batch of `step` in an endless seeded epoch-wise shuffle."""
    n, cfg = len(run.train_rows), run.config
    size = cfg.batch_size * run.world * cfg.grad_accum
    out = []
    for g in range(step * size, (step + 1) * size):
        epoch = g // n
        if epoch not in run._perms:
            run._perms = {
                epoch: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            }
        out.append(run._perms[epoch][g % n])
    return torch.stack(out)


def _plan(cfg: TrainConfig, rows: TokenRows, tokenizer, seed: int):
    has_eos = rows.input_ids.gather(1, (rows.lengths - 1)[:, None])[:, 0] == tokenizer.eos_token_id
    return sample_regions(
        rows.response_start,
        rows.lengths,
        has_eos,
        k_max=cfg.k_max,
        regions=cfg.regions or _regions(cfg),
        generator=torch.Generator().manual_seed(seed),
        k_sampling=cfg.k_sampling,
        static_k=cfg.static_k,
    )


def _regions(cfg: TrainConfig) -> int:
    if cfg.masks_per_row:
        return regions_for_masks(
            cfg.masks_per_row, cfg.k_max, k_sampling=cfg.k_sampling, static_k=cfg.static_k
        )
    return default_regions(cfg.seq_len, cfg.k_max)


def _layout(run: TrainRun, rows: TokenRows, plan):
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    return assemble_layout(
        rows.input_ids,
        rows.response_start,
        rows.lengths,
        plan,
        mtp_token_id=mtp_token_id(run.student),
        eos_token_id=run.tokenizer.eos_token_id,
        pad_token_id=pad,
        block_attention=run.config.block_attention,
        targets=rows.targets,
    ).to(run.device)


def _loss(run: TrainRun, student, layout, normalizer=None, prefix_normalizer=None):
    cfg = run.config
    with parallel.autocast(cfg, run.device):
        return mtp_loss(
            student,
            run.teacher,
            layout,
            teacher_mode=cfg.teacher_mode,
            supervision=cfg.supervision,
            prefix_loss_weight=cfg.prefix_loss,
            prefix_target=cfg.prefix_target,
            mtp_token_id=mtp_token_id(run.student),
            eos_token_id=run.tokenizer.eos_token_id,
            k_max=cfg.k_max,
            normalizer=normalizer,
            prefix_normalizer=prefix_normalizer,
            targets_from_forward=cfg.gated and cfg.supervision == "offline",
        )


def train_step(run: TrainRun, step: int) -> StepStats:
    """One optimizer step (all micro-batches of this process); returns stats summed over processes."""
    cfg, b = run.config, run.config.batch_size
    rows = run.train_rows.take(step_rows(run, step))
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
def evaluate(run: TrainRun) -> dict:
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


def prepare_decode_eval(run: TrainRun) -> None:
    """Fix the decode-eval prompts and their reference continuations: the named teacher's greedy text,
    else the student's own (call this before any training or resume: it is then the original model)."""
    from selfmtp.training.decode_eval import build_decode_eval

    cfg, tok = run.config, run.tokenizer
    run.student.eval()
    run.decode_eval = build_decode_eval(
        run.eval_rows,
        cfg.eval_decode_prompts,
        run.teacher_model if cfg.teacher else run.student,
        tau=cfg.eval_decode_tau,
        k_max=cfg.k_max,
        max_new_tokens=cfg.eval_decode_tokens,
        stop_token_ids={tok.eos_token_id},
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    run.student.train()
