"""`selfmtp export`: any model spec as a directory plain transformers loads, with `custom_generate/`."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from selfmtp.cli.common import add_no_progress

    parser = subparsers.add_parser(
        "export",
        help="write a model as a transformers checkpoint with custom_generate/ (gated: trust_remote_code model code)",
        description="Load --model (any spec: a checkpoint, a gated directory such as smollm2-135m-mtp, an adapter, a "
        "GGUF, tiny) and write --output as a directory AutoModelForCausalLM.from_pretrained loads, float32, with "
        "custom_generate/ for model.generate(custom_generate=OUTPUT, trust_remote_code=True, strategy=...). A gated "
        "model becomes its base weights plus the deltas, with model code that applies the gate in the forward "
        "(load it with trust_remote_code=True); anything else a plain checkpoint. See docs/using-elsewhere.md.",
    )
    parser.add_argument("--model", required=True, help="model spec, as for every subcommand")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of `tiny` weights and new <mtp> rows (default: 0)")
    add_no_progress(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.hf.export import export_model

    out = export_model(args.model, args.output, seed=args.seed)
    print(f"{args.model} -> {out} (load: AutoModelForCausalLM.from_pretrained({str(out)!r}"
          f"{', trust_remote_code=True' if (out / 'modeling_selfmtp_gated.py').exists() else ''}))")
    return 0
