"""`selfmtp generate`: decode prompts and report tokens, passes, acceleration and speed."""

from __future__ import annotations

import argparse
import json
import sys

from selfmtp.cli.common import add_model_args, add_no_progress, add_prepack, describe_decode


def add_parser(subparsers) -> None:
    from selfmtp.decoding.strategies import AUTO_HELP, STRATEGY_HELP

    parser = subparsers.add_parser(
        "generate",
        help="decode prompts with ntp, static-k or ConfAdapt multi-token decoding",
        description="Generate from one prompt or a file of prompts with KV-cached multi-token decoding and report "
        "tokens, forward passes, acceleration (tokens per pass) and tokens/s.",
    )
    add_model_args(parser)
    add_prepack(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument(
        "--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' or 'question' field"
    )
    parser.add_argument("--strategy", default="ntp", help=f"{STRATEGY_HELP}, or the load-aware {AUTO_HELP} (default: ntp)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap prompts in the chat template (default: iff the tokenizer has one)",
    )  # fmt: skip
    parser.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        default=[],
        metavar="STR",
        help="stop strings (text is cut before them)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    add_no_progress(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument(
        "--show-chunks", action="store_true", help="colour each forward pass's tokens as one block"
    )
    parser.add_argument("--html", metavar="FILE", help="also write the chunk view as a standalone HTML page")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.api import (
        MTPModel,
        check_generate_args,
        format_result,
        format_results_summary,
        read_prompts,
        write_chunk_view,
    )
    from selfmtp.decoding.strategies import resolve_strategy

    strategy, _ = resolve_strategy(args.strategy)  # bad input fails before the model loads
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    check_generate_args(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, dtype=args.dtype, device=args.device, prepack=args.prepack)
    results = mtp.generate(
        prompts, strategy=args.strategy, max_new_tokens=args.max_new_tokens, stop=args.stop or None,
        chat=args.chat, batch_size=args.batch_size,
    )  # fmt: skip
    for prompt, result in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, **result.to_dict(), "dtype": mtp.dtype_name}, ensure_ascii=False))
        else:
            print(format_result(result, mtp.tokenizer, chunks=args.show_chunks, colour=sys.stdout.isatty()))
    if args.html:
        title = f"{args.model} / {strategy.name}"
        write_chunk_view(args.html, results, prompts, title=title, tokenizer=mtp.tokenizer)
    if not args.json and len(results) > 1:
        print(format_results_summary(results))
    print(describe_decode(mtp.model), file=sys.stderr)  # after the work: a user error stays one stderr line
    return 0
