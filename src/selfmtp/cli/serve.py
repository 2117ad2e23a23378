"""`selfmtp serve`: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import sys

from selfmtp.cli.common import add_model_args, add_no_progress, add_prepack, describe_decode


def add_parser(subparsers) -> None:
    from selfmtp.decoding.strategies import STRATEGY_HELP
    from selfmtp.serving import AUTO_HELP, ServeConfig

    c = ServeConfig()
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (streaming, continuous batching, load-aware mask count)",
        description="Serve --model at /v1/chat/completions, /v1/completions and /v1/models (greedy only). A stream "
        "sends one chunk per forward pass; concurrent requests share one continuously batched decode loop.",
    )
    add_model_args(parser)
    add_prepack(parser)
    add = parser.add_argument
    add(
        "--strategy",
        default=c.strategy,
        help=f"default per-request strategy: {STRATEGY_HELP}, or {AUTO_HELP} (default: {c.strategy})",
    )
    add("--host", default=c.host, help=f"address to bind (default: {c.host}, this machine only)")
    add("--port", type=int, default=c.port, help=f"(default: {c.port})")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)")
    add("--served-name", default=None, help="model id in the API (default: the --model spec)")
    add(
        "--max-batch",
        type=int,
        default=c.max_batch,
        help=f"most requests decoded at once (default: {c.max_batch})",
    )
    add(
        "--max-queue",
        type=int,
        default=c.max_queue,
        help=f"most requests waiting; more get 429 (default: {c.max_queue})",
    )
    add(
        "--max-tokens-limit",
        type=int,
        default=c.max_tokens_limit,
        help=f"largest max_tokens a request may ask for, and the default (default: {c.max_tokens_limit})",
    )
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_no_progress(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
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
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, dtype=args.dtype, device=args.device, prepack=args.prepack)
    print(describe_decode(mtp.model), file=sys.stderr)
    serve(mtp, config)
    return 0
