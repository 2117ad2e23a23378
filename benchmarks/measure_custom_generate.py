"""#28's targets for `model.generate(custom_generate=DIR, trust_remote_code=True, strategy=...)` on a student:
the same tokens as transformers' greedy `generate` on every prompt, tokens per pass against `selfmtp generate`'s
(the library call `MTPModel.generate`), and wall clock against it at batch 1.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_custom_generate.py --model runs/demo/train/final \\
        --limit 100 --output docs/measurements/custom-generate-cpu

Per prompt (tiny-gsm test, plain prompts, batch 1, one torch thread), in an order that rotates so drift in the
machine's load falls on every path alike: transformers' greedy (`GenerationMixin.generate`, do_sample=False),
custom_generate called with `custom_generate=DIR` (transformers loads the module on every call), the same
function bound once (the model loaded with trust_remote_code=True: `model.generate` is it), and
`MTPModel.generate` on a model loaded by selfmtp. Writes results.json (per prompt and pooled) in --output.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin

from selfmtp.api import MTPModel
from selfmtp.evaluation.tasks import load_task
from selfmtp.files import write_json_atomic

PATHS = ("transformers_greedy", "custom_generate_dir", "custom_generate_bound", "selfmtp_generate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a student directory selfmtp wrote (with custom_generate/)")
    parser.add_argument("--strategy", default="verify:8")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = str(Path(args.model).resolve())
    stock = AutoModelForCausalLM.from_pretrained(directory)  # `generate` is transformers' own
    bound = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)  # `generate` is the custom one
    tokenizer = AutoTokenizer.from_pretrained(directory)
    mtp = MTPModel.from_pretrained(directory)
    task = load_task("tiny-gsm", limit=args.limit)
    settings = {"max_new_tokens": args.max_new_tokens}

    def run(path: str, text: str, ids: dict) -> tuple[list[int], int, float]:
        start = time.perf_counter()
        if path == "selfmtp_generate":
            result = mtp.generate(text, strategy=args.strategy, max_new_tokens=args.max_new_tokens, chat=False)
            return result.token_ids, result.forward_passes, time.perf_counter() - start
        if path == "transformers_greedy":
            out, passes = GenerationMixin.generate(stock, **ids, do_sample=False, **settings), None
        elif path == "custom_generate_dir":
            out = stock.generate(**ids, custom_generate=directory, trust_remote_code=True, strategy=args.strategy,
                                 **settings)
            passes = int(out.forward_passes[0])
        else:
            out = bound.generate(**ids, strategy=args.strategy, **settings)
            passes = int(out.forward_passes[0])
        seconds = time.perf_counter() - start
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        return new, passes if passes is not None else len(new), seconds

    rows = []
    for i, item in enumerate(task.items):
        text = task.prompt(item, tokenizer)
        ids = tokenizer(text, return_tensors="pt")
        if i == 0:  # warm-up: first-call costs (module copy, caches) are not per-prompt costs
            for path in PATHS:
                run(path, text, ids)
        order = PATHS[i % len(PATHS):] + PATHS[: i % len(PATHS)]
        row = {"prompt": i}
        for path in order:
            tokens, passes, seconds = run(path, text, ids)
            row[path] = {"tokens": tokens, "passes": passes, "seconds": seconds}
        rows.append(row)
        print(f"{i + 1}/{len(task.items)}", flush=True)

    summary = summarize(rows)
    if not args.strategy.startswith("verify"):  # #28's targets are for exact decoding: ConfAdapt is not greedy
        del summary["targets"]
    summary.update(model=args.model, strategy=args.strategy, prompts=len(rows), max_new_tokens=args.max_new_tokens,
                   torch_threads=1, machine=f"{platform.processor() or platform.machine()}, {platform.platform()}",
                   torch=torch.__version__)
    write_json_atomic(Path(args.output) / "results.json", {"summary": summary, "per_prompt": compact(rows)})
    print(json.dumps(summary, indent=2))


def compact(rows: list[dict]) -> list[dict]:
    """Per prompt and path: new tokens, passes, seconds, and whether the tokens are transformers' greedy ones."""
    return [{"prompt": r["prompt"], **{path: {"new_tokens": len(r[path]["tokens"]), "passes": r[path]["passes"],
                                              "seconds": round(r[path]["seconds"], 5),
                                              "same_as_greedy": r[path]["tokens"] == r["transformers_greedy"]["tokens"]}
                                       for path in PATHS}} for r in rows]


def summarize(rows: list[dict]) -> dict:
    def pooled(path: str) -> dict:
        tokens = sum(len(r[path]["tokens"]) for r in rows)
        passes = sum(r[path]["passes"] for r in rows)
        seconds = sum(r[path]["seconds"] for r in rows)
        return {"tokens": tokens, "passes": passes, "tokens_per_pass": tokens / passes, "seconds": seconds}

    figures = {path: pooled(path) for path in PATHS}
    greedy = [r["transformers_greedy"]["tokens"] for r in rows]
    same = {path: sum(r[path]["tokens"] == g for r, g in zip(rows, greedy, strict=True)) for path in PATHS[1:]}
    selfmtp = figures["selfmtp_generate"]
    ours = [r["selfmtp_generate"]["tokens"] for r in rows]
    return {
        "paths": figures,
        "same_tokens_as_transformers_greedy": same,
        "same_tokens_and_passes_as_selfmtp_generate": {
            path: sum(r[path]["tokens"] == o and r[path]["passes"] == r["selfmtp_generate"]["passes"]
                      for r, o in zip(rows, ours, strict=True)) for path in PATHS[1:3]},
        "tokens_per_pass_vs_selfmtp": {p: figures[p]["tokens_per_pass"] / selfmtp["tokens_per_pass"] for p in PATHS[1:3]},
        "wall_clock_vs_selfmtp": {p: figures[p]["seconds"] / selfmtp["seconds"] for p in PATHS},
        "targets": {
            "same_tokens_100_of_100": same["custom_generate_dir"] == len(rows),
            "tokens_per_pass_within_5pct": abs(figures["custom_generate_dir"]["tokens_per_pass"]
                                               / selfmtp["tokens_per_pass"] - 1) <= 0.05,
            "wall_clock_within_15pct": figures["custom_generate_dir"]["seconds"] / selfmtp["seconds"] <= 1.15,
        },
    }


if __name__ == "__main__":
    main()
