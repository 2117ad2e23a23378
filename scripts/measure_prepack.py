"""Pass cost by tokens fed, and batch-1 decode speed, with and without `--prepack` (models/prepack.py).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/measure_prepack.py --model smollm2-135m-mtp \
        --prompts src/selfmtp/assets/gsm8k-dev-sample.jsonl --output docs/measurements/prepack-cpu

One process holds the model twice (stock nn.Linear, and prepacked); every timing alternates between
them round by round, so both see the same machine load. Pass cost: one forward of N new tokens on top
of a cached 100-token prefix, median over rounds. Decode: `--strategies` at batch 1 on the prompts
(chat template), tokens/s median over rounds, and whether the packed model's tokens equal the stock's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from selfmtp.api import MTPModel, read_prompts
from selfmtp.files import write_json_atomic, write_text_atomic

TOKENS_FED = (1, 2, 3, 4, 6, 8, 12, 16)
PREFIX = 100


@torch.no_grad()
def pass_seconds(model, fed: int, generator: torch.Generator) -> float:
    vocab = model.config.vocab_size
    cache = DynamicCache()
    model(torch.randint(0, vocab, (1, PREFIX), generator=generator), past_key_values=cache, use_cache=True)
    new = torch.randint(0, vocab, (1, fed), generator=generator)
    started = time.perf_counter()
    model(new, past_key_values=cache, use_cache=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-mtp")
    parser.add_argument("--prompts", required=True, help="jsonl or text prompts for the decode part")
    parser.add_argument("--limit", type=int, default=4, help="prompts decoded per round (default 4)")
    parser.add_argument("--strategies", default="ntp,verify:8,verify:8:lookup")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5, help="pass-cost rounds (decode: rounds // 2, at least 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {"stock": MTPModel.from_pretrained(args.model), "prepacked": MTPModel.from_pretrained(args.model, prepack=True)}
    generator = torch.Generator().manual_seed(0)
    costs = {(name, n): [] for name in models for n in TOKENS_FED}
    for _ in range(args.rounds):
        for n in TOKENS_FED:
            for name, mtp in models.items():
                costs[name, n].append(pass_seconds(mtp.model, n, generator))
    ms = {key: 1e3 * statistics.median(v) for key, v in costs.items()}

    prompts = read_prompts(args.prompts)[: args.limit]
    decode = {(name, s): [] for name in models for s in args.strategies.split(",")}
    tokens = {}
    for _ in range(max(1, args.rounds // 2)):
        for strategy in args.strategies.split(","):
            for name, mtp in models.items():
                started = time.perf_counter()
                results = mtp.generate(prompts, strategy=strategy, max_new_tokens=args.max_new_tokens, chat=True, batch_size=1)
                seconds = time.perf_counter() - started
                decode[name, strategy].append(sum(r.num_tokens for r in results) / seconds)
                tokens[name, strategy] = [r.token_ids for r in results]

    rows = [{"tokens_fed": n, "stock_ms": ms["stock", n], "prepacked_ms": ms["prepacked", n]} for n in TOKENS_FED]
    speeds = [{"strategy": s, **{f"{name}_tokens_per_s": statistics.median(decode[name, s]) for name in models},
               "same_tokens": tokens["stock", s] == tokens["prepacked", s]} for s in args.strategies.split(",")]  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"model": args.model, "threads": args.threads, "rounds": args.rounds,
                                             "pass_cost": rows, "decode": speeds})  # fmt: skip
    ntp = {name: statistics.median(decode[name, "ntp"]) for name in models} if "ntp" in args.strategies.split(",") else None
    lines = [f"# Pass cost and batch-1 decode, stock vs prepacked linears ({args.model}, {args.threads} thread)", "",
             "| tokens fed | stock ms | x stock 1 | prepacked ms | x stock 1 |", "|---|---|---|---|---|"]  # fmt: skip
    base = ms["stock", 1]
    lines += [f"| {r['tokens_fed']} | {r['stock_ms']:.1f} | {r['stock_ms'] / base:.2f} | {r['prepacked_ms']:.1f} | "
              f"{r['prepacked_ms'] / base:.2f} |" for r in rows]  # fmt: skip
    lines += ["", "| strategy | stock tokens/s | prepacked tokens/s | prepacked / stock | vs stock ntp | same tokens |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in speeds:
        a, b = row["stock_tokens_per_s"], row["prepacked_tokens_per_s"]
        vs = f"{b / ntp['stock']:.2f}x" if ntp else "-"
        lines.append(f"| {row['strategy']} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {vs} | {row['same_tokens']} |")
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
