"""The accelerator check behind benchmarks/gpu_check.sh: is selfmtp right and how fast is it on this device?

    benchmarks/gpu_check.sh                          # cuda, smollm2-135m; log under docs/measurements/
    benchmarks/gpu_check.sh --device cpu --fast      # the same steps on the tiny model (the test runs this)

1. train: `--steps` bf16 steps with `--parallel fsdp` on one device (torchrun, one process): loss,
   tokens/s, CUDA peak memory beside `selfmtp plan`'s figure for the same setting.
2. static:1 (our KV-cached loop, one token per pass) against transformers greedy `generate`, both
   bf16, on a few prompts: where they differ, the position and the top-2 logit gap there (a bf16 tie
   when the gap is within bf16 rounding).
3. the cost of one cached pass by tokens fed (`selfmtp bench --pass-cost`'s table, bf16).
4. `selfmtp bench` with ntp and ConfAdapt (and `verify` when this checkout has that strategy).
Everything printed also goes to `--log` (default on a GPU: docs/measurements/gpu_check-<device>-<date>.txt).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 12 times 7? Answer:", "Tom has 5 apples and buys 3 more. How many apples does he have?",
           "Write one sentence about the sea.", "List three prime numbers:"]


class Log:
    def __init__(self, path: Path | None):
        self.path, self.lines = path, []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines) + "\n")


def run(cmd: list[str], log: Log) -> subprocess.CompletedProcess:
    log(f"$ {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        log(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"gpu_check: step failed with status {done.returncode}")
    return done


def train_check(args, workdir: Path, log: Log) -> None:
    from selfmtp.tasks.tiny_gsm import generate_problems, write_jsonl

    data = write_jsonl(workdir / "train.jsonl", generate_problems(256, seed=0))
    out = workdir / "train"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "selfmtp", "train",
         "--model", args.model, "--data", str(data), "--output", str(out), "--device", args.device,
         "--parallel", "fsdp", "--dtype", "bfloat16", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         "--seq-len", str(args.seq_len), "--k-max", str(args.k_max), "--lr", "1e-5", "--warmup", "2",
         "--eval-every", "0", "--save-every", str(args.steps), "--template", "plain", "--no-progress", "--seed", "0"], log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    peak = f", peak memory {rows[-1]['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in rows[-1] else ""
    log(f"train (fsdp, bf16, 1 device): loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} over {len(rows)} steps, "
        f"{sum(r['tokens_per_s'] for r in later) / len(later):.0f} tokens/s after the first step{peak}")
    plan = run([sys.executable, "-m", "selfmtp", "plan", "--model", args.model, "--gpus", "1", "--parallel", "fsdp",
                "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--k-max", str(args.k_max),
                "--json"], log)
    planned = json.loads(plan.stdout)["plans"][0]
    log(f"planned per device (fsdp, no checkpointing): {planned['total'] / 1e9:.2f} GB ({', '.join(f'{k} {v / 1e9:.2f}' for k, v in planned['parts'].items())})")
    log(f"final/ written: {(out / 'final' / 'config.json').is_file()}; sharded checkpoint: "
        f"{(out / 'checkpoints' / f'step-{args.steps:07d}' / '.metadata').is_file()}")


def greedy_check(mtp, args, log: Log) -> None:
    """static:1 against transformers greedy, token for token, in bf16."""
    model, differ = mtp.model, 0
    for prompt in PROMPTS:
        ids = mtp.encode(prompt, chat=False)
        ours = mtp.generate(prompt, "static:1", max_new_tokens=args.new_tokens, chat=False).token_ids
        with torch.inference_mode():
            theirs = model.generate(torch.tensor([ids], device=model.device), do_sample=False,
                                    max_new_tokens=len(ours), min_new_tokens=len(ours), pad_token_id=mtp.tokenizer.eos_token_id)
        theirs = theirs[0, len(ids):].tolist()
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if first is None:
            log(f"static:1 == greedy on {len(ours)} tokens: {prompt[:40]!r}")
            continue
        differ += 1
        with torch.inference_mode():
            logits = model(torch.tensor([ids + theirs[:first]], device=model.device)).logits[0, -1].float()
        top = logits.topk(2)
        log(f"static:1 != greedy at token {first} of {prompt[:40]!r}: ours {ours[first]} theirs {theirs[first]}; "
            f"top-2 logit gap there {float(top.values[0] - top.values[1]):.4f} (bf16 tie if ~<= 0.0625)")
    log(f"static:1 vs greedy: {len(PROMPTS) - differ}/{len(PROMPTS)} prompts identical")


def pass_cost_check(mtp, args, log: Log) -> None:
    from selfmtp.evaluation.pass_cost_bench import PREFIX, pass_cost_table, pass_timer

    timer = pass_timer(args.device, torch.get_num_threads())
    costs = pass_cost_table({"bf16": mtp.model}, rounds=5, timer=timer, tokens_fed=(1, 2, 4, 8, 16, 32))["bf16"]
    log(f"pass cost by tokens fed (ms, {PREFIX}-token prefix): " + ", ".join(f"{n}: {ms:.2f}" for n, ms in costs.items()))


def bench_check(args, workdir: Path, log: Log) -> None:
    from selfmtp.decoding.strategies import parse_strategy
    from selfmtp.errors import SelfMTPError

    strategies = ["ntp", "confadapt:0.9:8"]
    try:
        parse_strategy("verify")
        strategies.append("verify")
    except SelfMTPError:
        log("bench: no `verify` strategy in this checkout, skipped")
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    done = run([sys.executable, "-m", "selfmtp", "bench", "--model", args.model, "--prompts", str(prompts),
                "--strategies", ",".join(strategies), "--runs", "1", "--max-new-tokens", str(args.new_tokens),
                "--device", args.device, "--dtype", "bfloat16", "--output", str(workdir / "bench"), "--no-progress"], log)
    log(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fast", action="store_true", help="tiny model, few steps and tokens (for a CPU test)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--log", help="also write the output here (default on a GPU: docs/measurements/...)")
    args = parser.parse_args(argv)
    if args.fast:
        args.model, args.steps, args.batch_size, args.seq_len, args.k_max, args.new_tokens = "tiny", 2, 2, 64, 4, 8
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --device cpu to try it on the CPU)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    default_log = ROOT / "docs" / "measurements" / f"gpu_check-{args.model}-{stamp}.txt"
    log = Log(Path(args.log) if args.log else (default_log if args.device != "cpu" else None))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    log(f"gpu_check {stamp} on {device_name}: torch {torch.__version__}, model {args.model}")
    sys.path.insert(0, str(ROOT / "src"))
    from selfmtp.api import MTPModel

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train_check(args, workdir, log)
        mtp = MTPModel.from_pretrained(args.model, dtype="bfloat16", device=args.device)
        greedy_check(mtp, args, log)
        pass_cost_check(mtp, args, log)
        del mtp
        bench_check(args, workdir, log)
    log("gpu_check: done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
