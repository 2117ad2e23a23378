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


DECODE_DTYPE_HELP = (
    "decode dtype (default: auto = bfloat16 where a start-up probe of this machine's matmul kernels shows it "
    "pays, else float32; the choice is printed and recorded in results). int8: weight-only int8 linears with "
    "bf16 activations (CPU). In every dtype but float32, decoding runs batch-invariant kernels, so verify "
    "gives exactly the same model-and-dtype's greedy text"
)


def add_model_args(parser: argparse.ArgumentParser, *, decode: bool = True) -> None:
    """--model, --seed, --dtype, --device: what every subcommand that loads a model takes. `decode`: the
    subcommand decodes (generate, eval, bench, serve): --dtype offers auto and int8 and defaults to auto;
    training keeps float32 as its default."""
    from selfmtp.models.loading import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model spec: a HF checkpoint directory, a .gguf file, 'smollm2-135m', or 'tiny[:key=value,...]'"
        f" (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if decode:
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                            help=DECODE_DTYPE_HELP)
    else:
        parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="model dtype for training (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def add_prepack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prepack", action="store_const", const=True, default=None,
        help="CPU: pack float32 linear weights once for oneDNN too, so passes of 2+ tokens cost less "
             "(bfloat16 is always packed on a CPU: same numbers, cheaper; default: float32 unpacked)",
    )  # fmt: skip


def describe_decode(model) -> str:
    """One line for stderr: the dtype decoding runs in, why, and whether its kernels are batch-invariant."""
    decode = getattr(model, "selfmtp_decode", None) or {}
    text = f"dtype: {decode.get('dtype', 'float32')}"
    if decode.get("requested") == "auto":
        text += f" (auto: {decode['choice']['reason']})"
    if "exact_kernels" in decode:
        text += "; batch-invariant kernels (rowwise attention, linears probed)"
    return text


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def print_output(data, *, as_json: bool, text) -> None:
    """What a subcommand returns: `data` as JSON (--json, for programs) or `text(data)` (for people)."""
    print(json.dumps(data, indent=2) if as_json else text(data))
