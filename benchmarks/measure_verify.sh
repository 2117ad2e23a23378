#!/usr/bin/env bash
# Exact decoding (verify) on the demo student and SmolLM2-135M: accuracy/identity sweep and wall clock.
# Usage: benchmarks/measure_verify.sh STUDENT_DIR OUT_DIR   (writes OUT_DIR/{eval,bench-student,bench-smollm2})
set -euo pipefail
student=${1:-runs/demo/train/final}
out=${2:-docs/measurements/verify-tiny-gsm-cpu}
py=${PYTHON:-python}
mkdir -p "$out"
$py -c "from selfmtp.tasks.tiny_gsm import generate_problems, write_jsonl; \
write_jsonl('$out/test_500_699.jsonl', generate_problems(1000, seed=0, split='test')[500:700])"
$py -m selfmtp eval --model "$student" --task tiny-gsm --data "$out/test_500_699.jsonl" --max-new-tokens 120 \
  --strategies static:1,verify:8,verify:8:tree,confadapt:0.9:8 --output "$out/eval" --seed 0
$py -c "import json; from selfmtp.tasks.tiny_gsm import generate_problems; \
print(''.join(json.dumps({'prompt': '<s>' + p['question'] + '\\n\\n'}) + '\\n' \
for p in generate_problems(1000, seed=0, split='test')[500:520]), end='')" > "$out/bench_prompts.jsonl"
OMP_NUM_THREADS=1 $py -m selfmtp bench --model "$student" --prompts "$out/bench_prompts.jsonl" --max-new-tokens 120 \
  --runs 1 --threads 1 --no-chat --strategies ntp,verify:8,verify:8:tree,confadapt:0.9:8 --baselines hf-generate \
  --output "$out/bench-student" --seed 0
OMP_NUM_THREADS=1 $py -m selfmtp bench --model smollm2-135m --prompts "$out/bench_prompts.jsonl" --limit 4 \
  --max-new-tokens 64 --runs 1 --threads 1 --no-chat --strategies ntp,verify:8,verify:8:tree --baselines hf-generate \
  --output "$out/bench-smollm2" --seed 0
