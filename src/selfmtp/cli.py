"""The `selfmtp` command line: parses arguments and calls the library, nothing more.

Each subcommand has an `_add_<name>` (its flags) and a `_run_<name>` (one call into the library).
A `SelfMTPError` (a user mistake) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfmtp.errors import SelfMTPError

EXIT_USER_ERROR = 2


# Shared by `demo` and `train`, which take the same objective options.
SUPERVISION_HELP = ("mask targets: the teacher on the student's rollout (online), the teacher's argmax after the "
                    "ground-truth prefix (offline: one teacher pass over the data before training), or the "
                    "ground-truth tokens")
PREFIX_TARGET_HELP = ("what the --prefix-loss anchor aims at: the next ground-truth token (cross-entropy), or the "
                      "teacher's next-token distribution (KL)")


def _add_common_model_args(parser: argparse.ArgumentParser) -> None:
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


# ---------------------------------------------------------------------------------------------
# demo


def _add_demo(subparsers) -> None:
    from selfmtp.demo import DemoConfig
    from selfmtp.training.objective import PREFIX_TARGETS, SUPERVISION

    d = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="the whole method on CPU in minutes: tiny teacher -> MTP self-distillation -> eval sweep",
        description="End to end on tiny-gsm: load the committed tiny teacher, self-distil it into a multi-token "
        "predictor, sweep static k and ConfAdapt against the teacher's own greedy accuracy, then print the table "
        "and write results.json, results.md, pareto.png, chunks.html and demo.json into --output. Resumable.",
    )
    add = parser.add_argument
    add("--output", default=d.output, help=f"output folder (default: {d.output})")
    add("--teacher", default=d.teacher, help=f"teacher model spec (default: {d.teacher})")
    add("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    add("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr:g})")
    add("--prefix-loss", type=float, default=d.prefix_loss, help=f"next-token loss weight (default: {d.prefix_loss:g})")
    add("--supervision", choices=SUPERVISION, default=d.supervision, help=f"{SUPERVISION_HELP} (default: {d.supervision})")
    add("--prefix-target", choices=PREFIX_TARGETS, default=d.prefix_target,
        help=f"{PREFIX_TARGET_HELP} (default: {d.prefix_target})")
    add("--k-max", type=int, default=d.k_max, help=f"largest k in training and ConfAdapt (default: {d.k_max})")
    add("--gated", action=argparse.BooleanOptionalAction, default=d.gated,
        help="train gated deltas that act only at <mtp> (k=1 stays the teacher exactly; --prefix-loss unused) "
        "into OUTPUT/train-gated, or the plain recipe (default: %(default)s)")
    add("--train-problems", type=int, default=d.train_problems, help=f"(default: {d.train_problems})")
    add("--eval-problems", type=int, default=d.eval_problems, help=f"tiny-gsm test problems (default: {d.eval_problems})")
    add("--strategies", default=",".join(d.strategies), help="comma-separated sweep (default: %(default)s)")
    add("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"per answer (default: {d.max_new_tokens})")
    add("--threads", type=int, default=d.threads, help=f"torch threads (default: {d.threads})")
    add("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    add("--no-progress", action="store_true")
    add("--json", action="store_true", help="print demo.json's content instead of the table")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from selfmtp.demo import DemoConfig, format_targets, run_demo
    from selfmtp.evaluation.report import format_table

    config = DemoConfig(
        output=args.output, teacher=args.teacher, steps=args.steps, lr=args.lr, prefix_loss=args.prefix_loss,
        supervision=args.supervision, prefix_target=args.prefix_target, k_max=args.k_max, gated=args.gated, train_problems=args.train_problems, eval_problems=args.eval_problems,
        strategies=args.strategies.split(","), max_new_tokens=args.max_new_tokens, threads=args.threads, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    log = (lambda *_: None) if args.json else print
    summary = run_demo(config, log=log)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "results"} | {"rows": summary["results"]["rows"]}, indent=2))
        return 0
    print(format_table(summary["results"]))
    print("targets:")
    print(format_targets(summary["targets"]))
    total = sum(summary["seconds"].values())
    print(f"done in {total / 60:.1f} min; wrote " + ", ".join(summary["files"].values()))
    return 0


# ---------------------------------------------------------------------------------------------
# generate


def _add_generate(subparsers) -> None:
    from selfmtp.decoding.strategies import STRATEGY_HELP

    parser = subparsers.add_parser(
        "generate",
        help="decode prompts with ntp, static-k or ConfAdapt multi-token decoding",
        description="Generate from one prompt or a file of prompts with KV-cached multi-token decoding and report "
        "tokens, forward passes, acceleration (tokens per pass) and tokens/s.",
    )
    _add_common_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument(
        "--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' or 'question' field"
    )
    parser.add_argument("--strategy", default="ntp", help=f"{STRATEGY_HELP} (default: ntp)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap prompts in the chat template (default: iff the tokenizer has one)",
    )  # fmt: skip
    parser.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        default=[],
        metavar="STR",
        help="stop strings (text is cut before them)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument(
        "--show-chunks", action="store_true", help="colour each forward pass's tokens as one block"
    )
    parser.add_argument("--html", metavar="FILE", help="also write the chunk view as a standalone HTML page")
    parser.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from selfmtp.api import MTPModel, read_prompts
    from selfmtp.decoding.loop import summarize
    from selfmtp.decoding.strategies import parse_strategy

    strategy = parse_strategy(args.strategy)  # bad input fails before the model loads
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    if args.max_new_tokens < 1:
        raise SelfMTPError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise SelfMTPError(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(not p.strip() for p in prompts):
        raise SelfMTPError("empty prompt: give some text to continue")
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, dtype=args.dtype, device=args.device)
    results = mtp.generate(
        prompts, strategy=strategy, max_new_tokens=args.max_new_tokens, stop=args.stop or None,
        chat=args.chat, batch_size=args.batch_size,
    )  # fmt: skip
    _print_generations(prompts, results, args, mtp.tokenizer)
    if args.html:
        from selfmtp.decoding.chunk_view import render_html

        Path(args.html).write_text(
            render_html(results, prompts, title=f"{args.model} / {strategy.name}", tokenizer=mtp.tokenizer),
            encoding="utf-8",
        )
    if not args.json and len(results) > 1:
        summary = summarize(results)
        print(
            f"{summary['generations']} generations: {summary['tokens_per_pass_pooled']:.2f} tokens/pass pooled, "
            f"{summary['acceleration_mean']:.2f} +- {summary['acceleration_std']:.2f} per-generation mean, "
            f"{summary['tokens_per_second_mean']:.1f} tokens/s on average"
        )
    return 0


def _print_generations(prompts, results, args, tokenizer) -> None:
    from selfmtp.decoding.chunk_view import render_terminal

    for prompt, result in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, **result.to_dict()}, ensure_ascii=False))
        elif args.show_chunks:
            print(render_terminal(result, colour=sys.stdout.isatty(), tokenizer=tokenizer))
        else:
            print(result.text)
            print(
                f"[{result.num_tokens} tokens, {result.forward_passes} passes, {result.acceleration:.2f} tokens/pass, "
                f"{result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}]"
            )


# ---------------------------------------------------------------------------------------------
# serve


def _add_serve(subparsers) -> None:
    from selfmtp.decoding.strategies import STRATEGY_HELP
    from selfmtp.serving import AUTO_HELP, ServeConfig

    c = ServeConfig()
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (streaming, continuous batching, load-aware mask count)",
        description="Serve --model at /v1/chat/completions, /v1/completions and /v1/models (greedy only). A stream "
        "sends one chunk per forward pass; concurrent requests share one continuously batched decode loop.",
    )
    _add_common_model_args(parser)
    add = parser.add_argument
    add("--strategy", default=c.strategy, help=f"default per-request strategy: {STRATEGY_HELP}, or {AUTO_HELP} (default: {c.strategy})")
    add("--host", default=c.host, help=f"address to bind (default: {c.host}, this machine only)")
    add("--port", type=int, default=c.port, help=f"(default: {c.port})")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)")
    add("--served-name", default=None, help="model id in the API (default: the --model spec)")
    add("--max-batch", type=int, default=c.max_batch, help=f"most requests decoded at once (default: {c.max_batch})")
    add("--max-queue", type=int, default=c.max_queue, help=f"most requests waiting; more get 429 (default: {c.max_queue})")
    add("--max-tokens-limit", type=int, default=c.max_tokens_limit,
        help=f"largest max_tokens a request may ask for, and the default (default: {c.max_tokens_limit})")
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from selfmtp.api import MTPModel
    from selfmtp.serving import ServeConfig, serve

    config = ServeConfig(
        model_name=args.served_name or args.model, strategy=args.strategy, host=args.host, port=args.port,
        api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
    )  # fmt: skip
    config.check()  # bad flags fail before the model loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    serve(MTPModel.from_pretrained(args.model, seed=args.seed, dtype=args.dtype, device=args.device), config)
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def _add_eval(subparsers) -> None:
    from selfmtp.evaluation.sweep import DEFAULT_STRATEGIES
    from selfmtp.evaluation.tasks import TASK_HELP

    parser = subparsers.add_parser(
        "eval",
        help="accuracy vs acceleration sweep over decoding strategies (GSM8K, BBH, tiny-gsm)",
        description="Decode a task's items with each strategy, grade the answers and write results.json, "
        "results.md and pareto.png into --output. Finished strategies are kept; a rerun continues.",
    )
    _add_common_model_args(parser)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument(
        "--data", help="gsm8k: a jsonl of {question, answer}; bbh: the BBH folder; tiny-gsm: optional jsonl "
        "(default: generated test problems)",
    )  # fmt: skip
    parser.add_argument("--fewshot-data", help="gsm8k: jsonl the exemplars come from (default: --data)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items")
    parser.add_argument("--shots", type=int, default=8, help="gsm8k few-shot exemplars (default: 8)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=False,
        help="put the prompt in the model's chat template (instruct models; default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES,
        help=f"comma-separated strategies, 'teacher' allowed with --teacher (default: {DEFAULT_STRATEGIES})",
    )  # fmt: skip
    parser.add_argument("--teacher", metavar="SPEC", help="also report greedy NTP of this model as 'teacher'")
    parser.add_argument("--coherence", action="store_true",
                        help="also report the teacher's NLL per generated token for every strategy (needs --teacher)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    parser.add_argument("--output", required=True, help="folder for results.json, results.md, pareto.png")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from selfmtp.evaluation.report import format_table
    from selfmtp.evaluation.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        model=args.model, task=args.task, strategies=args.strategies.split(","), teacher=args.teacher,
        data=args.data, fewshot_data=args.fewshot_data, limit=args.limit, shots=args.shots, chat=args.chat,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
        device=args.device, coherence=args.coherence,
    )  # fmt: skip
    results = run_sweep(config, args.output)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
        print(f"wrote {Path(args.output) / 'results.json'}, results.md and pareto.png")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="turn a causal LM into a multi-token predictor by online self-distillation",
        description="Online self-distillation training (METHOD.md): blocked <mtp> layout, student rollout, "
        "teacher scoring of the rollout, cross-entropy to the teacher's choices. Works with torchrun (DDP). "
        "--config FILE gives TrainConfig fields as a JSON object; flags on the command line override it.",
    )
    from selfmtp.training.layout import BLOCK_ATTENTION, K_SAMPLING
    from selfmtp.training.objective import PREFIX_TARGETS, SUPERVISION, TEACHER_MODES

    _add_common_model_args(parser)
    add = parser.add_argument
    add("--config", metavar="FILE", help="JSON object of TrainConfig fields, e.g. recipes/*.json")
    add("--data", help="jsonl: question/answer, query/response, prompt/response or messages (required here or in --config)")
    add("--output", help="output directory (default: runs/train)")
    add("--teacher-model", dest="teacher_model",
        help="teacher model spec (default: a frozen copy of --model; with LoRA the adapter-disabled student)")
    add("--teacher", choices=TEACHER_MODES, help="hard (default): teacher argmax targets; soft: KL to its distribution")
    add("--supervision", choices=SUPERVISION, help=f"{SUPERVISION_HELP} (default: online)")
    add("--block-attention", choices=BLOCK_ATTENTION, help="default: causal")
    add("--k-sampling", choices=K_SAMPLING, help="default: random")
    add("--static-k", type=int, help="k for --k-sampling static")
    add("--k-max", type=int, help="default: 16")
    add("--regions", type=int, help="MTP regions per sequence (default: seq_len // (2 k_max))")
    add("--masks-per-row", type=int, help="instead of --regions: regions enough for about this many <mtp> masks per "
        "row (a dense layout; with --gated only masks cost a backward pass)")
    add("--prefix-loss", type=float, metavar="WEIGHT", help="extra next-token loss weight (default 0)")
    add("--prefix-target", choices=PREFIX_TARGETS, help=f"{PREFIX_TARGET_HELP} (default: ground-truth)")
    add("--template", choices=["chat", "plain"], help="default: chat")
    add("--seq-len", type=int, help="default: 160")
    add("--lr", type=float, help="default: 1e-5")
    add("--warmup", type=int, help="linear warm-up steps (default: 2000)")
    add("--lr-schedule", choices=["constant", "cosine"],
        help="after warm-up: constant (the paper's, default) or cosine decay to 0 at --steps")
    add("--weight-decay", type=float, help="default: 0.01")
    add("--clip", type=float, help="gradient norm clipping, 0: off (default: 1.0)")
    add("--steps", type=int, help="default: 100")
    add("--batch-size", type=int, help="sequences per process and micro-batch (default: 8)")
    add("--grad-accum", type=int, help="default: 1")
    add("--eval-every", type=int, help="held-out loss/agreement every N steps, 0: off (default: 50)")
    add("--eval-size", type=int, help="default: 64")
    add("--eval-data", help="held-out jsonl (default: carve --eval-size examples from --data)")
    add("--eval-decode-prompts", type=int, metavar="N",
        help="at every evaluation also decode N held-out prompts with ConfAdapt (default: 0, off)")
    add("--eval-decode-tokens", type=int, help="new tokens per decode-eval prompt (default: 64)")
    add("--eval-decode-tau", type=float, help="ConfAdapt threshold of the decode eval (default: 0.9)")
    add("--save-every", type=int, help="checkpoint every N steps, 0: off (default: 100)")
    add("--keep-checkpoints", type=int, help="newest checkpoints kept (default: 2)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints; the settings "
        "that shape training must be the ones the run started with (OUTPUT/run_config.json)")
    add("--lora-rank", type=int, help="LoRA rank, 0: full fine-tuning (default: 0)")
    add("--lora-alpha", type=float, help="default: 2 x rank")
    add("--lora-export", choices=["merged", "adapter"], help="default: merged")
    add("--gated", action="store_true", help="train deltas that act only at <mtp> positions (LoRA with --lora-rank, "
        "else full): real tokens stay the original model exactly; final/ holds the deltas and names the base")
    add("--attn", dest="attn_implementation", choices=["sdpa", "eager"], help="default: sdpa")
    add("--parallel", choices=["ddp", "fsdp"], help="under torchrun: whole copies per process (ddp, default) or "
        "FSDP2 sharding of weights, gradients and AdamW states (fsdp); see `selfmtp plan`")
    add("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward "
        "(less activation memory, about a third more compute)")
    add("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines (counted) instead of failing")
    add("--keep-calculator", action="store_true", help="keep GSM8K <<a*b=c>> annotations")
    add("--max-examples", type=int)
    add("--no-progress", action="store_true")
    add("--json", action="store_true", help="print the summary as JSON")
    for action in parser._actions:  # absent unless given: TrainConfig and --config supply the defaults
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    parser.set_defaults(run=_run_train)


# Flags whose TrainConfig field has another name; the last two also have the opposite sense.
_TRAIN_FIELDS = {"teacher_model": "teacher", "teacher": "teacher_mode", "keep_calculator": "strip_calculator",
                 "no_progress": "progress"}
_TRAIN_NEGATED = ("keep_calculator", "no_progress")
_TRAIN_CLI_ONLY = ("run", "command", "config", "json")


def _train_config(args):
    """TrainConfig: its defaults (but --model's is the CLI's), then --config FILE, then the flags given."""
    from selfmtp.models.loading import DEFAULT_MODEL
    from selfmtp.training.trainer import TrainConfig, load_config_file

    values = {"model": DEFAULT_MODEL, **(load_config_file(args.config) if "config" in args else {})}
    for dest, value in vars(args).items():
        if dest not in _TRAIN_CLI_ONLY:
            values[_TRAIN_FIELDS.get(dest, dest)] = (not value) if dest in _TRAIN_NEGATED else value
    if not values.get("data"):
        raise SelfMTPError("--data is required (on the command line or in the --config file)")
    return TrainConfig(**values)


def _run_train(args) -> int:
    from selfmtp.training.trainer import train

    config = _train_config(args)
    summary = train(config)
    if summary["rank"] != 0:  # under torchrun only the first process reports
        return 0
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        last = summary["last"] or {}
        print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.4f}")
        print(f"final checkpoint: {summary['final_dir']}")
    return 0


# ---------------------------------------------------------------------------------------------
# plan


def _add_plan(subparsers) -> None:
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
    add("--batch-size", type=int, default=128, help="global batch: sequences per optimizer step, all devices "
        "together (default: 128, the paper's)")
    add("--seq-len", type=int, default=160, help="default: 160")
    add("--k-max", type=int, default=16, help="default: 16")
    add("--lora-rank", type=int, default=0, help="LoRA rank, 0: full fine-tuning (default: 0)")
    add("--gated", action="store_true", help="gated training: no separate teacher copy")
    add("--parallel", choices=["ddp", "fsdp"], help="plan only this (default: both)")
    add("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype (default: bfloat16)")
    add("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    from selfmtp.training.plan import format_report, plan_report

    report = plan_report(model=args.model, params=args.params, gpus=args.gpus, gpu_memory_gb=args.gpu_memory,
                         batch_rows=args.batch_size, seq_len=args.seq_len, k_max=args.k_max, lora_rank=args.lora_rank,
                         gated=args.gated, parallel=args.parallel, dtype=args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _add_bench(subparsers) -> None:
    from selfmtp.decoding.strategies import STRATEGY_HELP
    from selfmtp.evaluation.bench import BASELINES

    parser = subparsers.add_parser(
        "bench",
        help="wall-clock decode speed of strategies beside transformers generate and llama.cpp",
        description="Time our NTP loop, each strategy, transformers `generate` and llama.cpp on the same prompts, "
        "interleaved in one run, and write bench.json and bench.md into --output: decode tokens/s, ms/token, "
        "time to first token, tokens per pass, and speedups as medians of paired per-prompt ratios.",
    )
    _add_common_model_args(parser)
    parser.add_argument("--prompts", required=True, help="one prompt per line, or .jsonl with 'prompt' or 'question'")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument(
        "--strategies", default="ntp,confadapt:0.9:4,confadapt:0.9:8",
        help=f"comma-separated, each {STRATEGY_HELP}; ntp is always measured (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", default="hf-generate", help=f"comma-separated, from {', '.join(BASELINES)} or '' (default: %(default)s)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs over all prompts (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the model's own where known)")
    parser.add_argument("--threads", type=int, help="torch and llama.cpp threads (default: torch's setting)")
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap prompts in the chat template (default: iff the tokenizer has one)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for bench.json and bench.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print bench.json instead of the table")
    parser.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from selfmtp.evaluation.bench import BenchConfig, run_bench
    from selfmtp.evaluation.bench_report import format_markdown

    config = BenchConfig(
        model=args.model, prompts=args.prompts, strategies=[s for s in args.strategies.split(",") if s.strip()],
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()], runs=args.runs,
        max_new_tokens=args.max_new_tokens, limit=args.limit, gguf=args.gguf, chat=args.chat, threads=args.threads,
        seed=args.seed, dtype=args.dtype, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    result = run_bench(config, args.output)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result))
        print(f"wrote {Path(args.output) / 'bench.json'} and bench.md")
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
    for add in (_add_demo, _add_train, _add_generate, _add_serve, _add_eval, _add_bench, _add_plan):
        add(subparsers)
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
        return 130


def _silence_library_progress() -> None:
    """--no-progress also means transformers' own loading and saving bars (logs stay as they are)."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
