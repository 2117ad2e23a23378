"""`selfmtp demo`: the whole method on CPU in minutes."""

from __future__ import annotations

import argparse

from selfmtp.cli.common import PREFIX_TARGET_HELP, SUPERVISION_HELP, add_no_progress, print_json


def add_parser(subparsers) -> None:
    from selfmtp.demo import DemoConfig
    from selfmtp.training.objective import PREFIX_TARGETS, SUPERVISION

    d = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="the whole method on CPU in minutes: tiny teacher -> MTP self-distillation -> eval sweep",
        description="End to end on tiny-gsm: load the committed tiny teacher, self-distil it into a multi-token "
        "predictor, sweep static k and ConfAdapt against the teacher's own greedy accuracy, then print the table "
        "and write results.json, results.md, pareto.png, chunks.html and demo.json into --output. Resumable.",
    )
    add = parser.add_argument
    add("--output", default=d.output, help=f"output folder (default: {d.output})")
    add("--teacher", default=d.teacher, help=f"teacher model spec (default: {d.teacher})")
    add("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    add("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr:g})")
    add(
        "--prefix-loss",
        type=float,
        default=d.prefix_loss,
        help=f"next-token loss weight (default: {d.prefix_loss:g})",
    )
    add(
        "--supervision",
        choices=SUPERVISION,
        default=d.supervision,
        help=f"{SUPERVISION_HELP} (default: {d.supervision})",
    )
    add(
        "--prefix-target",
        choices=PREFIX_TARGETS,
        default=d.prefix_target,
        help=f"{PREFIX_TARGET_HELP} (default: {d.prefix_target})",
    )
    add(
        "--k-max", type=int, default=d.k_max, help=f"largest k in training and ConfAdapt (default: {d.k_max})"
    )
    add(
        "--gated",
        action=argparse.BooleanOptionalAction,
        default=d.gated,
        help="train gated deltas that act only at <mtp> (k=1 stays the teacher exactly; --prefix-loss unused) "
        "into OUTPUT/train-gated, or the plain recipe (default: %(default)s)",
    )
    add("--train-problems", type=int, default=d.train_problems, help=f"(default: {d.train_problems})")
    add(
        "--eval-problems",
        type=int,
        default=d.eval_problems,
        help=f"tiny-gsm test problems (default: {d.eval_problems})",
    )
    add("--strategies", default=",".join(d.strategies), help="comma-separated sweep (default: %(default)s)")
    add(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"per answer (default: {d.max_new_tokens})",
    )
    add("--threads", type=int, default=d.threads, help=f"torch threads (default: {d.threads})")
    add("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    add("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "int8"],
        help="dtype of the decoding stages (default: auto: bf16 where this machine's kernels make it pay; "
        "training runs in float32)")
    add("--real", action="store_true", help="then decode a few shipped GSM8K dev questions with the real model "
        "(static k=1, verify:8, ConfAdapt 0.9; batch 1) into OUTPUT/real")  # fmt: skip
    add("--real-model", default=d.real_model, help=f"model spec of --real (default: {d.real_model})")
    add("--real-prompts", type=int, default=d.real_prompts, help=f"questions of --real, 1-8 (default: {d.real_prompts})")
    add_no_progress(parser)
    add("--json", action="store_true", help="print demo.json's content instead of the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.demo import DemoConfig, format_summary, run_demo, summary_json

    config = DemoConfig(
        output=args.output, teacher=args.teacher, steps=args.steps, lr=args.lr, prefix_loss=args.prefix_loss,
        supervision=args.supervision, prefix_target=args.prefix_target, k_max=args.k_max, gated=args.gated, train_problems=args.train_problems, eval_problems=args.eval_problems,
        strategies=args.strategies.split(","), max_new_tokens=args.max_new_tokens, threads=args.threads, seed=args.seed, progress=not args.no_progress, dtype=args.dtype,
        real=args.real, real_model=args.real_model, real_prompts=args.real_prompts,
    )  # fmt: skip
    summary = run_demo(config, log=(lambda *_: None) if args.json else print)
    if args.json:
        print_json(summary_json(summary))
    else:
        print(format_summary(summary))
    return 0
