"""A training step's CPU cost and loss, variants of one recipe interleaved on the same batches, and peak memory.

    # bf16 autocast against float32, another seed's float32 as the batch-noise yardstick (#26 pilot A):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_train.py --config recipes/smollm2-135m-mtp-gated.json \
        --model smollm2-135m-mtp --variant float32 dtype=float32 --variant bfloat16 dtype=bfloat16 \
        --variant float32-seed1 dtype=float32 seed=1 --steps 8 --warm-up 2 --output train-dtype.json
    # an MTP step against a plain next-token fine-tuning step on the same rows; peak RSS with LoRA vs full:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_train.py --model smollm2-135m --data train.jsonl \
        --set batch_size=8 seq_len=160 k_max=16 --variant mtp --variant ntp --memory lora_rank=16 lora_rank=0 \
        --output train-cost.json

Each variant is one training run built by the trainer's own `build_run` from the recipe (--config), the
--set overrides and its own KEY=VALUE settings (TrainConfig fields, values read as JSON), stepped by the
library's `step.train_step`, the variants in turn at every step, so background load hits all alike. A
variant named `ntp` instead takes a plain next-token fine-tuning step (`model(ids, labels=...)` on the
response tokens, backward, the run's AdamW) on the rows the MTP step takes (`step.step_rows`: the data of a
step depends only on (seed, step)); it needs weights that train at real positions (LoRA or full, not gated).
Cost: this thread's CPU time (`time.thread_time`, 1 torch thread: the kernels run on the calling thread),
robust to other jobs on a shared machine; wall time too. Steps before --warm-up are not in the medians.
Ratios and loss differences are to the first variant. --memory: for each setting, a fresh process runs
--memory-steps steps of the first variant with it and reports its peak RSS (VmHWM; not ru_maxrss, which
Linux keeps across exec). On a GPU every step ends with a device synchronisation, so wall time is the
step's; --profile FILE writes torch.profiler's op tables for the timed steps (the GPU check's first question:
is a step bound by the device or by the host that feeds it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfmtp.evaluation.pass_cost_bench import cpu_info
from selfmtp.files import write_json_atomic, write_text_atomic
from selfmtp.training.config import config_from_sources, validate
from selfmtp.training.step import step_rows, train_step
from selfmtp.training.trainer import build_run


def settings(pairs: list[str]) -> dict:
    """KEY=VALUE words -> TrainConfig overrides (a value is JSON where it parses, else a string)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def make_run(args, overrides: dict, targets_cache: Path):
    base = {"model": args.model, "eval_every": 0, "save_every": 0, "progress": False, "output": "unused"}
    config = config_from_sources(base | ({"data": args.data} if args.data else {}) | settings(args.set) | overrides,
                                 args.config)  # fmt: skip
    validate(config)
    torch.manual_seed(config.seed)
    return build_run(config, torch.device(config.device), targets_cache, teacher_key=config.model)[0]


def ntp_step(run, step: int) -> dict:
    """A plain fine-tuning step on the MTP step's rows: next-token cross-entropy on the response tokens."""
    rows = run.train_rows.take(step_rows(run, step))
    ids, t = rows.input_ids.to(run.device), torch.arange(rows.input_ids.shape[1], device=run.device)[None]
    attention = (t < rows.lengths.to(run.device)[:, None]).long()
    labels = ids.masked_fill((t < rows.response_start.to(run.device)[:, None]) | (attention == 0), -100)
    loss = run.student(input_ids=ids, attention_mask=attention, labels=labels).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss), "agreement_by_j": None, "supervised": int((labels != -100).sum())}


def step_once(name: str, run, step: int) -> dict:
    wall, cpu = time.perf_counter(), time.thread_time()
    stats = ntp_step(run, step) if name == "ntp" else train_step(run, step).summary()
    if run.device.type == "cuda":  # kernels run asynchronously: the step ends when the device is done
        torch.cuda.synchronize(run.device)
    row = {"step": step + 1, "loss": stats["loss"], "agreement_by_j": stats["agreement_by_j"],
           "supervised": stats["supervised"], "cpu_s": time.thread_time() - cpu, "wall_s": time.perf_counter() - wall}  # fmt: skip
    print(f"step {step + 1} {name}: loss {row['loss']:.4f} cpu {row['cpu_s']:.1f} s wall {row['wall_s']:.1f} s", flush=True)
    return row


