"""Flags and help texts that several subcommands share."""

from __future__ import annotations

import argparse
import json

# Shared by `demo` and `train`, which take the same objective options.
SUPERVISION_HELP = (
    "mask targets: the teacher on the student's rollout (online), the teacher's argmax after the "
    "ground-truth prefix (offline: one teacher pass over the data before training), or the "
    "ground-truth tokens"
)
PREFIX_TARGET_HELP = (
    "what the --prefix-loss anchor aims at: the next ground-truth token (cross-entropy), or the "
    "teacher's next-token distribution (KL)"
)


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """--no-progress: for every subcommand that draws progress bars or loads a model (main() acts on it)."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: neither selfmtp's nor those of transformers and huggingface_hub while loading",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --seed, --dtype, --device: what every subcommand that loads a model takes."""
    from selfmtp.models.loading import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model spec: a HF checkpoint directory, a .gguf file, 'smollm2-135m', or 'tiny[:key=value,...]'"
        f" (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def add_prepack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prepack", action="store_true",
        help="CPU float32: pack linear weights once for oneDNN, so passes of 2+ tokens cost less (default: off)",
    )  # fmt: skip


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def print_output(data, *, as_json: bool, text) -> None:
    """What a subcommand returns: `data` as JSON (--json, for programs) or `text(data)` (for people)."""
    print(json.dumps(data, indent=2) if as_json else text(data))
