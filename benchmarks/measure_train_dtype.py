"""A training step's CPU cost and loss in float32 against bf16 autocast, on the same batches (issue #26, pilot A).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_train_dtype.py \
        --config recipes/smollm2-135m-mtp-gated.json --model smollm2-135m-mtp --steps 8 --warm-up 2 \
        --noise-seed 1 --output docs/measurements/smollm2-135m-mtp-v3-cpu/train-dtype.json

Builds one training run per variant with the library's own pieces (`setup.set_up`, `parallel.distribute`,
the trainer's AdamW and lr schedule) from the same recipe and weights, then calls the library's
`step.train_step` on them in turn, step by step (interleaved, so background load hits every variant alike):

- `float32`: the recipe as it runs on a CPU today (TrainConfig.dtype None = float32 there);
- `bfloat16`: the same with `dtype="bfloat16"`, i.e. `torch.autocast("cpu", bfloat16)` around the forward
  and loss (parallel.autocast; master weights, gradients and AdamW stay float32);
- `--noise-seed S` adds `float32-seedS`: float32 with another seed, so other rows and another region plan
  per step. Its loss minus the float32 one is the step-to-step difference that batch noise alone makes.

Both seed-0 variants see the same rows and the same region plan at every step (they depend only on
(seed, step)), so their per-step losses differ only by precision and by the drift of their weights after
step 1. Cost is this thread's CPU time (`time.thread_time`, 1 torch thread: the kernels run on the calling
thread), robust to other jobs on a shared machine; wall time is recorded too. Steps before --warm-up are
run and reported but not timed into the medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selfmtp.files import write_json_atomic
from selfmtp.training import parallel
from selfmtp.training.config import config_from_sources, lr_multiplier, validate
from selfmtp.training.setup import set_up
from selfmtp.training.step import TrainRun, train_step

RELABEL_TOKENS = 8192  # unused by ground-truth supervision; set_up takes it


def build_run(config, cache_dir: Path) -> TrainRun:
    """What trainer.train sets up before its loop, minus the output folder and checkpoints."""
    validate(config)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    setup = set_up(config, device, cache_dir / f"targets-{config.dtype}-{config.seed}.safetensors", resume=False,
                   teacher_key=config.model, relabel_tokens=RELABEL_TOKENS)  # fmt: skip
    setup.student.train()
    logits, teacher = parallel.distribute(setup.student, setup.teacher_model, setup.teacher, config, world=1,
                                          device=device)  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in setup.student.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    return TrainRun(config, 0, 1, device, setup.student, logits, teacher, setup.tokenizer, setup.train_rows,
                    setup.eval_rows, optimizer, scheduler, {}, setup.teacher_model)  # fmt: skip


def variants(args) -> dict[str, dict]:
    out = {"float32": {"dtype": "float32", "seed": args.seed}, "bfloat16": {"dtype": "bfloat16", "seed": args.seed}}
    if args.noise_seed is not None:
        out[f"float32-seed{args.noise_seed}"] = {"dtype": "float32", "seed": args.noise_seed}
    return out


def cpu_info() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(args) -> dict:
    torch.set_num_threads(1)
    overrides = {"model": args.model, "eval_every": 0, "save_every": 0, "progress": False, "output": "unused"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in variants(args).items():
            config = config_from_sources(overrides | settings, args.config)
            runs[name] = build_run(config, Path(tmp))
    per_step = {name: [] for name in runs}
    for step in range(args.steps):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            stats = train_step(run, step).summary()
            row = {"step": step + 1, "loss": stats["loss"], "agreement_by_j": stats["agreement_by_j"],
                   "supervised": stats["supervised"], "cpu_s": time.thread_time() - cpu,
                   "wall_s": time.perf_counter() - wall}  # fmt: skip
            per_step[name].append(row)
            print(f"step {step + 1} {name}: loss {row['loss']:.4f} cpu {row['cpu_s']:.1f} s wall {row['wall_s']:.1f} s",
                  flush=True)  # fmt: skip
    return summarise(per_step, args)


def summarise(per_step: dict[str, list[dict]], args) -> dict:
    timed = {name: rows[args.warm_up:] for name, rows in per_step.items()}
    cost = {name: {"cpu_s_median": statistics.median(r["cpu_s"] for r in rows),
                   "wall_s_median": statistics.median(r["wall_s"] for r in rows)} for name, rows in timed.items()}  # fmt: skip
    f32, bf16 = per_step["float32"], per_step["bfloat16"]
    precision = [b["loss"] - f["loss"] for f, b in zip(f32, bf16, strict=True)]
    out = {
        "steps": args.steps, "warm_up": args.warm_up, "threads": torch.get_num_threads(), "cpu": cpu_info(),
        "model": args.model, "config": args.config, "per_step": per_step, "cost": cost,
        "bf16_over_f32_cpu": cost["bfloat16"]["cpu_s_median"] / cost["float32"]["cpu_s_median"],
        "bf16_over_f32_cpu_paired": statistics.median(b["cpu_s"] / f["cpu_s"] for f, b in
                                                     zip(timed["float32"], timed["bfloat16"], strict=True)),
        "loss_bf16_minus_f32": precision,
        "loss_bf16_minus_f32_abs_mean": statistics.mean(abs(d) for d in precision),
        "f32_loss_step_to_step_std": statistics.stdev(r["loss"] for r in f32),
    }  # fmt: skip
    noise = [name for name in per_step if name.startswith("float32-seed")]
    if noise:
        batch_noise = [n["loss"] - f["loss"] for f, n in zip(f32, per_step[noise[0]], strict=True)]
        out["loss_other_seed_minus_f32"] = batch_noise
        out["loss_other_seed_minus_f32_abs_mean"] = statistics.mean(abs(d) for d in batch_noise)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/smollm2-135m-mtp-gated.json", help="the training recipe")
    parser.add_argument("--model", default="smollm2-135m-mtp", help="the weights the steps start from")
    parser.add_argument("--steps", type=int, default=8, help="steps per variant (default 8)")
    parser.add_argument("--warm-up", type=int, default=2, help="first steps left out of the medians (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seed", type=int, help="also a float32 run with this seed (the batch-noise yardstick)")
    parser.add_argument("--output", required=True, help="results JSON")
    args = parser.parse_args()
    if not 0 <= args.warm_up < args.steps or args.steps < 2:
        parser.error("need --steps >= 2 and 0 <= --warm-up < --steps")
    result = measure(args)
    write_json_atomic(Path(args.output), result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))


if __name__ == "__main__":
    main()
