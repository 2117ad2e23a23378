"""`selfmtp bench --pass-cost`: what one cached pass costs by the tokens it feeds, per decode variant.

A pass: N new tokens on top of a cached PREFIX-token prefix, keeping logits for all N (as a verify pass
does). Variants (VARIANTS): float32, float32 with `--prepack`, bfloat16 with oneDNN-packed linears (the
default, models/prepack.py) and without, bfloat16 with the batch-invariant kernels decoding runs
(models/exact_kernels.py), int8 weight-only (models/int8.py) with and without them. One process holds
every variant; each round times every (variant, tokens fed) once, in turn, so a burst of load hits all
alike; medians over rounds. On a CPU the output head's matmul is also timed alone per dtype (the
kernel-level figure). Clocks (`pass_timer`): at 1 CPU thread the
thread's CPU time (a shared machine's preemption is not charged, as `decoding.pass_cost.pass_clock`
does), at more threads wall time (CPU time would add the threads up), on a GPU wall time after a
synchronize. The CPU's model name and flags go into the results. Records: docs/measurements/decode-dtype-cpu.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.decoding.pass_cost import pass_clock
from selfmtp.errors import SelfMTPError
from selfmtp.files import write_json_atomic, write_text_atomic
from selfmtp.progress import progress_bar

TOKENS_FED = (1, 2, 3, 4, 8, 16)
PREFIX = 200
VARIANTS = {  # name -> load_model keywords
    "float32": {"dtype": "float32"},
    "float32-prepack": {"dtype": "float32", "prepack": True},
    "bfloat16": {"dtype": "bfloat16"},  # packed linears (the default on a CPU), stock attention
    "bfloat16-unpacked": {"dtype": "bfloat16", "prepack": False},  # torch's stock bf16 calls
    "bfloat16-exact": {"dtype": "bfloat16", "exact_kernels": True},
    "int8": {"dtype": "int8"},
    "int8-exact": {"dtype": "int8", "exact_kernels": True},
}
HEAD_ROWS = (1, 2, 8)


def pass_timer(device, threads: int):
    """The clock a pass is timed with (module docstring)."""
    if torch.device(device).type == "cpu" and threads > 1:
        return time.perf_counter
    return pass_clock(device)  # 1 CPU thread: that thread's CPU time; GPU: wall after a synchronize


@torch.inference_mode()
def pass_seconds(model, fed: int, generator: torch.Generator, timer, prefix: int = PREFIX) -> float:
    """One pass feeding `fed` random tokens after a freshly cached `prefix`-token random prefix."""
    vocab = model.config.vocab_size - 1
    cache = preallocated_cache(model)
    ids = torch.randint(0, vocab, (1, prefix), generator=generator).to(model.device)
    model(ids, past_key_values=cache, use_cache=True)
    new = torch.randint(0, vocab, (1, fed), generator=generator).to(model.device)
    started = timer()
    model(new, past_key_values=cache, use_cache=True, logits_to_keep=fed)
    return timer() - started


def pass_cost_table(models: dict, *, rounds: int, timer, tokens_fed=TOKENS_FED, progress: bool = False) -> dict:
    """{variant: {tokens fed: median ms}}: every round times every (tokens fed, variant) once, in turn."""
    generator = torch.Generator().manual_seed(0)
    samples = {(name, n): [] for name in models for n in tokens_fed}
    for _ in progress_bar(range(rounds), desc="pass cost", unit="round", disable=not progress):
        for n in tokens_fed:
            for name, model in models.items():
                samples[name, n].append(pass_seconds(model, n, generator, timer))
    return {name: {n: round(1000 * statistics.median(samples[name, n]), 2) for n in tokens_fed} for name in models}


@torch.inference_mode()
def head_matmul_ms(hidden: int, vocab: int, rounds: int, timer) -> dict:
    """The output head's matmul ([M, hidden] x [hidden, vocab]) alone on the CPU, per dtype and M rows."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.05
    scales = weight.abs().amax(1) / 127
    int8 = torch.round(weight / scales[:, None]).to(torch.int8)
    kernels = {
        "float32": lambda x: F.linear(x, weight),
        "bfloat16": lambda x, w=weight.bfloat16(): F.linear(x.bfloat16(), w),
        "bfloat16 packed": _packed_kernel(weight.bfloat16()),
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


def _packed_kernel(weight: torch.Tensor):
    """The head as `PrepackedLinear` computes it (what bf16 decoding runs on a CPU with oneDNN)."""
    from selfmtp.models.prepack import PrepackedLinear, prepack_available

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype).requires_grad_(False)
    linear.weight.copy_(weight)
    linear = PrepackedLinear(linear) if prepack_available() else linear
    return lambda x: linear(x.to(weight.dtype))


