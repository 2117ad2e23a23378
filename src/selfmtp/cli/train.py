"""`selfmtp train`: online self-distillation into a multi-token predictor (works under torchrun)."""

from __future__ import annotations

import argparse

from selfmtp.cli.common import (
    PREFIX_TARGET_HELP,
    SUPERVISION_HELP,
    add_model_args,
    add_no_progress,
    print_output,
)

# Parsed flags that are not TrainConfig fields.
CLI_ONLY = ("run", "command", "config", "json", "plot_only")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="turn a causal LM into a multi-token predictor by online self-distillation",
        description="Online self-distillation training (METHOD.md): blocked <mtp> layout, student rollout, "
        "teacher scoring of the rollout, cross-entropy to the teacher's choices. Works with torchrun (DDP). "
        "--config FILE gives TrainConfig fields as a JSON object; flags on the command line override it.",
    )
    add_model_args(parser, decode=False)
    add = parser.add_argument
    add("--config", metavar="FILE", help="JSON object of TrainConfig fields, e.g. recipes/*.json")
    add(
        "--data",
        help="jsonl: question/answer, query/response, prompt/response or messages (required here or in --config)",
    )
    add("--output", help="output directory (default: runs/train)")
    for add_flags in (
        _add_objective_flags,
        _add_schedule_flags,
        _add_eval_and_checkpoint_flags,
        _add_setup_flags,
    ):
        add_flags(add)
    add_no_progress(parser)
    add("--json", action="store_true", help="print the summary as JSON")
    for action in parser._actions:  # absent unless given: TrainConfig and --config supply the defaults
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    parser.set_defaults(run=run)


def _add_objective_flags(add) -> None:
    """What is learned: teacher, targets, layout of the <mtp> blocks, sequence shape."""
    from selfmtp.training.layout import BLOCK_ATTENTION, K_SAMPLING
    from selfmtp.training.objective import PREFIX_TARGETS, SUPERVISION, TEACHER_MODES

    add(
        "--teacher-model",
        dest="teacher",
        metavar="TEACHER_MODEL",
        help="teacher model spec (default: a frozen copy of --model; with LoRA the adapter-disabled student)",
    )
    add(
        "--teacher",
        dest="teacher_mode",
        choices=TEACHER_MODES,
        help="hard (default): teacher argmax targets; soft: KL to its distribution (online; offline under --gated)",
    )
    add("--supervision", choices=SUPERVISION, help=f"{SUPERVISION_HELP} (default: online)")
    add("--block-attention", choices=BLOCK_ATTENTION, help="default: causal")
    add("--k-sampling", choices=K_SAMPLING, help="default: random")
    add("--static-k", type=int, help="k for --k-sampling static")
    add("--k-max", type=int, help="default: 16")
    add("--regions", type=int, help="MTP regions per sequence (default: seq_len // (2 k_max))")
    add(
        "--masks-per-row",
        type=int,
        help="instead of --regions: regions enough for about this many <mtp> masks per "
        "row (a dense layout; with --gated only masks cost a backward pass)",
    )
    add("--prefix-loss", type=float, metavar="WEIGHT", help="extra next-token loss weight (default 0)")
    add("--prefix-target", choices=PREFIX_TARGETS, help=f"{PREFIX_TARGET_HELP} (default: ground-truth)")
    add("--template", choices=["chat", "plain"], help="default: chat")
    add("--seq-len", type=int, help="default: 160")


def _add_schedule_flags(add) -> None:
    """The optimizer and its schedule, the batch."""
    add("--lr", type=float, help="default: 1e-5")
    add("--warmup", type=int, help="linear warm-up steps (default: 2000)")
    add(
        "--lr-schedule",
        choices=["constant", "cosine"],
        help="after warm-up: constant (the paper's, default) or cosine decay to 0 at --steps",
    )
    add("--weight-decay", type=float, help="default: 0.01")
    add("--clip", type=float, help="gradient norm clipping, 0: off (default: 1.0)")
    add("--steps", type=int, help="default: 100")
    add(
        "--cpu-budget",
        type=float,
        metavar="SECONDS",
        help="stop at the step boundary before this process's CPU seconds (set-up included, summed "
        "over resumes) would pass SECONDS; --steps is then a cap and a cosine decays over the budget",
    )
    add("--batch-size", type=int, help="sequences per process and micro-batch (default: 8)")
    add("--grad-accum", type=int, help="default: 1")


