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
    """Each prompt is decoded by both engines back to back, `runs` times.

    Two summaries resist background load differently: the median of the paired per-prompt ratios, and
    best-of-runs (each engine's fastest time per prompt, the usual estimate of uncontended speed).
    """
    pairs = []  # (prompt index, tokens, our seconds, transformers seconds)
    for run in range(runs):
        for p, question in enumerate(questions):
            start = time.perf_counter()
            result = mtp.generate(question, strategy="ntp", max_new_tokens=max_new_tokens)
            ours = time.perf_counter() - start  # includes the chat template and decoding the text
            tokens, theirs = hf_generate(mtp, mtp.encode(question), max_new_tokens)
            assert tokens == result.num_tokens, "both engines decode the same greedy tokens"
            pairs.append((p, tokens, ours, theirs))
            print(
                f"run {run} prompt {p}: {tokens} tokens, ours {tokens / ours:.1f} tok/s, transformers {tokens / theirs:.1f} tok/s",
                flush=True,
            )
    tokens = {p: t for p, t, _, _ in pairs}
    best_ours = {p: min(o for q, _, o, _ in pairs if q == p) for p in tokens}
    best_theirs = {p: min(h for q, _, _, h in pairs if q == p) for p in tokens}
    total = sum(tokens.values())
    return {
        "runs": runs,
        "tokens_per_run": total,
        "paired": [{"prompt": p, "tokens": t, "ours_s": o, "transformers_s": h} for p, t, o, h in pairs],
        "median_paired_ratio": statistics.median(h / o for _, _, o, h in pairs),
        "best_of_runs_ours_tokens_per_s": total / sum(best_ours.values()),
        "best_of_runs_transformers_tokens_per_s": total / sum(best_theirs.values()),
        "best_of_runs_ratio": sum(best_theirs.values()) / sum(best_ours.values()),
    }


def pass_cost(mtp: MTPModel, prefix_ids: list[int], fed_counts: list[int], repeats: int) -> dict:
    """Median ms of one cached forward feeding n tokens after `prefix_ids` (cache cropped back each time)."""
    model, cache = mtp.model, DynamicCache(config=mtp.model.config)
    prefix, device = len(prefix_ids), mtp.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    with torch.inference_mode():
        model(input_ids=torch.tensor([prefix_ids], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        costs = {}
        for n in fed_counts:
            ids = torch.tensor([prefix_ids[-n:]], device=device)
            positions = torch.arange(prefix, prefix + n, device=device)[None]
            times = []
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(
                    input_ids=ids,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=n,
                )
                sync()
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
    parser.add_argument("--runs", type=int, default=5)
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
