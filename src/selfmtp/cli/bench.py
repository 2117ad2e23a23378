"""`selfmtp bench`: wall-clock decode speed of strategies beside transformers and llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfmtp.cli.common import add_model_args, add_no_progress, add_prepack, print_output


def add_parser(subparsers) -> None:
    from selfmtp.decoding.strategies import AUTO_HELP, STRATEGY_HELP
    from selfmtp.evaluation.bench import BASELINES

    parser = subparsers.add_parser(
        "bench",
        help="wall-clock decode speed of strategies beside transformers generate and llama.cpp",
        description="Time our NTP loop, each strategy, transformers `generate` and llama.cpp on the same prompts, "
        "interleaved in one run, and write bench.json and bench.md into --output: decode tokens/s, ms/token, "
        "time to first token, tokens per pass, and speedups as medians of paired per-prompt ratios.",
    )
    add_model_args(parser)
    add_prepack(parser)
    parser.add_argument(
        "--prompts", required=True, help="one prompt per line, or .jsonl with 'prompt' or 'question'"
    )
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument(
        "--strategies", default="ntp,confadapt:0.9:4,confadapt:0.9:8",
        help=f"comma-separated, each {STRATEGY_HELP}, or the load-aware {AUTO_HELP}; ntp is always measured (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--baselines",
        default="hf-generate",
        help=f"comma-separated, from {', '.join(BASELINES)} or '' (default: %(default)s)",
    )
    parser.add_argument(
        "--compare-dtypes", default="",
        help="comma-separated dtypes whose ntp (and hf-generate, if a baseline) run beside, on the same model "
        "loaded again (e.g. float32 beside the default auto/bf16); engines are named ntp@DTYPE (default: none)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="timed runs over all prompts (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the model's own where known)")
    parser.add_argument("--threads", type=int, help="torch and llama.cpp threads (default: torch's setting)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap prompts in the chat template (default: iff the tokenizer has one)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for bench.json and bench.md")
    add_no_progress(parser)
    parser.add_argument("--json", action="store_true", help="print bench.json instead of the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.evaluation.bench import BenchConfig, run_bench
    from selfmtp.evaluation.bench_report import format_markdown

    config = BenchConfig(
        model=args.model, prompts=args.prompts, strategies=[s for s in args.strategies.split(",") if s.strip()],
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()], runs=args.runs,
        max_new_tokens=args.max_new_tokens, limit=args.limit, gguf=args.gguf, chat=args.chat, threads=args.threads,
        seed=args.seed, dtype=args.dtype, device=args.device, prepack=args.prepack, progress=not args.no_progress,
        compare_dtypes=[d.strip() for d in args.compare_dtypes.split(",") if d.strip()],
    )  # fmt: skip
    result = run_bench(config, args.output)
    wrote = f"wrote {Path(args.output) / 'bench.json'} and bench.md"
    print_output(result, as_json=args.json, text=lambda r: f"{format_markdown(r)}\n{wrote}")
    return 0
