"""`selfmtp bench`: wall-clock decode speed of strategies beside transformers and llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfmtp.cli.common import add_model_args, add_no_progress, add_prepack, print_output


def add_parser(subparsers) -> None:
    from selfmtp.decoding.strategies import AUTO_HELP, STRATEGY_HELP
    from selfmtp.evaluation.bench import BASELINES
    from selfmtp.evaluation.pass_cost_bench import PREFIX, TOKENS_FED, VARIANTS

    parser = subparsers.add_parser(
        "bench",
        help="wall-clock decode speed of strategies beside transformers generate and llama.cpp",
        description="Time our NTP loop, each strategy, transformers `generate` and llama.cpp on the same prompts, "
        "interleaved in one run, and write bench.json and bench.md into --output: decode tokens/s, ms/token, "
        "time to first token, tokens per pass, and speedups as medians of paired per-prompt ratios. "
        "With --pass-cost: the cost of one cached pass by tokens fed, per decode variant, instead.",
    )
    add_model_args(parser)
    add_prepack(parser)
    parser.add_argument(
        "--prompts", help="one prompt per line, or .jsonl with 'prompt' or 'question' (required unless --pass-cost)"
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
    parser.add_argument(
        "--pass-cost", nargs="?", const=",".join(VARIANTS), metavar="VARIANTS",
        help=f"instead of decoding prompts: time one cached pass feeding {', '.join(map(str, TOKENS_FED))} tokens after a "
        f"{PREFIX}-token prefix (median over --runs rounds, at --threads), for each comma-separated variant of "
        f"{', '.join(VARIANTS)} (default: all; the variant sets the dtype), and on a CPU the output head's matmul "
        "alone; writes pass_cost.json and pass_cost.md into --output",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, help="timed runs over all prompts (default: 3; with --pass-cost: rounds, default 12)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the model's own where known)")
    parser.add_argument("--threads", type=int, help="torch and llama.cpp threads (default: torch's setting; with --pass-cost: 1)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap prompts in the chat template (default: iff the tokenizer has one)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for bench.json and bench.md (or pass_cost.*)")
    add_no_progress(parser)
    parser.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.errors import SelfMTPError
    from selfmtp.evaluation.bench import BenchConfig, run_bench
    from selfmtp.evaluation.bench_report import format_markdown

    if args.pass_cost is not None:
        return run_pass_cost(args)
    if not args.prompts:
        raise SelfMTPError("bench needs --prompts (a file of prompts), or --pass-cost")
    config = BenchConfig(
        model=args.model, prompts=args.prompts, strategies=[s for s in args.strategies.split(",") if s.strip()],
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
        runs=3 if args.runs is None else args.runs, max_new_tokens=args.max_new_tokens, limit=args.limit, gguf=args.gguf, chat=args.chat, threads=args.threads,
        seed=args.seed, dtype=args.dtype, device=args.device, prepack=args.prepack, progress=not args.no_progress,
        compare_dtypes=[d.strip() for d in args.compare_dtypes.split(",") if d.strip()],
    )  # fmt: skip
    result = run_bench(config, args.output)
    wrote = f"wrote {Path(args.output) / 'bench.json'} and bench.md"
    print_output(result, as_json=args.json, text=lambda r: f"{format_markdown(r)}\n{wrote}")
    return 0


def run_pass_cost(args) -> int:
    from selfmtp.evaluation.pass_cost_bench import format_pass_cost, run_pass_cost

    variants = [v.strip() for v in args.pass_cost.split(",") if v.strip()]
    rounds = 12 if args.runs is None else args.runs
    result = run_pass_cost(args.model, variants, args.output, threads=[args.threads or 1], rounds=rounds,
                           device=args.device, seed=args.seed, progress=not args.no_progress)  # fmt: skip
    wrote = f"wrote {Path(args.output) / 'pass_cost.json'} and pass_cost.md"
    print_output(result, as_json=args.json, text=lambda r: f"{format_pass_cost(r)}\n{wrote}")
    return 0
