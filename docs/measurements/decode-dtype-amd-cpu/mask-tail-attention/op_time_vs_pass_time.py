"""Where a batch-1 mask pass of smollm2-135m-mtp goes: torch ops or the Python around them.

    OMP_NUM_THREADS=1 python op_time_vs_pass_time.py [MODEL]

Prefix 200, then a cached exact pass (bf16 decoding kernels, rowwise attention, masks in one call) of 8 real
tokens or of 1 real + 7 masks. For each pass: thread CPU time of the whole forward, and the sum of every torch
op's self CPU time from torch.profiler in the same pass; the difference is the Python (and dispatch) between ops.
Median of 7 passes each, interleaved.
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.models.exact_kernels import lossy_tail
from selfmtp.models.loading import load_model

torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
spec = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-mtp"
model, tokenizer = load_model(spec, dtype="bfloat16", exact_kernels="auto")[:2]
mtp = tokenizer.convert_tokens_to_ids("<mtp>")
attention = torch.ones(208, 208, dtype=torch.bool).tril()[None, None, 200:]


def one_pass(masks: int, profiled: bool):
    cache = preallocated_cache(model)
    model(torch.randint(0, 49000, (1, 200), generator=generator), past_key_values=cache, use_cache=True)
    new = torch.randint(0, 49000, (1, 8), generator=generator)
    new[0, 8 - masks :] = mtp
    with lossy_tail(model, masks), profile(activities=[ProfilerActivity.CPU]) if profiled else torch.no_grad() as p:
        start = time.thread_time()
        model(new, past_key_values=cache, use_cache=True, logits_to_keep=8, attention_mask=attention,
              position_ids=torch.arange(200, 208)[None])
        elapsed = (time.thread_time() - start) * 1000
    ops = sum(e.self_cpu_time_total for e in p.key_averages()) / 1000 if profiled else None
    return elapsed, ops


with torch.inference_mode():
    for masks in (0, 7, 0, 7):
        one_pass(masks, False)  # warm-up
    results = {}
    for _ in range(7):
        for masks in (0, 7):
            plain, _ = one_pass(masks, False)
            _, ops = one_pass(masks, True)
            results.setdefault(masks, []).append((plain, ops))
    for masks, values in results.items():
        plain = statistics.median(v[0] for v in values)
        ops = statistics.median(v[1] for v in values)
        label = "1 real + 7 masks" if masks else "8 real"
        print(f"{spec} {label:16s} pass {plain:6.1f} ms, torch ops {ops:6.1f} ms, between ops {plain - ops:6.1f} ms")
