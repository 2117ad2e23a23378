"""`selfmtp prepare`: GSM8K data for the real-model recipe (train/dev split, optionally the model's own answers)."""

from __future__ import annotations

from selfmtp.cli.common import add_no_progress, print_output


def add_parser(subparsers) -> None:
    from selfmtp.training.prepare import DEFAULT_SOURCE

    parser = subparsers.add_parser(
        "prepare",
        help="GSM8K train/dev split for training, optionally with the model's own greedy answers (resumable)",
        description="Split GSM8K's train.jsonl into train.jsonl and dev.jsonl (the last --dev problems, never "
        "trained on) in --output; with --self-answers N, also the model's own greedy chat answers to the first N "
        "train questions (self-train.jsonl), appended batch by batch: rerunning the command continues where it stopped.",
    )
    add = parser.add_argument
    add("--source", default=DEFAULT_SOURCE, help=f"GSM8K train.jsonl (default: {DEFAULT_SOURCE})")
    add("--output", required=True, help="folder for train.jsonl, dev.jsonl (and self-train.jsonl)")
    add("--dev", type=int, default=300, help="dev problems: the last N lines (default: 300)")
    add("--self-answers", type=int, default=0, metavar="N", help="greedy answers to the first N train questions")
    add("--dev-self-answers", type=int, default=0, metavar="N",
        help="greedy answers to the first N dev questions (dev-self.jsonl: held-out text the model wrote)")
    add("--mix", action="store_true",
        help="also write mix-train.jsonl: the self-answers, then the train problems' reference solutions")
    add("--model", default="smollm2-135m", help="the model that writes the self-answers (default: smollm2-135m)")
    add("--max-new-tokens", type=int, default=160, help="default: 160")
    add("--batch-size", type=int, default=16, help="default: 16")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="default: float32")
    add("--device", default="cpu", help="torch device for the self-answers, e.g. cuda (default: cpu)")
    add("--json", action="store_true", help="print what was written as JSON")
    add_no_progress(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.training.prepare import PrepareConfig, prepare_gsm8k

    config = PrepareConfig(
        output=args.output, source=args.source, dev=args.dev, self_answers=args.self_answers,
        dev_self_answers=args.dev_self_answers, mix=args.mix, model=args.model, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, dtype=args.dtype, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    summary = prepare_gsm8k(config, log=(lambda _: None) if args.json else print)
    if args.json:
        print_output(summary, as_json=True, text=str)
    return 0
