"""A training run's curve: RUN_DIR/metrics.jsonl -> RUN_DIR/training_curve.png (`selfmtp train --plot-only`).

Three panels against the optimizer step: the online loss (train, smoothed, and held-out), the held-out
rollout/teacher agreement for each position j of a region (and, with a teacher prefix loss, the student's
next-token agreement with the teacher at ground-truth positions), and the ConfAdapt acceleration (tokens
per pass) on the fixed dev prompts with the share of the teacher's greedy text reproduced.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from selfmtp.errors import SelfMTPError
from selfmtp.files import write_bytes_atomic


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SelfMTPError(f"no metrics.jsonl in {run_dir}: give the --output of a `selfmtp train` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` values."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_loss(ax, train: list[dict], evals: list[dict]) -> None:
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], color="0.8", lw=0.8, label="train (per step)")
    ax.plot(steps, smooth([r["loss"] for r in train], 10), color="C0", label="train (10-step mean)")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="C3", label="held-out")
    ax.set(xlabel="step", ylabel="online loss (CE to teacher)", title="online loss")
    ax.legend()


def plot_agreement(ax, evals: list[dict], cmap) -> None:
    k_max = max((len(r["eval_agreement_by_j"]) for r in evals), default=0)
    for j in range(k_max):
        points = [(r["step"], r["eval_agreement_by_j"][j]) for r in evals if r["eval_agreement_by_j"][j] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, color=cmap(j / max(k_max - 1, 1)), label=f"j={j + 1}")
    prefix = [(r["step"], r["eval_prefix_agreement"]) for r in evals if "eval_prefix_agreement" in r]
    if prefix:
        ax.plot(*zip(*prefix, strict=True), "k--", lw=1, label="next token at GT positions")
    ax.set(xlabel="step", ylabel="rollout == teacher", title="held-out agreement by position j", ylim=(0, 1.02))
    ax.legend(ncol=2, fontsize=8)


def plot_decode(ax, decodes: list[dict]) -> None:
    if not decodes:
        ax.text(0.5, 0.5, "no decode eval in this run\n(--eval-decode-prompts)", ha="center", va="center")
    else:
        steps = [r["step"] for r in decodes]
        ax.errorbar(steps, [r["decode_acceleration"] for r in decodes],
                    yerr=[r.get("decode_acceleration_std", 0.0) for r in decodes], fmt="o-", color="C2",
                    capsize=3, label=decodes[-1]["decode_strategy"])  # fmt: skip
        top = max(r["decode_acceleration"] + r.get("decode_acceleration_std", 0.0) for r in decodes)
        ax.set(ylabel="tokens per forward pass", ylim=(0.9, max(2.0, 1.1 * top)))
        match = ax.twinx()
        match.plot(steps, [r["decode_prefix_match"] for r in decodes], "s--", color="C1",
                   label="share of teacher's greedy text kept")  # fmt: skip
        match.set(ylabel="prefix match with teacher greedy", ylim=(0, 1.02))
        lines = ax.get_legend_handles_labels(), match.get_legend_handles_labels()
        ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper left")
    ax.set(xlabel="step", title="ConfAdapt on dev prompts")


def plot_training_curve(run_dir: str | Path, title: str | None = None) -> Path:
    """Draw RUN_DIR/training_curve.png from RUN_DIR/metrics.jsonl; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, (ax_loss, ax_agree, ax_decode) = plt.subplots(1, 3, figsize=(16, 4.5))
    evals = [r for r in rows if "eval_loss" in r]
    plot_loss(ax_loss, [r for r in rows if "loss" in r], evals)
    plot_agreement(ax_agree, evals, plt.get_cmap("viridis"))
    plot_decode(ax_decode, [r for r in rows if "decode_acceleration" in r])
    fig.suptitle(title or str(run_dir))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path = run_dir / "training_curve.png"
    write_bytes_atomic(path, png.getvalue())
    return path
