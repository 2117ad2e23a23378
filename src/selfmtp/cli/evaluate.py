"""`selfmtp eval`: the accuracy-vs-acceleration sweep over decoding strategies."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfmtp.cli.common import add_model_args, add_no_progress, add_prepack, print_output


def add_parser(subparsers) -> None:
    from selfmtp.evaluation.sweep import DEFAULT_STRATEGIES
    from selfmtp.evaluation.tasks import TASK_HELP

    parser = subparsers.add_parser(
        "eval",
        help="accuracy vs acceleration sweep over decoding strategies (GSM8K, BBH, tiny-gsm)",
        description="Decode a task's items with each strategy, grade the answers and write results.json, "
        "results.md and pareto.png into --output. Finished strategies are kept; a rerun continues.",
    )
    add_model_args(parser)
    add_prepack(parser)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument(
        "--data", help="gsm8k: a jsonl of {question, answer}; bbh: the BBH folder; tiny-gsm: optional jsonl "
        "(default: generated test problems)",
    )  # fmt: skip
    parser.add_argument("--fewshot-data", help="gsm8k: jsonl the exemplars come from (default: --data)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items")
    parser.add_argument("--shots", type=int, default=8, help="gsm8k few-shot exemplars (default: 8)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=False,
        help="put the prompt in the model's chat template (instruct models; default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES,
        help=f"comma-separated strategies, 'teacher' allowed with --teacher (default: {DEFAULT_STRATEGIES})",
    )  # fmt: skip
    parser.add_argument("--teacher", metavar="SPEC", help="also report greedy NTP of this model as 'teacher'")
    parser.add_argument(
        "--coherence",
        action="store_true",
        help="also report the teacher's NLL per generated token for every strategy (needs --teacher)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    parser.add_argument("--output", required=True, help="folder for results.json, results.md, pareto.png")
    parser.add_argument(
        "--draft-headroom", metavar="verify:K",
        help="instead of decoding: on this eval's finished verify:K (or verify:K:tree) run in --output (give the "
        "eval's own flags), count verify's tokens per pass offline from one teacher-forced pass per answer, under "
        "the real draft rule, the threshold without back-off and every proposal fed, merged and tree; writes "
        "draft_headroom_verify_K.json into --output",
    )  # fmt: skip
    add_no_progress(parser)
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.evaluation.report import format_table
    from selfmtp.evaluation.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        model=args.model, task=args.task, strategies=args.strategies.split(","), teacher=args.teacher,
        data=args.data, fewshot_data=args.fewshot_data, limit=args.limit, shots=args.shots, chat=args.chat,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
        device=args.device, prepack=args.prepack, coherence=args.coherence,
    )  # fmt: skip
    if args.draft_headroom:
        return run_draft_headroom(config, args)
    results = run_sweep(config, args.output, progress=not args.no_progress)
    wrote = f"wrote {Path(args.output) / 'results.json'}, results.md and pareto.png"
    print_output(results, as_json=args.json, text=lambda r: f"{format_table(r)}\n{wrote}")
    return 0


def run_draft_headroom(config, args) -> int:
    from selfmtp.evaluation.draft_headroom import format_headroom, run_draft_headroom

    result = run_draft_headroom(config, args.draft_headroom, args.output, progress=not args.no_progress)
    summary = {key: value for key, value in result.items() if key not in ("per_item", "mask_counts")}
    print_output(summary, as_json=args.json, text=format_headroom)
    return 0
