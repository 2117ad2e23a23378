"""Graded targets: a claim, the value measured for it, and whether it was met.

The demo (`selfmtp demo`, and its real-model stage `--real`) reports its targets this way; they
are reported, never asserted, so a missed target is a line in the report, not a failure.
"""

from __future__ import annotations


def graded_target(name: str, value, met: bool, stderr: float | None = None) -> dict:
    """`stderr`: of a difference in accuracy, paired over the same problems (evaluation/reference.py)."""
    return {"target": name, "value": value, "met": bool(met)} | ({"stderr": stderr} if stderr is not None else {})


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        if t["value"] is None:
            value = ""
        elif isinstance(t["value"], str):
            value = f" ({t['value']})"
        elif "points" in t["target"]:
            error = f" +- {100 * t['stderr']:.1f}" if "stderr" in t else ""
            value = f" ({100 * t['value']:+.1f}{error} points)"
        else:
            value = f" ({t['value']:.2f})"
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}{value}")
    return "\n".join(lines)
