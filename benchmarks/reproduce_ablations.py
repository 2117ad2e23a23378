"""The paper's ablations at CPU scale on tiny-gsm, each with the demo's budget (not a test).

    PYTHONPATH=src python benchmarks/reproduce_ablations.py --output runs/ablations [--only soft,ground-truth]

Every variant is the paper's main setting at the demo's scale (selfmtp.demo.DemoConfig with online
hard-teacher supervision and a next-token cross-entropy anchor of weight 1, `ABLATION_BASE`) with ONE
training setting changed: same data, steps, batch, learning rate and seed, same evaluation sweep. Each variant's run folder holds the
usual results.json / results.md / pareto.png; the script adds ablations.json, ablations.md and
ablations.png (every variant's ConfAdapt curve on one plot). Resumable, like the demo.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from selfmtp.demo import DemoConfig, sweep_config, train_config, train_or_reuse, write_training_problems
from selfmtp.evaluation.sweep import run_sweep
from selfmtp.files import write_json_atomic, write_text_atomic

# name -> (TrainConfig overrides, what the paper found)
VARIANTS = {
    "recipe": ({}, "the paper's main setting (hard teacher, online, random k, causal blocks)"),
    "soft-teacher": ({"teacher_mode": "soft"}, "hard > soft"),
    "ground-truth": ({"supervision": "ground-truth"}, "online > ground-truth (GT: 66.4% at only 2.2x)"),
    "static-k": ({"k_sampling": "static", "static_k": None}, "random k > static k"),
    "bidirectional": ({"block_attention": "bidirectional"}, "causal ~ bidirectional"),
    "prefix-loss": ({"prefix_loss": None}, "no prefix loss > prefix loss"),
}
# The base the documented ablation table was measured with (docs/reproduction.md).
ABLATION_BASE = {"supervision": "online", "prefix_target": "ground-truth", "prefix_loss": 1.0}
STRATEGIES = "static:1,static:2,static:4,confadapt:0.95:8,confadapt:0.9:8,confadapt:0.8:8,confadapt:0.7:8,confadapt:0.6:8"


def overrides_for(name: str, base: DemoConfig) -> dict:
    overrides = dict(VARIANTS[name][0])
    if name == "static-k":
        overrides["static_k"] = base.k_max
    if name == "prefix-loss":  # toggle: the ablation is the recipe with the prefix loss the other way
        overrides["prefix_loss"] = 0.0 if base.prefix_loss > 0 else 1.0
    return overrides


def run_variant(name: str, base: DemoConfig, data: Path, root: Path) -> dict:
    folder = root / name
    start = time.perf_counter()
    tc = train_config(base, data, folder / "train", **overrides_for(name, base))
    final = train_or_reuse(tc, log=lambda msg: print(f"[{name}] {msg}", flush=True))
    results = run_sweep(sweep_config(base, final), folder, progress=base.progress)
    return {"variant": name, "overrides": overrides_for(name, base), "paper": VARIANTS[name][1],
            "seconds": time.perf_counter() - start, "rows": results["rows"]}  # fmt: skip


def markdown(variants: list[dict]) -> str:
    def cell(rows, strategy):
        row = next((r for r in rows if r["strategy"] == strategy), None)
        return "-" if row is None else f"{100 * row['accuracy']:.1f} @ {row['acceleration_mean']:.2f}x"

    columns = ["static:1", "static:2", "static:4", "confadapt:0.95:8", "confadapt:0.9:8", "confadapt:0.8:8", "confadapt:0.7:8", "confadapt:0.6:8"]
    lines = ["| variant | " + " | ".join(columns) + " | paper |", "|---" * (len(columns) + 2) + "|"]
    for v in variants:
        lines.append(f"| {v['variant']} | " + " | ".join(cell(v["rows"], c) for c in columns) + f" | {v['paper']} |")
    return "\n".join(lines) + "\n\nCells: accuracy (%) @ acceleration (tokens per forward pass).\n"


def plot(variants: list[dict], teacher_accuracy: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    for v in variants:
        rows = sorted((r for r in v["rows"] if r["kind"] == "confadapt"), key=lambda r: r["acceleration_mean"])
        k1 = [r for r in v["rows"] if r["strategy"] == "static:1"]
        rows = k1 + rows
        ax.plot([r["acceleration_mean"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=v["variant"])
    if teacher_accuracy is not None:
        ax.axhline(100 * teacher_accuracy, color="gray", linestyle="--", linewidth=1, label="teacher (step 0)")
    ax.set_xlabel("acceleration (tokens per forward pass)")
    ax.set_ylabel("tiny-gsm accuracy (%)")
    ax.set_title("Ablations: static k=1 then ConfAdapt tau 0.95 -> 0.6 (k_max 8)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/ablations")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--eval-problems", type=int, default=DemoConfig.eval_problems)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.output)
    base = DemoConfig(output=str(root), steps=args.steps, eval_problems=args.eval_problems, seed=args.seed,
                      strategies=STRATEGIES.split(","), progress=False, **ABLATION_BASE)  # fmt: skip
    data = write_training_problems(base, root / "data")
    names = args.only.split(",") if args.only else list(VARIANTS)
    variants = []
    for name in names:
        variants.append(run_variant(name, base, data, root))
        print(json.dumps({k: v for k, v in variants[-1].items() if k != "rows"}), flush=True)
    # the teacher's own greedy accuracy: its static k=1 (no masks fed) is plain NTP
    teacher = run_sweep(replace(sweep_config(base, base.teacher), strategies=["static:1"]), root / "teacher")
    teacher_accuracy = teacher["rows"][0]["accuracy"]
    write_json_atomic(root / "ablations.json", {"base": asdict(base), "teacher_accuracy": teacher_accuracy, "variants": variants})
    write_text_atomic(root / "ablations.md", f"Teacher (step 0) greedy accuracy: {100 * teacher_accuracy:.1f}%\n\n" + markdown(variants))
    plot(variants, teacher_accuracy, root / "ablations.png")
    print(markdown(variants))


if __name__ == "__main__":
    main()
