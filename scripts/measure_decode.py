"""Measure the decode loop (not a test): our NTP loop vs transformers `generate`, the cost of one
cached pass by tokens fed, and batched throughput.

    PYTHONPATH=src python scripts/measure_decode.py --out decode_measurements.json

Runs are interleaved (ours, then transformers, per prompt) so background load hits both alike;
the figures are medians over `--runs`. On a shared CPU treat them as noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from selfmtp.api import MTPModel

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def load_questions(path: Path, n: int) -> list[str]:
    with path.open() as f:
        return [json.loads(next(f))["question"] for _ in range(n)]


def hf_generate(mtp: MTPModel, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, float]:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = mtp.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=mtp.tokenizer.pad_token_id,
        )  # fmt: skip
    return out.shape[1] - ids.shape[1], time.perf_counter() - start


def ntp_vs_transformers(mtp: MTPModel, questions: list[str], max_new_tokens: int, runs: int) -> dict:
    per_run = []
    for run in range(runs):
        ours_tokens = ours_seconds = hf_tokens = hf_seconds = 0.0
        for question in questions:
            start = time.perf_counter()
            result = mtp.generate(question, strategy="ntp", max_new_tokens=max_new_tokens)
            ours_seconds += time.perf_counter() - start  # includes tokenisation and text decoding
            ours_tokens += result.num_tokens
            tokens, seconds = hf_generate(mtp, mtp.encode(question), max_new_tokens)
            hf_tokens, hf_seconds = hf_tokens + tokens, hf_seconds + seconds
            assert tokens == result.num_tokens, "both engines decode the same greedy tokens"
        row = {
            "run": run,
            "ours_tokens_per_s": ours_tokens / ours_seconds,
            "transformers_tokens_per_s": hf_tokens / hf_seconds,
        }
        row["ratio"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
        print(json.dumps(row), flush=True)
        per_run.append(row)
    return {
        "runs": per_run,
        "tokens_per_run": int(ours_tokens),
        "median_ours_tokens_per_s": statistics.median(r["ours_tokens_per_s"] for r in per_run),
        "median_transformers_tokens_per_s": statistics.median(
            r["transformers_tokens_per_s"] for r in per_run
        ),
        "median_ratio": statistics.median(r["ratio"] for r in per_run),
    }


def pass_cost(mtp: MTPModel, prefix_ids: list[int], fed_counts: list[int], repeats: int) -> dict:
    """Median ms of one cached forward feeding n tokens after `prefix_ids` (cache cropped back each time)."""
    model, cache = mtp.model, DynamicCache(config=mtp.model.config)
    prefix = len(prefix_ids)
    with torch.inference_mode():
        model(input_ids=torch.tensor([prefix_ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        costs = {}
        for n in fed_counts:
            ids = torch.tensor([prefix_ids[-n:]])
            positions = torch.arange(prefix, prefix + n)[None]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(
                    input_ids=ids,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=n,
                )
                times.append(time.perf_counter() - start)
                cache.crop(-n)
            costs[str(n)] = 1000 * statistics.median(times)
            print(f"pass feeding {n:2d} tokens after {prefix}: {costs[str(n)]:.1f} ms", flush=True)
    return {"prefix_tokens": prefix, "median_ms_by_tokens_fed": costs}


def batched_throughput(
    mtp: MTPModel, questions: list[str], max_new_tokens: int, batch_sizes: list[int], strategies: list[str]
) -> list[dict]:
    rows = []
    for strategy in strategies:
        for batch_size in batch_sizes:
            start = time.perf_counter()
            results = mtp.generate(
                questions, strategy=strategy, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            seconds = time.perf_counter() - start
            tokens = sum(r.num_tokens for r in results)
            row = {"strategy": strategy, "batch_size": batch_size, "tokens": tokens, "seconds": seconds,
                   "tokens_per_s": tokens / seconds, "tokens_per_pass": tokens / sum(r.forward_passes for r in results)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4, help="GSM8K train questions used (chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--batch-strategies", nargs="*", default=["ntp", "confadapt:0.9:16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="decode_measurements.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed)
    questions = load_questions(GSM8K, args.prompts)
    mtp.generate(questions[0], max_new_tokens=8)  # warm-up (allocator, lazy imports)
    report = {
        "model": args.model,
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads (shared CPU: noisy)",
        "torch": torch.__version__,
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(questions),
        "ntp_vs_transformers_generate": ntp_vs_transformers(mtp, questions, args.max_new_tokens, args.runs),
    }
    first = mtp.generate(questions[0], max_new_tokens=args.max_new_tokens)
    prefix = (mtp.encode(questions[0]) + first.token_ids)[:200]
    report["pass_cost"] = pass_cost(mtp, prefix, [1, 2, 4, 8, 16], repeats=15)
    if args.batch_sizes:
        report["batched"] = batched_throughput(
            mtp, questions, args.max_new_tokens, args.batch_sizes, args.batch_strategies
        )
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
