"""Sweep results on disk: `results.json` (for machines), `results.md` (a table like the paper's) and
`pareto.png` (accuracy against acceleration: static k and ConfAdapt as two series, the teacher as a
reference line). Every file is written atomically, so a crash never leaves half a file behind.

Standard error of an accuracy p over n items: sqrt(p (1 - p) / (n - 1)), the sample standard
deviation over sqrt(n), which is what lm-evaluation-harness reports (0 when n < 2).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from selfmtp.files import write_bytes_atomic, write_json_atomic, write_text_atomic

STDERR_FORMULA = "sqrt(p*(1-p)/(n-1))  (sample std / sqrt(n), as lm-evaluation-harness)"
# Paired differences (evaluation/reference.py), when the reference row is in the sweep.
PAIRED_COLUMNS = (("vs_static_1", "vs static k=1 (points)"), ("vs_teacher", "vs teacher (points)"))


def accuracy_with_stderr(correct: list[bool]) -> dict:
    n = len(correct)
    p = sum(correct) / n if n else 0.0
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return {"accuracy": p, "stderr": stderr, "n": n}


# ---------------------------------------------------------------------------------------------
# Table


def pooled_tokens_per_pass(row: dict) -> float:
    """All tokens / all passes of a row (the paper's effective k); rows written before it was kept: the mean."""
    return row.get("tokens_per_pass_pooled", row.get("tokens_per_pass_overall", row["acceleration_mean"]))


def display_name(row: dict) -> str:
    kind = row.get("kind")
    if kind == "teacher":
        return "teacher (NTP, step 0)"
    if kind == "static":
        return f"static k={row['k_max']}"
    if kind == "confadapt":
        return f"ConfAdapt tau={row['tau']:g} (k_max {row['k_max']})"
    if kind == "verify":
        options = row["strategy"].split(":")[1:]  # verify[:K][:tree][:lookup]
        lookup = " + lookup" if "lookup" in options else ""
        return f"exact {'tree ' if 'tree' in options else ''}K={row['k_max']}{lookup}"
    return row["strategy"]


def format_table(results: dict) -> str:
    """Markdown table: one row per strategy, accuracy in % with stderr, acceleration mean +- std."""
    rows = results["rows"]
    extra = [m for m in results.get("metrics", [])[1:]]
    primary = results.get("metrics", ["accuracy"])[0]
    agreement = any("answer_agreement" in row for row in rows)
    nll = any("teacher_nll_per_token" in row for row in rows)
    paired = [(key, title) for key, title in PAIRED_COLUMNS if any(key in row for row in rows)]
    header = ["strategy", f"{primary} (%)", *[f"{m} (%)" for m in extra]]
    header += [title for _, title in paired]
    header += ["agreement with teacher (%)"] * agreement + ["teacher NLL/token"] * nll
    identical = any("identical_to_static_1" in row for row in rows)
    header += ["same tokens as static k=1"] * identical
    header += ["tokens/pass (per-generation mean)", "tokens/pass (pooled)", "tokens/s", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [display_name(row), _percent(row["accuracy"], row["stderr"])]
        cells += [_percent(row["metrics"][m]["accuracy"], row["metrics"][m]["stderr"]) for m in extra]
        cells += [_points(row[key], row[f"{key}_stderr"]) if key in row else "-" for key, _ in paired]
        if agreement:
            cells.append(_percent(row["answer_agreement"], row["answer_agreement_stderr"]) if "answer_agreement" in row else "-")
        if nll:
            cells.append(f"{row['teacher_nll_per_token']:.3f}" if "teacher_nll_per_token" in row else "-")
        if identical:
            cells.append(f"{row['identical_to_static_1']}/{row['identical_of']}" if "identical_to_static_1" in row else "-")
        cells += [
            f"{row['acceleration_mean']:.2f}x +- {row['acceleration_std']:.2f}",
            f"{pooled_tokens_per_pass(row):.2f}x",
            f"{row['tokens_per_second']:.1f}",
            str(row["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(p: float, stderr: float) -> str:
    return f"{100 * p:.1f} +- {100 * stderr:.1f}"


def _points(difference: float, stderr: float) -> str:
    return f"{100 * difference:+.1f} +- {100 * stderr:.1f}"


def _decode_text(decode: dict) -> str:
    text = decode.get("dtype", "float32")
    if decode.get("requested") == "auto" and "choice" in decode:
        text += f" (--dtype auto: {decode['choice']['reason']})"
    return text


def markdown_report(results: dict) -> str:
    title = f"# {results['task']} - {results['model']}"
    notes = [
        f"Accuracy: {results.get('metrics', ['accuracy'])[0]} with standard error {STDERR_FORMULA}.",
        "tokens/pass (per-generation mean): generated tokens / forward passes of each generation, mean +- std.",
        "tokens/pass (pooled): all generated tokens / all forward passes, the paper's \"effective k\" "
        "(compare this one with the paper).",
    ]
    if any(row.get("kind") == "verify" for row in results["rows"]):
        notes.append("exact K: verify:K, drafts from the masks checked in the next pass; output identical to the "
                     "model's own greedy k=1 (same tokens as static k=1 counts the items where it is, token for token).")
    if results.get("teacher"):
        notes.append(f"teacher: plain greedy NTP of {results['teacher']} (the step-0 baseline).")
        notes.append("agreement with teacher: share of items whose extracted answer equals the teacher row's.")
    if any(key in row for row in results["rows"] for key, _ in PAIRED_COLUMNS):
        notes.append("vs static k=1 / vs teacher: accuracy difference in points on the same items, +- the "
                     "standard error of the per-item differences (paired).")
    decodes = {(row["model"], _decode_text(row["decode"])) for row in results["rows"] if row.get("decode")}
    notes += [f"decode dtype of {model}: {text}." for model, text in sorted(decodes)]
    if any("teacher_nll_per_token" in row for row in results["rows"]):
        notes.append("teacher NLL/token: the teacher's mean negative log-likelihood of the generated tokens (coherence).")
    return "\n\n".join([title, format_table(results), "\n".join(f"- {n}" for n in notes)]) + "\n"


# ---------------------------------------------------------------------------------------------
# Plot


def accuracy_label(metric: str) -> str:
    """Axis label of a task's primary metric: "accuracy (%)", or "flexible-extract accuracy (%)"."""
    return "accuracy (%)" if metric == "accuracy" else f"{metric} accuracy (%)"


def plot_pareto(results: dict, path: Path) -> None:
    """Accuracy (with stderr bars) against mean acceleration; static and ConfAdapt as two series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    series = {"static k": ("static", "ntp"), "ConfAdapt": ("confadapt",), "exact (verify)": ("verify",)}
    for (label, kinds), marker in zip(series.items(), ("s", "o", "D"), strict=True):
        rows = sorted((r for r in results["rows"] if r["kind"] in kinds), key=pooled_tokens_per_pass)
        if not rows:
            continue
        x = [pooled_tokens_per_pass(r) for r in rows]
        y = [100 * r["accuracy"] for r in rows]
        ax.errorbar(x, y, yerr=[100 * r["stderr"] for r in rows], marker=marker, capsize=3, label=label)
        for row, xi, yi in zip(rows, x, y, strict=True):
            tag = f"{row['tau']:g}" if row["kind"] == "confadapt" else f"k={row['k_max']}"
            tag += " tree" if row["strategy"].endswith(":tree") else ""
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for row in (r for r in results["rows"] if r["kind"] == "teacher"):
        acc, err = 100 * row["accuracy"], 100 * row["stderr"]
        ax.axhline(acc, color="gray", linestyle="--", linewidth=1, label="teacher (step 0)")
        ax.axhspan(acc - err, acc + err, color="gray", alpha=0.15)
        ax.plot([pooled_tokens_per_pass(row)], [acc], marker="*", color="gray", markersize=10)
    ax.set_xlabel("tokens per forward pass (pooled over all generations, the paper's effective k)")
    ax.set_ylabel(accuracy_label(results.get("metrics", ["accuracy"])[0]))
    ax.set_title(f"{results['task']}: {results['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_bytes_atomic(Path(path), image.getvalue())


def write_report(results: dict, output_dir: Path, *, plot: bool = True) -> None:
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", markdown_report(results))
    if plot:
        plot_pareto(results, output_dir / "pareto.png")
