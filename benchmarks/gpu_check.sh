#!/usr/bin/env bash
# One command on an accelerator: FSDP bf16 training steps, static:1 == greedy, pass cost, bench.
#   benchmarks/gpu_check.sh                         # cuda, smollm2-135m (< 5 minutes on one GPU)
#   benchmarks/gpu_check.sh --device cpu --fast     # the tiny model on the CPU
# See benchmarks/gpu_check.py for what each step prints; on a GPU the log goes to docs/measurements/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$root/benchmarks/gpu_check.py" "$@"
