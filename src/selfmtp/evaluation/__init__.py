"""Evaluation: tasks (GSM8K, BBH, tiny-gsm), answer extraction, resumable strategy sweeps, reports,
and wall-clock benchmarks of decoding strategies against baselines (`bench`).

from selfmtp.evaluation import SweepConfig, run_sweep
results = run_sweep(SweepConfig(model="DIR", task="tiny-gsm", limit=100), "out/")
"""

from selfmtp.evaluation.bench import BenchConfig, run_bench
from selfmtp.evaluation.sweep import DEFAULT_STRATEGIES, SweepConfig, run_sweep

__all__ = ["DEFAULT_STRATEGIES", "BenchConfig", "SweepConfig", "run_bench", "run_sweep"]
