"""Cached pass cost by tokens fed, per decode dtype, and the output head's matmul alone: `--dtype` on this CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_pass_cost.py --model smollm2-135m \
        --threads 1,2 --output docs/measurements/decode-dtype-cpu

Variants: float32, float32 with `--prepack`, bfloat16 (stock kernels), bfloat16 with the batch-invariant
kernels that decoding runs (models/exact_kernels.py), int8 weight-only (models/int8.py) with and without
them. One process holds every variant; each round times every (variant, tokens fed) once, in turn, so a
burst of load hits all alike; medians over rounds. A pass: N new tokens on top of a cached PREFIX-token
prefix (logits for all N, as a verify pass keeps). Clocks: at 1 thread the thread's CPU time (a shared
machine's preemption is not charged; `decoding.pass_cost.pass_clock` does the same), at more threads
wall time (CPU time would add the threads up). The CPU's model name and flags go into the results.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.files import write_json_atomic, write_text_atomic
from selfmtp.models.loading import load_model

TOKENS_FED = (1, 2, 3, 4, 8, 16)
PREFIX = 200
VARIANTS = {  # name -> load_model keywords
    "float32": {"dtype": "float32"},
    "float32-prepack": {"dtype": "float32", "prepack": True},
    "bfloat16": {"dtype": "bfloat16"},
    "bfloat16-exact": {"dtype": "bfloat16", "exact_kernels": True},
    "int8": {"dtype": "int8"},
    "int8-exact": {"dtype": "int8", "exact_kernels": True},
}
HEAD_ROWS = (1, 2, 8)


def clock(threads: int):
    return time.thread_time if threads == 1 else time.perf_counter


@torch.inference_mode()
def pass_seconds(model, fed: int, generator: torch.Generator, timer) -> float:
    vocab = model.config.vocab_size - 1
    cache = preallocated_cache(model)
    model(torch.randint(0, vocab, (1, PREFIX), generator=generator), past_key_values=cache, use_cache=True)
    new = torch.randint(0, vocab, (1, fed), generator=generator)
    started = timer()
    model(new, past_key_values=cache, use_cache=True, logits_to_keep=fed)
    return timer() - started


@torch.inference_mode()
def head_ms(hidden: int, vocab: int, rounds: int, timer) -> dict:
    """The output head's matmul ([M, hidden] x [hidden, vocab]) alone, per dtype: the kernel-level figure."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.05
    scales = weight.abs().amax(1) / 127
    int8 = torch.round(weight / scales[:, None]).to(torch.int8)
    kernels = {
        "float32": lambda x: F.linear(x, weight),
        "bfloat16": lambda x, w=weight.bfloat16(): F.linear(x.bfloat16(), w),
        "int8": lambda x, s=scales.bfloat16(): torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8, s),
    }
    samples = {(name, m): [] for name in kernels for m in HEAD_ROWS}
    x = torch.randn(max(HEAD_ROWS), hidden, generator=generator)
    for _ in range(rounds):
        for (name, m), times in samples.items():
            kernels[name](x[:m])
            started = timer()
            kernels[name](x[:m])
            times.append(timer() - started)
    return {f"{name} {m}": round(1000 * statistics.median(t), 2) for (name, m), t in samples.items()}


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "model_name": platform.processor(), "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model_name"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
                break
    except OSError:
        pass
    return info


def measure(models: dict, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    timer = clock(threads)
    generator = torch.Generator().manual_seed(0)
    samples = {(name, n): [] for name in models for n in TOKENS_FED}
    for _ in range(rounds):
        for n in TOKENS_FED:
            for name, model in models.items():
                samples[name, n].append(pass_seconds(model, n, generator, timer))
    some = next(iter(models.values())).config
    return {
        "threads": threads,
        "clock": "thread CPU time" if threads == 1 else "wall",
        "pass_ms": {name: {n: round(1000 * statistics.median(samples[name, n]), 2) for n in TOKENS_FED} for name in models},
        "head_matmul_ms": head_ms(some.hidden_size, some.vocab_size, rounds, timer),
    }


def markdown(result: dict) -> str:
    lines = [f"# Cached pass cost by tokens fed ({result['model']}, prefix {PREFIX}, median of {result['rounds']})", "",
             f"CPU: {result['cpu']['model_name']}; flags: {' '.join(result['cpu']['flags'])}", ""]  # fmt: skip
    for run in result["runs"]:
        lines += [f"## {run['threads']} thread(s), clock: {run['clock']}", "",
                  "| variant | " + " | ".join(f"{n} tok" for n in TOKENS_FED) + " | cost(8)/cost(1) | x float32 at 1 |",
                  "|---|" + "---|" * (len(TOKENS_FED) + 2)]  # fmt: skip
        base = run["pass_ms"]["float32"][1] if "float32" in run["pass_ms"] else None
        for name, costs in run["pass_ms"].items():
            cells = " | ".join(f"{costs[n]:.1f}" for n in TOKENS_FED)
            speed = f"{base / costs[1]:.2f}x" if base else "-"
            lines.append(f"| {name} | {cells} | {costs[8] / costs[1]:.2f} | {speed} |")
        head = run["head_matmul_ms"]
        lines += ["", "Output head matmul alone (ms): " + ", ".join(f"{k} rows: {v}" for k, v in head.items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    torch.set_num_threads(1)  # the exact kernels probe their row-invariance at the thread count they run at
    models = {name: load_model(args.model, **VARIANTS[name])[0] for name in names}
    runs = [measure(models, int(t), args.rounds) for t in args.threads.split(",")]
    result = {"model": args.model, "rounds": args.rounds, "prefix": PREFIX, "cpu": cpu_info(), "runs": runs,
              "exact_kernels": {n: m.selfmtp_decode.get("exact_kernels") for n, m in models.items()}}  # fmt: skip
    out = Path(args.output)
    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "results.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
