"""Which clock prices a served pass: the engine thread's CPU time, the process's, or the wall clock.

Starts `selfmtp serve` in this process (the engine thread and uvicorn's HTTP thread, as the CLI
runs them), sends --requests requests at each concurrency level from that many `openai` client
threads (in a child process, so their work is not the server's), streamed and whole, and reads the engine's per-pass seconds by three clocks (`GET
/health`'s `pass_seconds`) before and after each cell. Per cell: the process's CPU seconds and the
wall seconds over the engine thread's CPU seconds during the passes. With one torch thread the model
computes in the engine thread, so what the process adds is the other threads' work (HTTP, JSON)
charged to the pass by `time.process_time`; the wall clock adds the time the engine waited (for the
GIL, for a core).

    python scripts/measure_pass_clock.py --model runs/demo/train/final \\
      --prompts docs/measurements/bench-tiny-gsm-mtp-cpu/prompts.jsonl --output docs/measurements/pass-clock-cpu

(about 1 minute on a quiet machine at 1 thread with the defaults).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from selfmtp.api import MTPModel, read_prompts
from selfmtp.files import write_json_atomic
from selfmtp.serving.config import ServeConfig
from selfmtp.serving.server import RunningServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output", required=True, help="a folder: pass_clock.json")
    parser.add_argument("--strategy", default="auto:verify:8")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=16, help="per level and mode (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prepack", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, prepack=args.prepack)
    prompts = read_prompts(args.prompts)
    server = RunningServer(mtp, ServeConfig(port=0, strategy=args.strategy, max_batch=8, max_queue=256))
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    cells = []
    try:
        for level in [int(c) for c in args.concurrency.split(",")]:
            for stream in (False, True):
                before = server.engine.snapshot()
                asked = [prompts[i % len(prompts)] for i in range(max(args.requests, level))]
                clients.submit(send, server.base_url, asked, level, stream, args.strategy, args.max_tokens).result()
                cells.append(cell(level, stream, before, server.engine.snapshot()))
                print(json.dumps(cells[-1]), flush=True)
    finally:
        clients.shutdown()
        server.close()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "pass_clock.json", {"command": "python " + " ".join(sys.argv), "threads": args.threads,
                                                "cells": cells, "engine_end": server.engine.snapshot()})  # fmt: skip


def send(base_url: str, prompts: list[str], level: int, stream: bool, strategy: str, max_tokens: int) -> None:
    """(In the child process) every prompt, `level` at a time."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def ask(prompt: str) -> None:
        response = client.completions.create(model="selfmtp", prompt=prompt, max_tokens=max_tokens, stream=stream,
                                             temperature=0, extra_body={"strategy": strategy})  # fmt: skip
        if stream:
            for _ in response:
                pass

    with ThreadPoolExecutor(level) as pool:
        list(pool.map(ask, prompts))


def cell(level: int, stream: bool, before: dict, after: dict) -> dict:
    spent = {name: after["pass_seconds"][name] - before["pass_seconds"][name] for name in after["pass_seconds"]}
    thread = spent["engine_thread_cpu"]
    return {
        "concurrency": level, "stream": stream, "passes": after["passes"] - before["passes"],
        "engine_thread_cpu_ms_per_pass": 1000 * thread / max(1, after["passes"] - before["passes"]),
        "process_over_thread": spent["process_cpu"] / thread, "wall_over_thread": spent["wall"] / thread,
    }  # fmt: skip


if __name__ == "__main__":
    main()
