"""`selfmtp export`: a checkpoint of a gated training run as a model directory (`RUN`), or any model as a
directory plain transformers loads (`--model SPEC`)."""

from __future__ import annotations

from selfmtp.errors import SelfMTPError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="a `train --gated` run's checkpoint as a gated model directory (RUN), or any model as a "
        "transformers checkpoint with custom_generate/ (--model)",
        description="RUN: write checkpoint --step (default: the newest) of a `selfmtp train --gated` run as the "
        "directory its final/ would be at that step, e.g. to evaluate a run that is still going or was stopped. "
        "--model SPEC: load any model spec (a checkpoint, a gated directory such as smollm2-135m-mtp, an adapter, "
        "a GGUF, tiny) and write --output as a directory AutoModelForCausalLM.from_pretrained loads, float32, with "
        "custom_generate/ for model.generate(custom_generate=OUTPUT, trust_remote_code=True, strategy=...); a gated "
        "model becomes its base weights plus the deltas, with model code that applies the gate in the forward "
        "(load it with trust_remote_code=True), anything else a plain checkpoint (docs/using-elsewhere.md).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("run_dir", metavar="RUN", nargs="?",
                        help="the training output directory (holds run_config.json and checkpoints/)")
    source.add_argument("--model", help="a model spec to write as a transformers checkpoint instead")
    parser.add_argument("--output", required=True, help="the directory to write (replaced atomically if it exists)")
    parser.add_argument("--step", type=int, help="RUN: the checkpoint's step (default: the newest)")
    parser.add_argument("--bf16", action="store_true", help="RUN: store the gated weights in bfloat16 (half the size)")
    parser.add_argument("--seed", type=int, default=0, help="--model: seed of `tiny` weights and new <mtp> rows")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.model is None:
        from selfmtp.training.export import export_gated_checkpoint

        checkpoint = export_gated_checkpoint(args.run_dir, args.output, step=args.step, bf16=args.bf16)
        print(f"{checkpoint} -> {args.output}")
        return 0
    if args.step is not None or args.bf16:
        raise SelfMTPError("--step and --bf16 are for exporting a training RUN, not --model")
    from selfmtp.hf.export import REMOTE_CODE_MODULE, export_model

    out = export_model(args.model, args.output, seed=args.seed)
    remote = ", trust_remote_code=True" if (out / f"{REMOTE_CODE_MODULE}.py").exists() else ""
    print(f"{args.model} -> {out} (load: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote}))")
    return 0
