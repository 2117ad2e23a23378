"""Measure the cost of online MTP training against plain next-token fine-tuning, and peak memory.

    PYTHONPATH=src python benchmarks/measure_train.py --model smollm2-135m --batch-size 8 --seq-len 160 \
        --output measure_train.json

1. Time: one MTP training step (student forward+backward on the blocked layout, one no-grad teacher
   forward, AdamW step) divided by one plain NTP fine-tuning step (stock `model(ids, labels=...)`,
   backward, AdamW step) on the same GSM8K batch. Steps alternate NTP/MTP after one warm-up each,
   so background load hits both alike; medians are reported.
2. Memory: peak RSS (VmHWM) of a fresh process doing MTP steps (--memory-steps) with (a) LoRA and the
   shared-weight teacher (adapter disabled), (b) full fine-tuning with a separate teacher copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training.data import read_examples, tokenize_examples
from selfmtp.training.layout import build_mtp_layout
from selfmtp.training.objective import SelectedLogits, adapter_disabled_teacher, frozen_teacher, mtp_loss

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def batch_rows(tokenizer, args):
    examples, _ = read_examples(args.data, limit=8 * args.batch_size)
    rows = tokenize_examples(examples, tokenizer, template=args.template, seq_len=args.seq_len)
    return rows.take(slice(0, args.batch_size))


def ntp_step(model, optimizer, rows):
    ids, lengths, starts = rows.input_ids, rows.lengths, rows.response_start
    t = torch.arange(ids.shape[1])[None]
    attention = (t < lengths[:, None]).long()
    labels = ids.masked_fill((t < starts[:, None]) | (attention == 0), -100)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(attention.sum())


def mtp_step(student, teacher, optimizer, rows, tokenizer, args, step):
    layout = build_mtp_layout(
        rows.input_ids, rows.response_start, rows.lengths, k_max=args.k_max, regions=None,
        generator=torch.Generator().manual_seed(step), mtp_token_id=mtp_token_id(student),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    loss, _ = mtp_loss(SelectedLogits(student), teacher, layout, mtp_token_id=mtp_token_id(student),
                       eos_token_id=tokenizer.eos_token_id)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return layout.num_tokens


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, tokens). CPU time is robust to other jobs on a shared
    machine; wall time is what a user waits."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def measure_time(args) -> dict:
    student, tokenizer = load_model(args.model, seed=0)
    student.train()
    teacher = frozen_teacher(copy.deepcopy(student))
    ntp_model = copy.deepcopy(student)
    ntp_model.train()
    rows = batch_rows(tokenizer, args)
    mtp_opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ntp_opt = torch.optim.AdamW(ntp_model.parameters(), lr=1e-5)
    ntp_times, mtp_times, ntp_cpu, mtp_cpu, ntp_tokens, mtp_tokens = [], [], [], [], [], []
    for step in range(args.repeats + 1):  # step 0 is warm-up
        t_ntp, c_ntp, n_ntp = timed(lambda: ntp_step(ntp_model, ntp_opt, rows))
        t_mtp, c_mtp, n_mtp = timed(lambda step=step: mtp_step(student, teacher, mtp_opt, rows, tokenizer, args, step))
        print(f"step {step}: ntp {t_ntp:.2f} s wall {c_ntp:.2f} s cpu ({n_ntp} tok), "
              f"mtp {t_mtp:.2f} s wall {c_mtp:.2f} s cpu ({n_mtp} layout tok)", file=sys.stderr)
        if step:
            ntp_times.append(t_ntp), mtp_times.append(t_mtp), ntp_tokens.append(n_ntp), mtp_tokens.append(n_mtp)
            ntp_cpu.append(c_ntp), mtp_cpu.append(c_mtp)
    ntp, mtp = statistics.median(ntp_times), statistics.median(mtp_times)
    return {
        "ntp_step_s": ntp_times, "mtp_step_s": mtp_times, "ntp_median_s": ntp, "mtp_median_s": mtp,
        "mtp_over_ntp": mtp / ntp, "ratios": [m / n for m, n in zip(mtp_times, ntp_times, strict=True)],
        "ntp_cpu_s": ntp_cpu, "mtp_cpu_s": mtp_cpu, "mtp_over_ntp_cpu": sum(mtp_cpu) / sum(ntp_cpu),
        "ntp_tokens": ntp_tokens[0], "mtp_layout_tokens_mean": statistics.mean(mtp_tokens),
        "rows": len(rows), "seq_len": args.seq_len, "k_max": args.k_max,
    }


def peak_rss_mib() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux keeps that across exec, so a child started by a
    big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(args) -> dict:
    """Runs in a fresh process: peak RSS of two MTP steps in one setting."""
    student, tokenizer = load_model(args.model, seed=0)
    rss_loaded = peak_rss_mib()
    if args.memory == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                            trainable_token_indices=[mtp_token_id(student)])
        student = get_peft_model(student, config)
        teacher = adapter_disabled_teacher(student)
    else:
        teacher = frozen_teacher(copy.deepcopy(student))
    student.train()
    rows = batch_rows(tokenizer, args)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    for step in range(args.memory_steps):  # the first step already allocates grads and AdamW state
        mtp_step(student, teacher, optimizer, rows, tokenizer, args, step)
    return {"setting": args.memory, "steps": args.memory_steps, "peak_after_load_mib": rss_loaded,
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(GSM8K))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--template", default="chat", choices=["chat", "plain"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--memory", choices=["lora", "full"], help="internal: measure one memory setting")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--output", default="measure_train.json")
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args)))
        return
    result = {"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    if not args.skip_time:
        result["time"] = measure_time(args)
    if args.skip_memory:
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    result["memory"] = {}
    for setting in ("lora", "full"):
        cmd = [sys.executable, __file__, "--memory", setting, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result["memory"][setting] = json.loads(out.strip().splitlines()[-1])
    memory = result["memory"]
    memory["lora_over_full_peak"] = memory["lora"]["peak_rss_mib"] / memory["full"]["peak_rss_mib"]
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
