"""Plot a training run's curve: RUN_DIR/metrics.jsonl -> RUN_DIR/training_curve.png.

    PYTHONPATH=src python benchmarks/plot_training_curve.py runs/smollm2-135m-gsm8k-lora

Three panels against the optimizer step: the online loss (train, smoothed, and held-out), the
held-out rollout/teacher agreement for each position j of a region (and, with a teacher prefix
loss, the student's next-token agreement with the teacher at ground-truth positions), and the ConfAdapt acceleration
(tokens per pass) on the fixed dev prompts with the share of the teacher's greedy text reproduced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` values."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    decodes = [r for r in rows if "decode_acceleration" in r]
    fig, (ax_loss, ax_agree, ax_accel) = plt.subplots(1, 3, figsize=(16, 4.5))

    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], color="0.8", lw=0.8, label="train (per step)")
    ax_loss.plot(steps, smooth([r["loss"] for r in train], 10), color="C0", label="train (10-step mean)")
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="C3", label="held-out")
    ax_loss.set(xlabel="step", ylabel="online loss (CE to teacher)", title="online loss")
    ax_loss.legend()

    k_max = max((len(r["eval_agreement_by_j"]) for r in evals), default=0)
    cmap = plt.get_cmap("viridis")
    for j in range(k_max):
        points = [(r["step"], r["eval_agreement_by_j"][j]) for r in evals if r["eval_agreement_by_j"][j] is not None]
        if points:
            ax_agree.plot(*zip(*points, strict=True), "o-", ms=3, color=cmap(j / max(k_max - 1, 1)), label=f"j={j + 1}")
    prefix = [(r["step"], r["eval_prefix_agreement"]) for r in evals if "eval_prefix_agreement" in r]
    if prefix:
        ax_agree.plot(*zip(*prefix, strict=True), "k--", lw=1, label="next token at GT positions")
    ax_agree.set(xlabel="step", ylabel="rollout == teacher", title="held-out agreement by position j", ylim=(0, 1.02))
    ax_agree.legend(ncol=2, fontsize=8)

    if decodes:
        d_steps = [r["step"] for r in decodes]
        ax_accel.errorbar(d_steps, [r["decode_acceleration"] for r in decodes],
                          yerr=[r.get("decode_acceleration_std", 0.0) for r in decodes], fmt="o-", color="C2",
                          capsize=3, label=decodes[-1]["decode_strategy"])
        top = max(r["decode_acceleration"] + r.get("decode_acceleration_std", 0.0) for r in decodes)
        ax_accel.set(ylabel="tokens per forward pass", ylim=(0.9, max(2.0, 1.1 * top)))
        ax_match = ax_accel.twinx()
        ax_match.plot(d_steps, [r["decode_prefix_match"] for r in decodes], "s--", color="C1",
                      label="share of teacher's greedy text kept")
        ax_match.set(ylabel="prefix match with teacher greedy", ylim=(0, 1.02))
        lines = ax_accel.get_legend_handles_labels(), ax_match.get_legend_handles_labels()
        ax_accel.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper left")
    else:
        ax_accel.text(0.5, 0.5, "no decode eval in this run\n(--eval-decode-prompts)", ha="center", va="center")
    ax_accel.set(xlabel="step", title="ConfAdapt on dev prompts")

    fig.suptitle(title)
    fig.tight_layout()
    path = out / "training_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a `selfmtp train` output directory")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    print(f"wrote {plot(read_metrics(run_dir), run_dir, args.title or str(run_dir))}")


if __name__ == "__main__":
    main()
