"""Step cost of gated MTP training (`train --gated`) against plain LoRA, on the same batches.

    PYTHONPATH=src python scripts/measure_gated.py --model tiny-gsm-teacher --data runs/demo/data/*.jsonl \
        --template plain --batch-size 16 --k-max 8 --output runs/measure_gated.json

Settings, each a full optimizer step (forward, backward, AdamW) with offline targets:
- `lora`            peft LoRA on every linear + the `<mtp>` row, targets relabelled beforehand (not timed),
- `gated-lora`      gated LoRA of the same rank, targets read from the same forward (models/gated.py),
- `gated-full`      gated full deltas,
- `*-dense`         the same with --dense-factor times the default regions per row (more masks per row),
- `gated-*-head`    the same with the final norm and the output head gated too (`train --gated-head`).
Steps go round-robin over the settings after one warm-up each, so background load hits all alike; the
median wall and process-CPU time per step are reported (CPU time is robust to other jobs on a shared
machine), with supervised positions (and mask positions, j >= 2) per CPU second, and each setting's step
over the plain LoRA step of the same round (`median_paired_over_lora_cpu`: the figure to read under load).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from selfmtp.models.gated import apply_gate
from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.training.data import read_examples, tokenize_examples
from selfmtp.training.layout import build_mtp_layout, default_regions
from selfmtp.training.objective import SelectedLogits, frozen_teacher, mtp_loss, teacher_next_tokens


def make_student(base, setting: str, rank: int):
    model = copy.deepcopy(base)
    model.train()
    if setting.startswith("gated"):
        return apply_gate(model, mtp_token_id=mtp_token_id(model), rank=0 if "full" in setting else rank,
                          head="-head" in setting)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                      trainable_token_indices=[mtp_token_id(model)])
    return get_peft_model(model, lora)


def step(student, optimizer, rows, targets, tokenizer, args, seed: int, dense: bool, gated: bool):
    regions = default_regions(args.seq_len, args.k_max) * (args.dense_factor if dense else 1)
    layout = build_mtp_layout(
        rows.input_ids, rows.response_start, rows.lengths, k_max=args.k_max, regions=regions,
        generator=torch.Generator().manual_seed(seed), mtp_token_id=mtp_token_id(student),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
        targets=None if gated else targets,
    )
    start, cpu = time.perf_counter(), time.process_time()
    loss, stats = mtp_loss(SelectedLogits(student), None, layout, supervision="offline",
                           mtp_token_id=mtp_token_id(student), eos_token_id=tokenizer.eos_token_id,
                           targets_from_forward=gated)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start, time.process_time() - cpu, stats.count, int((layout.sup_j >= 2).sum()),
            layout.num_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gsm-teacher")
    parser.add_argument("--data", required=True)
    parser.add_argument("--template", default="plain", choices=["chat", "plain"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dense-factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="lora,gated-lora,gated-full,lora-dense,gated-lora-dense")
    parser.add_argument("--output", default="measure_gated.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model, seed=0)
    examples, _ = read_examples(args.data, limit=args.batch_size * (args.repeats + 1))
    rows = tokenize_examples(examples, tokenizer, template=args.template, seq_len=args.seq_len)
    targets = teacher_next_tokens(frozen_teacher(copy.deepcopy(base)), rows.input_ids, rows.lengths,
                                  mtp_token_id=mtp_token_id(base))
    settings = args.settings.split(",")
    students = {name: make_student(base, name.removesuffix("-dense"), args.lora_rank) for name in settings}
    optimizers = {name: torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-4)
                  for name, s in students.items()}
    samples = {name: [] for name in settings}
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up
        index = slice((repeat % max(1, len(rows) // args.batch_size)) * args.batch_size, None)
        batch, batch_targets = rows.take(index).take(slice(0, args.batch_size)), targets[index][: args.batch_size]
        for name in settings:
            seconds, cpu, supervised, masks, tokens = step(students[name], optimizers[name], batch, batch_targets, tokenizer,
                                                      args, seed=repeat, dense=name.endswith("-dense"),
                                                      gated=name.startswith("gated"))
            print(f"{repeat} {name}: {seconds:.3f} s wall, {cpu:.3f} s cpu, {supervised} supervised ({masks} masks), {tokens} tokens",
                  file=sys.stderr)
            if repeat:
                samples[name].append((seconds, supervised, masks, tokens, cpu))
    result = {"model": args.model, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "seq_len": args.seq_len, "k_max": args.k_max, "lora_rank": args.lora_rank,
              "dense_factor": args.dense_factor, "repeats": args.repeats, "settings": {}}
    for name, rows_ in samples.items():
        seconds, cpu = [r[0] for r in rows_], [r[4] for r in rows_]
        total_s = sum(cpu)  # rates per CPU second: robust to other jobs on a shared machine
        result["settings"][name] = {
            "median_step_s": statistics.median(seconds), "step_s": seconds,
            "median_step_cpu_s": statistics.median(cpu), "step_cpu_s": cpu,
            "supervised_per_s": sum(r[1] for r in rows_) / total_s, "masks_per_s": sum(r[2] for r in rows_) / total_s,
            "layout_tokens_mean": statistics.mean(r[3] for r in rows_),
            "masks_per_step_mean": statistics.mean(r[2] for r in rows_),
        }
    if "lora" in samples:
        lora = result["settings"]["lora"]
        for row in result["settings"].values():
            row["step_over_lora"] = row["median_step_s"] / lora["median_step_s"]
            row["step_over_lora_cpu"] = row["median_step_cpu_s"] / lora["median_step_cpu_s"]
            # paired: each repeat's step against the LoRA step of the same round (same batch, same load)
            row["paired_over_lora_cpu"] = [a / b for a, b in zip(row["step_cpu_s"], lora["step_cpu_s"], strict=True)]
            row["median_paired_over_lora_cpu"] = statistics.median(row["paired_over_lora_cpu"])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items() if not isinstance(vv, list)}
                      for k, v in result["settings"].items()}, indent=2))


if __name__ == "__main__":
    main()
