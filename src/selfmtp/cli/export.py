"""`selfmtp export`: a checkpoint of a gated training run as a model directory."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint of a `train --gated` run as a gated model directory (a --model spec)",
        description="Write checkpoint --step (default: the newest) of a `selfmtp train --gated` run as the "
        "directory its final/ would be at that step, e.g. to evaluate a run that is still going or was stopped.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="the training output directory (holds run_config.json and checkpoints/)")
    parser.add_argument("--output", required=True, help="the model directory to write")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--bf16", action="store_true", help="store the gated weights in bfloat16 (half the size)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.training.export import export_gated_checkpoint

    checkpoint = export_gated_checkpoint(args.run_dir, args.output, step=args.step, bf16=args.bf16)
    print(f"{checkpoint} -> {args.output}")
    return 0
