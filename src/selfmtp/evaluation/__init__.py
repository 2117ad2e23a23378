"""Evaluation: tasks (GSM8K, BBH, tiny-gsm), answer extraction, resumable strategy sweeps, reports.

from selfmtp.evaluation import SweepConfig, run_sweep
results = run_sweep(SweepConfig(model="DIR", task="tiny-gsm", limit=100), "out/")
"""

from selfmtp.evaluation.sweep import DEFAULT_STRATEGIES, SweepConfig, run_sweep

__all__ = ["DEFAULT_STRATEGIES", "SweepConfig", "run_sweep"]
