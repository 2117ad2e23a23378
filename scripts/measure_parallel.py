"""FSDP vs DDP step time on 2 CPU processes (gloo), same model, batch and data; writes a JSON result.

    PYTHONPATH=src python scripts/measure_parallel.py --output parallel_step_time.json

Each mode trains `--steps` steps from the same seed, `--rounds` times, alternating DDP and FSDP so
that background load hits both alike. A step's time is `step_seconds` in metrics.jsonl (the
trainer's own wall clock around `train_step`, rank 0); the first step of a run (warm-up)
is dropped and the medians over the rest are reported, with their ratio (target: FSDP <= 1.3x DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from selfmtp.training.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    train(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_seconds(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step_seconds"] for row in rows[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:layers=4,hidden=256,heads=4,kv_heads=2,intermediate=768")
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import gsm8k_style_lines

    times: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text(gsm8k_style_lines(96))
        for round_ in range(args.rounds):
            for mode in ("ddp", "fsdp"):
                out = Path(tmp) / f"{mode}-{round_}"
                cfg = TrainConfig(data=str(data), output=str(out), model=args.model, template="plain",
                                  seq_len=args.seq_len, k_max=4, batch_size=args.batch_size, steps=args.steps,
                                  warmup=0, eval_every=0, save_every=0, progress=False, parallel=mode)
                torch.multiprocessing.spawn(_worker, args=(2, _free_port(), cfg, args.threads), nprocs=2, join=True)
                times[mode] += step_seconds(out)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    result = {"model": args.model, "processes": 2, "backend": "gloo", "batch_size_per_process": args.batch_size,
              "seq_len": args.seq_len, "threads_per_process": args.threads, "step_seconds": times,
              "median_step_seconds": medians, "fsdp_over_ddp": medians["fsdp"] / medians["ddp"],
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"median step: ddp {medians['ddp']:.3f} s, fsdp {medians['fsdp']:.3f} s, "
          f"fsdp/ddp {result['fsdp_over_ddp']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
