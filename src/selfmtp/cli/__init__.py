"""The `selfmtp` command line: parses arguments and calls the library, nothing more.

One module per subcommand, each with `add_parser(subparsers)` (its flags) and `run(args)` (one call
into the library, then printing what it returned). `main` assembles them and owns the error handling:
a `SelfMTPError` (a user mistake) becomes one `selfmtp: error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from selfmtp.cli import bench, demo, evaluate, export, generate, plan, prepare, serve, train
from selfmtp.errors import SelfMTPError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
SUBCOMMANDS = (demo, prepare, train, export, generate, serve, evaluate, bench, plan)  # in `selfmtp --help`'s order


def build_parser() -> argparse.ArgumentParser:
    from selfmtp import __version__

    parser = argparse.ArgumentParser(
        prog="selfmtp",
        description="Multi-token prediction via online self-distillation, decoded with ConfAdapt.",
    )
    parser.add_argument("--version", action="version", version=f"selfmtp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    if getattr(args, "no_progress", False):
        _silence_library_progress()
    try:
        return args.run(args) or 0
    except SelfMTPError as exc:
        print(f"selfmtp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # `Interrupted` carries how to continue
        print(f"selfmtp: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _silence_library_progress() -> None:
    """--no-progress also means transformers' own loading and saving bars (logs stay as they are)."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
