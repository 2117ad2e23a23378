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
# train


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="turn a causal LM into a multi-token predictor by online self-distillation",
        description="Online self-distillation training (METHOD.md): blocked <mtp> layout, student rollout, "
        "teacher scoring of the rollout, cross-entropy to the teacher's choices. Works with torchrun (DDP).",
    )
    _add_common_model_args(parser)
    add = parser.add_argument
    add("--data", required=True, help="jsonl: question/answer, query/response, prompt/response or messages")
    add("--output", default="runs/train", help="output directory (default: runs/train)")
    add("--teacher-model", dest="teacher_model", default=None,
        help="teacher model spec (default: a frozen copy of --model; with LoRA the adapter-disabled student)")
    add("--teacher", default="hard", choices=["hard", "soft"], help="hard: teacher argmax targets; soft: KL to its distribution")
    add("--supervision", default="online", choices=["online", "ground-truth"])
    add("--block-attention", default="causal", choices=["causal", "bidirectional"])
    add("--k-sampling", default="random", choices=["random", "static"])
    add("--static-k", type=int, default=None, help="k for --k-sampling static")
    add("--k-max", type=int, default=16)
    add("--regions", type=int, default=None, help="MTP regions per sequence (default: seq_len // (2 k_max))")
    add("--prefix-loss", type=float, default=0.0, metavar="WEIGHT", help="extra next-token loss weight (default 0)")
    add("--template", default="chat", choices=["chat", "plain"])
    add("--seq-len", type=int, default=160)
    add("--lr", type=float, default=1e-5)
    add("--warmup", type=int, default=2000, help="linear warm-up steps, then constant")
    add("--weight-decay", type=float, default=0.01)
    add("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    add("--steps", type=int, default=100)
    add("--batch-size", type=int, default=8, help="sequences per process and micro-batch")
    add("--grad-accum", type=int, default=1)
    add("--eval-every", type=int, default=50, help="held-out loss/agreement every N steps (0: off)")
    add("--eval-size", type=int, default=64)
    add("--eval-data", default=None, help="held-out jsonl (default: carve --eval-size examples from --data)")
    add("--save-every", type=int, default=100, help="checkpoint every N steps (0: off)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    add("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    add("--lora-alpha", type=float, default=None)
    add("--lora-export", default="merged", choices=["merged", "adapter"])
    add("--attn", dest="attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    add("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines (counted) instead of failing")
    add("--keep-calculator", action="store_true", help="keep GSM8K <<a*b=c>> annotations")
    add("--max-examples", type=int, default=None)
    add("--no-progress", action="store_true")
    add("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from selfmtp.train import TrainConfig, train

    if args.dtype != "float32":
        raise SelfMTPError("train keeps float32 weights (bf16 autocast is used on CUDA): drop --dtype")
    config = TrainConfig(
        data=args.data, output=args.output, model=args.model, teacher=args.teacher_model, template=args.template,
        seq_len=args.seq_len, k_max=args.k_max, regions=args.regions, k_sampling=args.k_sampling,
        static_k=args.static_k, block_attention=args.block_attention, teacher_mode=args.teacher,
        supervision=args.supervision, prefix_loss=args.prefix_loss, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, clip=args.clip, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, eval_every=args.eval_every, eval_size=args.eval_size, eval_data=args.eval_data,
        save_every=args.save_every, resume=args.resume, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_export=args.lora_export, seed=args.seed, device=args.device,
        attn_implementation=args.attn_implementation, skip_bad_lines=args.skip_bad_lines,
        strip_calculator=not args.keep_calculator, max_examples=args.max_examples, progress=not args.no_progress,
    )
    summary = train(config)
    if summary["rank"] != 0:  # under torchrun only the first process reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        last = summary["last"] or {}
        print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.4f}")
        print(f"final checkpoint: {summary['final_dir']}")
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
    for add in (_add_demo, _add_train):
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
