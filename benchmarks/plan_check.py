"""Check `selfmtp plan`'s figures against a real training step, part by part, and write a JSON result.

    PYTHONPATH=src python benchmarks/plan_check.py --model tiny --output plan_check.json
    PYTHONPATH=src python benchmarks/plan_check.py --model smollm2-135m --batch-size 2 --output plan_check.json

One `selfmtp.training.train` run of 2 steps (one process, float32, no activation checkpointing); the
second step is measured with the actual tensors, not an allocator statistic:
    weights      bytes of the student's parameters
    gradients    bytes of every .grad when the optimizer steps
    optimizer    bytes of AdamW's state tensors after the step
    teacher      bytes of the separate teacher's parameters (0 when there is none)
    activations  bytes of the distinct tensors the student's forward saves for backward, caught with
                 torch.autograd.graph.saved_tensors_hooks (parameters themselves excluded)
and set beside the planner's prediction for the same model shape, batch, layout width and
supervised count (`activation_bytes` with the step's own layout). Not checked here: FSDP's
transient buffers, autocast's copies, checkpointing's recompute (the hooks do not see inside a
checkpointed layer) and allocator overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import selfmtp.training.step as training_step
import selfmtp.training.trainer as trainer
from selfmtp.training.plan import activation_bytes, plan_memory, shape_for_model

ROOT = Path(__file__).resolve().parents[1]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(cfg: trainer.TrainConfig, measured_step: int = 1) -> dict:
    """Run `cfg` and measure step `measured_step` (0-based; 1: AdamW's states already exist)."""
    found: dict = {}
    real_step, real_layout = trainer.train_step, training_step._layout

    def layout(run, rows, plan):
        out = real_layout(run, rows, plan)
        found.setdefault("layouts", []).append((tuple(out.input_ids.shape), int(out.sup_batch.numel())))
        return out

    def step(run, index):
        if index != measured_step:
            return real_step(run, index)
        params = {p.untyped_storage().data_ptr() for p in run.student.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        def before_step(optimizer, args, kwargs):
            found["gradients"] = _nbytes(p.grad for p in run.student.parameters() if p.grad is not None)

        handle = run.optimizer.register_step_pre_hook(before_step)
        found["layouts"] = []
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                stats = real_step(run, index)
        finally:
            handle.remove()
        found["activations"] = sum(saved.values())
        found["weights"] = _nbytes(run.student.parameters())
        found["optimizer"] = _nbytes(v for state in run.optimizer.state.values() for v in state.values()
                                     if isinstance(v, torch.Tensor) and v.dim() > 0)
        found["teacher"] = _nbytes(run.teacher_model.parameters()) if run.teacher_model is not None else 0
        return stats

    trainer.train_step, training_step._layout = step, layout  # the loop calls the first, the step the second
    try:
        trainer.train(cfg)
    finally:
        trainer.train_step, training_step._layout = real_step, real_layout
    return found


def check(model: str, *, batch_size: int, seq_len: int, k_max: int, lora_rank: int, data: str, workdir: Path) -> dict:
    cfg = trainer.TrainConfig(data=data, output=str(workdir / f"run-{lora_rank}"), model=model, template="plain",
                              seq_len=seq_len, k_max=k_max, batch_size=batch_size, steps=2, warmup=0, eval_every=0,
                              save_every=0, progress=False, lora_rank=lora_rank, dtype="float32")
    measured = measure(cfg)
    (rows, width), supervised = measured["layouts"][0]
    shape = shape_for_model(model)
    planned = plan_memory(shape, gpus=1, parallel="ddp", batch_rows=batch_size, seq_len=seq_len, k_max=k_max,
                          lora_rank=lora_rank, dtype="float32").parts
    planned["activations"] = activation_bytes(shape, tokens=rows * width, layout_len=width, supervised=supervised,
                                              dtype="float32", checkpointing=False, lora_rank=lora_rank)
    parts = ["weights", "gradients", "optimizer", "teacher", "activations"]
    return {
        "model": model, "lora_rank": lora_rank, "batch_size": batch_size, "seq_len": seq_len, "k_max": k_max,
        "layout": [rows, width], "supervised": supervised,
        "parts": {name: {"measured": measured[name], "planned": planned[name],
                         "ratio": round(planned[name] / measured[name], 4) if measured[name] else None}
                  for name in parts},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, nargs="+", default=[0, 4], help="one check per rank (0: full)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import gsm8k_style_lines  # the tests' synthetic GSM8K-style data

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text(gsm8k_style_lines(48))
        results = [check(args.model, batch_size=args.batch_size, seq_len=args.seq_len, k_max=args.k_max,
                         lora_rank=rank, data=str(data), workdir=Path(tmp)) for rank in args.lora_rank]
    Path(args.output).write_text(json.dumps({"checks": results}, indent=2) + "\n")
    for result in results:
        ratios = ", ".join(f"{k} {v['ratio']}" for k, v in result["parts"].items())
        print(f"{result['model']} lora {result['lora_rank']}: planned/measured {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
