"""benchmarks/gpu_check.sh in its CPU fast mode: every step runs and reports (FSDP bf16 training on one
process, static:1 against transformers greedy, pass cost, bench)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow  # ~40 s of CPU in five fresh processes; minutes of wall clock on a loaded 2-core machine
def test_gpu_check_runs_on_cpu_in_fast_mode(tmp_path):
    log = tmp_path / "gpu_check.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(SCRIPT), "--device", "cpu", "--fast", "--log", str(log)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    text = log.read_text()
    for line in ("train (fsdp, bf16, 1 device)", "final/ written: True; sharded checkpoint: True",
                 "static:1 vs greedy: 4/4 prompts identical", "pass cost by tokens fed", "| confadapt:0.9:8 |",
                 "gpu_check: done"):
        assert line in text, line
