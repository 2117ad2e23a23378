"""benchmarks/gpu_train_smollm2.sh smoke, on the CPU: the accelerator script's stages run and report exactness.

Slow (about a minute at 2 threads): the script only chains `selfmtp` commands that the default suite tests one
by one; this checks the chain, its time boxes and its packing, so a GPU session is not spent finding a typo.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_train_script_smoke_runs_every_stage_on_cpu(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "DEVICE": "cpu", "RUNS": str(runs), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/gpu_train_smollm2.sh", "smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    codes = re.findall(r"^== (\S+) rc=(\d+)", done.stdout, flags=re.M)
    assert [name for name, _ in codes] == ["train-tiny", "eval-tiny-float32", "eval-tiny-bfloat16", "bench-tiny"], codes
    assert all(code == "0" for _, code in codes), done.stdout  # no stage failed or ran into its time box
    for dtype in ("float32", "bfloat16"):  # verify must give static:1's tokens in both dtypes
        rows = json.loads((runs / f"eval-tiny-{dtype}" / "results.json").read_text())["rows"]
        verify = next(row for row in rows if row["kind"] == "verify")
        assert verify["identical_to_static_1"] == verify["identical_of"] == 16, (dtype, verify)
    with tarfile.open(out / "results.tgz") as packed:  # what comes back from a device call
        names = packed.getnames()
    assert any(name.endswith("bench-tiny/bench.json") for name in names), names
    assert not any(name.endswith(".safetensors") for name in names), names
