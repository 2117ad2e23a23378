"""`selfmtp plan`: per-device training memory under DDP and FSDP, without loading weights."""

from __future__ import annotations

from selfmtp.cli.common import print_output


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="per-device training memory under DDP and FSDP, which fits, and a suggested train command",
        description="Plan `selfmtp train` memory per device (weights, gradients, AdamW, teacher, FSDP buffers, "
        "activations) from a model's config or a parameter count, without loading weights.",
    )
    add = parser.add_argument
    add("--model", help="model spec (only its config is read)")
    add("--params", help="parameter count instead of a model, e.g. 8B: a Llama-like shape of that size")
    add("--gpus", type=int, default=1, help="devices (default: 1)")
    add("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory per device in GB (default: 80)")
    add(
        "--batch-size",
        type=int,
        default=128,
        help="global batch: sequences per optimizer step, all devices together (default: 128, the paper's)",
    )
    add("--seq-len", type=int, default=160, help="default: 160")
    add("--k-max", type=int, default=16, help="default: 16")
    add("--lora-rank", type=int, default=0, help="LoRA rank, 0: full fine-tuning (default: 0)")
    add("--gated", action="store_true", help="gated training: no separate teacher copy")
    add("--parallel", choices=["ddp", "fsdp"], help="plan only this (default: both)")
    add(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype (default: bfloat16)",
    )
    add("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.training.plan import format_report, plan_report

    report = plan_report(
        model=args.model,
        params=args.params,
        gpus=args.gpus,
        gpu_memory_gb=args.gpu_memory,
        batch_rows=args.batch_size,
        seq_len=args.seq_len,
        k_max=args.k_max,
        lora_rank=args.lora_rank,
        gated=args.gated,
        parallel=args.parallel,
        dtype=args.dtype,
    )
    print_output(report, as_json=args.json, text=format_report)
    return 0
