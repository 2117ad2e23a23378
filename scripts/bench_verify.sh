#!/usr/bin/env bash
# Exact decoding's wall clock, batch 1, 1 thread: the demo student (trained masks) and SmolLM2-135M
# (untrained masks, where verify must stay >= 0.9x our NTP loop), each with ntp, verify:8, its tree and
# lookup variants, and transformers generate, interleaved in one `selfmtp bench` per model.
# Usage: scripts/bench_verify.sh [STUDENT_DIR] [OUT_DIR] [RUNS]
#   (writes OUT_DIR/{student,smollm2}/bench.{json,md}; ~15 min on 2 quiet cores with RUNS=3)
set -euo pipefail
student=${1:-runs/demo/train/final}
out=${2:-docs/measurements/bench-verify-lookup-cpu}
runs=${3:-3}
py=${PYTHON:-python}
prompts=docs/measurements/verify-tiny-gsm-cpu  # tiny-gsm test problems 500-699, never trained on
strategies=ntp,verify:8,verify:8:lookup,verify:8:tree,verify:8:tree:lookup
export OMP_NUM_THREADS=1
$py -m selfmtp bench --model "$student" --prompts "$prompts/bench_prompts.jsonl" --max-new-tokens 120 --runs "$runs" \
  --threads 1 --no-chat --strategies "$strategies" --baselines hf-generate --output "$out/student" --seed 0
# SmolLM2: the 8 GSM8K dev questions that ship with the package (never trained on)
$py -m selfmtp bench --model smollm2-135m --prompts src/selfmtp/assets/gsm8k-dev-sample.jsonl --max-new-tokens 128 \
  --runs "$runs" --threads 1 --chat --strategies "$strategies" --baselines hf-generate --output "$out/smollm2" --seed 0