def cpu_info() -> dict:
    """The CPU's model name and its vector-extension flags (what decides which kernels are fast)."""
    info = {"machine": platform.machine(), "model_name": platform.processor() or "unknown", "flags": []}
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


def measure_pass_cost(model: str, variants: list[str], *, threads: list[int], rounds: int, device: str = "cpu",
                      seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Load `model` once per variant, time the table at each thread count; the results dict."""
    from selfmtp.models.loading import load_model

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SelfMTPError(f"unknown pass-cost variant {unknown[0] if unknown else ''!r} (known: {', '.join(VARIANTS)})")
    if rounds < 1 or min(threads) < 1:
        raise SelfMTPError("--runs and --threads must be >= 1")
    torch.set_num_threads(threads[0])  # the exact kernels probe their row-invariance at the thread count they run at
    models = {name: load_model(model, seed=seed, device=device, **VARIANTS[name])[0] for name in variants}
    runs = []
    for count in threads:
        torch.set_num_threads(count)
        timer = pass_timer(device, count)
        run = {"threads": count, "clock": "thread CPU time" if timer is time.thread_time else "wall",
               "pass_ms": pass_cost_table(models, rounds=rounds, timer=timer, progress=progress)}  # fmt: skip
        if torch.device(device).type == "cpu":
            config = next(iter(models.values())).config
            run["head_matmul_ms"] = head_matmul_ms(config.hidden_size, config.vocab_size, rounds, timer)
        runs.append(run)
    return {"model": model, "rounds": rounds, "prefix": PREFIX, "device": device, "cpu": cpu_info(), "runs": runs,
            "exact_kernels": {n: m.selfmtp_decode.get("exact_kernels") for n, m in models.items()}}  # fmt: skip


def format_pass_cost(result: dict) -> str:
    """The results as markdown: one table per thread count, ratios to float32's 1-token pass."""
    lines = [f"# Cached pass cost by tokens fed ({result['model']}, prefix {result['prefix']}, median of {result['rounds']})",
             "", f"CPU: {result['cpu']['model_name']}; flags: {' '.join(result['cpu']['flags'])}", ""]  # fmt: skip
    for run in result["runs"]:
        fed = [int(n) for n in next(iter(run["pass_ms"].values()))]
        lines += [f"## {run['threads']} thread(s), clock: {run['clock']}", "",
                  "| variant | " + " | ".join(f"{n} tok" for n in fed) + " | cost(8)/cost(1) | x float32 at 1 |",
                  "|---|" + "---|" * (len(fed) + 2)]  # fmt: skip
        costs_of = {name: {int(n): ms for n, ms in costs.items()} for name, costs in run["pass_ms"].items()}
        base = costs_of["float32"][1] if "float32" in costs_of else None
        for name, costs in costs_of.items():
            cells = " | ".join(f"{costs[n]:.1f}" for n in fed)
            speed = f"{base / costs[1]:.2f}x" if base else "-"
            lines.append(f"| {name} | {cells} | {costs[8] / costs[1]:.2f} | {speed} |")
        if "head_matmul_ms" in run:
            head = run["head_matmul_ms"]
            lines += ["", "Output head matmul alone (ms): " + ", ".join(f"{k} rows: {v}" for k, v in head.items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def run_pass_cost(model: str, variants: list[str], output_dir: str | Path, **options) -> dict:
    """`measure_pass_cost`, written to OUTPUT/pass_cost.json and pass_cost.md (atomically)."""
    result = measure_pass_cost(model, variants, **options)
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "pass_cost.json", result)
    write_text_atomic(output_dir / "pass_cost.md", format_pass_cost(result))
    return result
