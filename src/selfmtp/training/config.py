"""`TrainConfig`: every setting of a training run, where they come from (defaults, a JSON recipe,
flags) and their checks, which run before minutes of model loading; and the learning-rate schedule."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from selfmtp.errors import SelfMTPError
from selfmtp.training import parallel
from selfmtp.training.layout import BLOCK_ATTENTION, K_SAMPLING
from selfmtp.training.objective import PREFIX_TARGETS, SUPERVISION, TEACHER_MODES

LR_SCHEDULES = ("constant", "cosine")


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
    # ground-truth (the paper's ablation) | teacher (its next-token choice)
    prefix_target: str = "ground-truth"
    lr: float = 1e-5
    warmup: int = 2000
    lr_schedule: str = "constant"  # after warm-up: constant (the paper) | cosine (decays to 0 at `steps`)
    weight_decay: float = 0.01  # PyTorch AdamW default
    clip: float = 1.0
    steps: int = 100
    # CPU seconds (set-up included) after which training stops, at a step boundary; `steps` is then a
    # cap and a cosine decays over the budget (budget.py). None: stop at `steps`.
    cpu_budget: float | None = None
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
    # deltas (LoRA with lora_rank, else full) acting only at <mtp> positions (models/gated.py)
    gated: bool = False
    gated_head: bool = False  # also gate the final norm and the output head (a delta of the same kind)
    seed: int = 0
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    skip_bad_lines: bool = False
    strip_calculator: bool = True
    max_examples: int | None = None
    progress: bool = True
    # >0: at every evaluation also decode this many held-out prompts (decode_eval.py)
    eval_decode_prompts: int = 0
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


def config_from_sources(
    overrides: dict, config_file: str | Path | None = None, *, defaults: dict | None = None
) -> TrainConfig:
    """TrainConfig from its own defaults, then `defaults`, then a JSON config file (a recipe), then
    `overrides` (e.g. the flags given on a command line): each source wins over the ones before it."""
    values = {
        **(defaults or {}),
        **(load_config_file(config_file) if config_file is not None else {}),
        **overrides,
    }
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
        (config.supervision != "offline" or config.teacher_mode == "hard" or config.gated,
         "--supervision offline learns the teacher's argmax: it takes --teacher hard (soft needs online or --gated)"),
        (config.block_attention in BLOCK_ATTENTION, f"--block-attention must be one of {BLOCK_ATTENTION}"),
        (config.k_sampling in K_SAMPLING, f"--k-sampling must be one of {K_SAMPLING}"),
        (config.k_max >= 1, "--k-max must be >= 1"),
        (config.k_sampling != "static" or (config.static_k or 0) >= 1, "--k-sampling static needs --static-k >= 1"),
        (config.static_k is None or config.static_k <= config.k_max, "--static-k must be <= --k-max"),
        (config.regions is None or config.regions >= 1, "--regions must be >= 1"),
        (config.masks_per_row is None or (config.masks_per_row >= 1 and config.regions is None),
         "--masks-per-row must be >= 1 and replaces --regions: give one of them"),
        (config.steps >= 1 and config.batch_size >= 1 and config.grad_accum >= 1, "--steps, --batch-size, --grad-accum must be >= 1"),
        (config.cpu_budget is None or config.cpu_budget > 0, "--cpu-budget must be > 0 (CPU seconds)"),
        (config.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {LR_SCHEDULES}"),
        (config.lr > 0 and config.warmup >= 0 and config.prefix_loss >= 0, "--lr must be > 0, --warmup and --prefix-loss >= 0"),
        (config.lora_rank >= 0, "--lora-rank must be >= 0"),
        (config.lora_export in ("merged", "adapter"), "--lora-export must be merged or adapter"),
        (not config.gated or (config.teacher is None and config.prefix_loss == 0),
         "--gated: the teacher is the original model inside the student's own forward, and real positions do not "
         "train: drop --teacher-model and --prefix-loss"),
        (config.gated or not config.gated_head, "--gated-head goes with --gated"),
        (config.eval_every >= 0 and config.save_every >= 0, "--eval-every and --save-every must be >= 0"),
        (config.eval_decode_prompts >= 0 and config.eval_decode_tokens >= 1, "--eval-decode-prompts must be >= 0, "
         "--eval-decode-tokens >= 1"),
        (0 < config.eval_decode_tau <= 1, "--eval-decode-tau must be in (0, 1]"),
        # Checked here, before minutes of model loading, not only where the data is read.
        (not check_files or Path(config.data).is_file(), f"data file not found: {config.data}"),
        (not check_files or config.eval_data is None or Path(config.eval_data).is_file(),
         f"eval data file not found: {config.eval_data}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise SelfMTPError(message)
    parallel.check_settings(config)


def lr_multiplier(config: TrainConfig, budget_fraction=None):
    """Linear warm-up, then constant or a cosine decay to 0 at the last step, or under a CPU budget
    at the budget's end: `budget_fraction()` is the share of it spent (training/budget.py)."""

    def multiplier(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if config.lr_schedule == "constant":
            return 1.0
        if config.cpu_budget is not None:
            progress = budget_fraction()
        else:
            progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def setting_defaults() -> dict:
    """Every TrainConfig field that has a default, with it: what a run recorded before a setting existed
    ran with (a new setting's default keeps the old behaviour), so a missing key reads as its default."""
    from dataclasses import MISSING, fields

    defaults = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    return defaults