def measure(args, variants: dict[str, dict]) -> dict[str, list[dict]]:
    """Every variant's run, then step by step every variant in turn: {variant: its rows per step}."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: make_run(args, overrides, Path(tmp) / f"targets-{i}.safetensors")
                for i, (name, overrides) in enumerate(variants.items())}  # fmt: skip
        per_step = {name: [] for name in runs}
        with contextlib.ExitStack() as stack:
            for step in range(args.steps):
                if step == args.warm_up and args.profile:
                    profiler = stack.enter_context(torch.profiler.profile(activities=profiler_activities()))
                for name, run in runs.items():
                    per_step[name].append(step_once(name, run, step))
        if args.profile:  # where a step's time goes, by op: the host's share and the device's
            tables = [profiler.key_averages().table(sort_by=f"self_{kind}_time_total", row_limit=30)
                      for kind in ("cpu", "cuda")[: len(profiler_activities())]]  # fmt: skip
            write_text_atomic(Path(args.profile), "\n\n".join(tables) + "\n")
    return per_step


def profiler_activities() -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    return activities + [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else activities


def summarise(per_step: dict[str, list[dict]], args) -> dict:
    timed = {name: rows[args.warm_up :] for name, rows in per_step.items()}
    cost = {name: {"cpu_s_median": statistics.median(r["cpu_s"] for r in rows),
                   "wall_s_median": statistics.median(r["wall_s"] for r in rows)} for name, rows in timed.items()}  # fmt: skip
    first, rows0 = next(iter(per_step)), next(iter(per_step.values()))
    out = {"steps": args.steps, "warm_up": args.warm_up, "threads": torch.get_num_threads(), "cpu": cpu_info()["model_name"],
           "model": args.model, "config": args.config, "set": args.set, "reference": first, "per_step": per_step,
           "cost": cost, f"{first}_loss_step_to_step_std": statistics.stdev(r["loss"] for r in rows0)}  # fmt: skip
    for name in list(per_step)[1:]:
        out[f"{name}_over_{first}_cpu"] = cost[name]["cpu_s_median"] / cost[first]["cpu_s_median"]
        out[f"{name}_over_{first}_cpu_paired"] = statistics.median(
            b["cpu_s"] / a["cpu_s"] for a, b in zip(timed[first], timed[name], strict=True))
        if "ntp" not in (first, name):  # the same objective: the losses compare
            diff = [b["loss"] - a["loss"] for a, b in zip(rows0, per_step[name], strict=True)]
            out[f"loss_{name}_minus_{first}"] = diff
            out[f"loss_{name}_minus_{first}_abs_mean"] = statistics.mean(abs(d) for d in diff)
    return out


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a training recipe (JSON of TrainConfig fields)")
    parser.add_argument("--model", default="smollm2-135m-mtp", help="the weights the steps start from")
    parser.add_argument("--data", help="training jsonl (default: the recipe's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="repeat: a name and its overrides; `ntp`: a plain fine-tuning step (default: one, `recipe`)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="steps per variant (default 8)")
    parser.add_argument("--warm-up", type=int, default=2, help="first steps left out of the medians (default 2)")
    parser.add_argument("--memory", nargs="+", default=[], metavar="KEY=VALUE", help="peak RSS with each setting")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory process (default 2)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: this process measures one setting
    parser.add_argument("--profile", metavar="FILE", help="torch.profiler over the steps after --warm-up: the ops "
                        "by self CPU time (and CUDA time on a GPU), as text")  # fmt: skip
    parser.add_argument("--output", help="results JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {words[0]: settings(words[1:]) for words in args.variant or [["recipe"]]}
    if args.memory_of is not None:
        with tempfile.TemporaryDirectory() as tmp:
            run = make_run(args, next(iter(variants.values())) | settings([args.memory_of]), Path(tmp) / "targets")
            for step in range(args.memory_steps):  # the first step already allocates gradients and AdamW state
                train_step(run, step)
        print(json.dumps({"setting": args.memory_of, "peak_rss_mib": peak_rss_mib()}))
        return
    if not args.output or not 0 <= args.warm_up < args.steps or args.steps < 2:
        parser.error("need --output, --steps >= 2 and 0 <= --warm-up < --steps")
    result = summarise(measure(args, variants), args)
    for setting in args.memory:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-of", setting], check=True,
                              capture_output=True, text=True)  # fmt: skip
        result.setdefault("memory", {})[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    write_json_atomic(Path(args.output), result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))


if __name__ == "__main__":
    main()