def _add_eval_and_checkpoint_flags(add) -> None:
    """Held-out evaluation, checkpoints, resuming."""
    add("--eval-every", type=int, help="held-out loss/agreement every N steps, 0: off (default: 50)")
    add("--eval-size", type=int, help="default: 64")
    add("--eval-data", help="held-out jsonl (default: carve --eval-size examples from --data)")
    add(
        "--eval-decode-prompts",
        type=int,
        metavar="N",
        help="at every evaluation also decode N held-out prompts with ConfAdapt (default: 0, off)",
    )
    add("--eval-decode-tokens", type=int, help="new tokens per decode-eval prompt (default: 64)")
    add("--eval-decode-tau", type=float, help="ConfAdapt threshold of the decode eval (default: 0.9)")
    add("--save-every", type=int, help="checkpoint every N steps, 0: off (default: 100)")
    add("--keep-checkpoints", type=int, help="newest checkpoints kept (default: 2)")
    add(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUTPUT/checkpoints; the settings "
        "that shape training must be the ones the run started with (OUTPUT/run_config.json)",
    )


def _add_setup_flags(add) -> None:
    """LoRA and gating, attention and parallelism, data reading, output."""
    add("--lora-rank", type=int, help="LoRA rank, 0: full fine-tuning (default: 0)")
    add("--lora-alpha", type=float, help="default: 2 x rank")
    add("--lora-export", choices=["merged", "adapter"], help="default: merged")
    add(
        "--gated",
        action="store_true",
        help="train deltas that act only at <mtp> positions (LoRA with --lora-rank, "
        "else full): real tokens stay the original model exactly; final/ holds the deltas and names the base",
    )
    add(
        "--gated-head",
        action="store_true",
        help="with --gated: also gate the final norm and the output head (a delta beside the head's weight, "
        "so a head tied to the embeddings stays tied; real positions' logits stay the original's)",
    )
    add("--attn", dest="attn_implementation", choices=["sdpa", "eager"], help="default: sdpa")
    add(
        "--parallel",
        choices=["ddp", "fsdp"],
        help="under torchrun: whole copies per process (ddp, default) or "
        "FSDP2 sharding of weights, gradients and AdamW states (fsdp); see `selfmtp plan`",
    )
    add(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward (less activation memory, about a third more compute)",
    )
    add(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed jsonl lines (counted) instead of failing",
    )
    add(
        "--keep-calculator",
        dest="strip_calculator",
        action="store_false",
        help="keep GSM8K <<a*b=c>> annotations",
    )
    add("--max-examples", type=int)
    add(
        "--plot-only",
        action="store_true",
        help="train nothing: draw OUTPUT/training_curve.png from OUTPUT/metrics.jsonl (online loss, held-out "
        "agreement by j, ConfAdapt tokens per pass, against the step; OUTPUT: --output or the --config's)",
    )


def train_config(args):
    """TrainConfig: its defaults (but --model's is the CLI's), then --config FILE, then the flags given."""
    from selfmtp.models.loading import DEFAULT_MODEL
    from selfmtp.training.config import config_from_sources

    flags = {dest: value for dest, value in vars(args).items() if dest not in CLI_ONLY}
    if "no_progress" in flags:
        flags["progress"] = not flags.pop("no_progress")
    return config_from_sources(flags, getattr(args, "config", None), defaults={"model": DEFAULT_MODEL})


def run(args) -> int:
    from selfmtp.training.trainer import describe_summary, train

    if getattr(args, "plot_only", False):  # flags not given are absent (argparse.SUPPRESS)
        return plot_only(args)
    summary = train(train_config(args))
    if summary["rank"] != 0:  # under torchrun only the first process reports
        return 0
    print_output(summary, as_json=getattr(args, "json", False), text=describe_summary)
    return 0


def plot_only(args) -> int:
    """--plot-only: the curve of the run in --output, else in the --config recipe's output, else the default's."""
    from selfmtp.training.config import TrainConfig, load_config_file
    from selfmtp.training.curve import plot_training_curve

    recipe = load_config_file(args.config) if getattr(args, "config", None) else {}
    output = getattr(args, "output", None) or recipe.get("output") or TrainConfig.__dataclass_fields__["output"].default
    print(f"wrote {plot_training_curve(output)}")
    return 0
