"""`selfmtp demo --real`: the shipped real model (`smollm2-135m-mtp`) beside the tiny-gsm demo.

A few GSM8K questions of our dev split (never trained on) ship in `assets/gsm8k-dev-sample.jsonl`.
They are decoded one at a time (batch 1, the latency case) with static k=1, exact `verify:8` and
ConfAdapt tau=0.9. For a gated model (the shipped one), static k=1 IS the original SmolLM2's greedy
decoding: real tokens never see the deltas (models/gated.py). So `verify:8` must reproduce it token
for token, and ConfAdapt's answers are compared with it. The figures are the real model's targets
(README), reported and never asserted; a handful of prompts only shows the direction (docs/measurements/
smollm2-135m-mtp-v3-cpu has the dev-split evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REAL_MODEL = "smollm2-135m-mtp"
EXACT, LOSSY = "verify:8", "confadapt:0.9:8"


@dataclass
class RealDemoConfig:
    model: str = REAL_MODEL
    prompts: int = 4  # of the 8 shipped; ~1 minute per strategy on 2 CPU cores at 128 tokens
    max_new_tokens: int = 128
    seed: int = 0
    dtype: str = "auto"
    progress: bool = True


def sample_path() -> Path:
    return Path(str(resources.files("selfmtp") / "assets" / "gsm8k-dev-sample.jsonl"))


def run_real_demo(config: RealDemoConfig, output: Path, log=print) -> dict:
    """Decode the sample with the three strategies (resumable, like every sweep); returns the results and targets."""
    from selfmtp.evaluation.sweep import SweepConfig, run_sweep

    sweep = SweepConfig(
        model=config.model, task="gsm8k", strategies=["static:1", EXACT, LOSSY], data=str(sample_path()),
        limit=config.prompts, shots=0, chat=True, max_new_tokens=config.max_new_tokens, batch_size=1,
        seed=config.seed, dtype=config.dtype,
    )  # fmt: skip
    log(f"[real] {config.model} on {config.prompts} GSM8K dev questions, batch 1: static:1, {EXACT}, {LOSSY}")
    results = run_sweep(sweep, output, progress=config.progress)
    return {"results": results, "targets": check_real_targets(results["rows"])}


def check_real_targets(rows: list[dict]) -> list[dict]:
    """The real model's targets on whatever rows are there (a row that did not run is skipped)."""
    from selfmtp.evaluation.report import pooled_tokens_per_pass
    from selfmtp.evaluation.targets import graded_target

    by_name = {row["strategy"]: row for row in rows}
    k1, exact, lossy = by_name.get("static:1"), by_name.get(EXACT), by_name.get(LOSSY)
    targets = []
    if exact is not None:
        k = pooled_tokens_per_pass(exact)
        same = f"{exact.get('identical_to_static_1', 0)}/{exact.get('identical_of', 0)}"
        targets += [
            graded_target(f"{EXACT} tokens/pass (pooled) >= 1.8", k, k >= 1.8),
            graded_target(f"{EXACT} output identical to static k=1 on every item", same,
                    exact.get("identical_to_static_1") == exact.get("identical_of")),
        ]  # fmt: skip
    if lossy is not None:
        k, agreement = pooled_tokens_per_pass(lossy), lossy.get("answer_agreement_static_1", 0.0)
        targets.append(graded_target(f"{LOSSY} tokens/pass (pooled) >= 2.0", k, k >= 2.0))
        targets.append(graded_target(f"{LOSSY} answers agree with static k=1 on >= 85%", f"{100 * agreement:.0f}%",
                               agreement >= 0.85))  # fmt: skip
    if exact is not None and k1 is not None and k1["throughput_tokens_per_second"] > 0:
        speedup = exact["throughput_tokens_per_second"] / k1["throughput_tokens_per_second"]
        targets.append(graded_target(f"{EXACT} wall clock >= 1.5x static k=1 (one run, same machine)", speedup, speedup >= 1.5))
    return targets
