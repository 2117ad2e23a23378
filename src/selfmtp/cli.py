"""The `selfmtp` command line: parses arguments and calls the library, nothing more.

Each subcommand has an `_add_<name>` (its flags) and a `_run_<name>` (one call into the library).
A `SelfMTPError` (a user mistake) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from selfmtp.errors import SelfMTPError

EXIT_USER_ERROR = 2


def _add_common_model_args(parser: argparse.ArgumentParser) -> None:
    from selfmtp.models import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model spec: a HF checkpoint directory, a .gguf file, 'smollm2-135m', or 'tiny[:key=value,...]'"
        f" (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


# ---------------------------------------------------------------------------------------------
# demo


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="load the default model, add <mtp>, answer one GSM8K-style question",
        description="Load a model (default: SmolLM2-135M-Instruct), perform the <mtp> surgery and answer one "
        "GSM8K-style question greedily, printing the answer and tokens/s.",
    )
    _add_common_model_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from selfmtp.demo import run_demo

    result = run_demo(args.model, seed=args.seed, dtype=args.dtype, device=args.device, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: {result['model']}  (<mtp> id {result['mtp_mask_token_id']})")
        print(f"Q: {result['question']}")
        print(f"A: {result['answer']}")
        print(f"{result['new_tokens']} tokens in {result['seconds']:.2f} s = {result['tokens_per_second']:.1f} tokens/s")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfmtp",
        description="Multi-token prediction via online self-distillation, decoded with ConfAdapt.",
    )
    from selfmtp import __version__

    parser.add_argument("--version", action="version", version=f"selfmtp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo,):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.run(args) or 0
    except SelfMTPError as exc:
        print(f"selfmtp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("selfmtp: interrupted", file=sys.stderr)
        return 130
