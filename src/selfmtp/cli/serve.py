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
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health/live "
        "(visible in the process list: prefer --api-key-file or the SELFMTP_API_KEY variable; default: no key)")
    add("--api-key-file", default=None, help="read the API key from the first line of this file")
    add("--allow-no-key", action="store_true",
        help="serve beyond loopback (--host) without an API key (refused otherwise; a warning is printed)")
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
    add("--max-k", type=int, default=None, help="most tokens any request may propose per pass (static:K, confadapt "
        "KMAX, verify K and its drafts are capped to it; default: the model's trained k_max, else 16)")
    add("--max-body-bytes", type=int, default=c.max_body_bytes,
        help=f"largest request body; larger ones get 413 before they are read (default: {c.max_body_bytes})")
    add("--max-messages", type=int, default=c.max_messages, help=f"most chat messages per request (default: {c.max_messages})")
    add("--max-stop-chars", type=int, default=c.max_stop_chars,
        help=f"longest stop string, in characters (default: {c.max_stop_chars})")
    add("--limit-concurrency", type=int, default=c.limit_concurrency,
        help=f"most open connections; more get 503 (default: {c.limit_concurrency})")
    add("--request-timeout", type=float, default=c.request_timeout,
        help=f"seconds a request may take, body to last token: 408 for a slow body, 504 for a slow answer; its row "
        f"is freed (default: {c.request_timeout:g})")
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_no_progress(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from selfmtp.api import MTPModel
    from selfmtp.serving import ServeConfig, serve
    from selfmtp.serving.auth import check_exposure, resolve_key

    config = ServeConfig(
        model_name=args.served_name or args.model, strategy=args.strategy, host=args.host, port=args.port,
        api_key=resolve_key(args.api_key, args.api_key_file), allow_no_key=args.allow_no_key,
        max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit, max_k=args.max_k,
        max_body_bytes=args.max_body_bytes, max_messages=args.max_messages, max_stop_chars=args.max_stop_chars,
        limit_concurrency=args.limit_concurrency, request_timeout=args.request_timeout,
    )  # fmt: skip
    config.check()  # bad flags fail before the model loads
    check_exposure(config.host, config.api_key, config.allow_no_key, log=lambda *_: None)  # refuse before loading
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, dtype=args.dtype, device=args.device, prepack=args.prepack)
    print(describe_decode(mtp.model), file=sys.stderr)
    serve(mtp, config)
    return 0
