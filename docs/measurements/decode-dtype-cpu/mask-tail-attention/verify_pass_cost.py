"""Cost of an exact (verify) pass of smollm2-135m-mtp with `<mtp>` masks at the tail: every query in its own
attention call (before), or the masks in one call a layer (`exact_kernels.lossy_tail`, now).

    OMP_NUM_THREADS=1 python verify_pass_cost.py [MODEL]

Prefix 200 tokens, then one pass of: 1 real token (NTP); 1 real + 7 masks (verify:8 with nothing to check);
3 real + 7 masks (verify:8 checking 2 drafts); the same at batch 16 (16 rows of 200 + 1 real + 7 masks, as
`selfmtp eval --batch-size 16` runs verify:8). bf16, the decoding kernels (exact_kernels="auto", rowwise
attention as BatchDecoder runs an exact pass). Variants interleaved pass by pass; thread CPU time, median of 15.
Also checks that the real tokens' logits are bit for bit the same either way.
"""
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.models.exact_kernels import lossy_tail
from selfmtp.models.loading import load_model

torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
spec = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-mtp"


def one_pass(model, prefix, new, masks, tail):
    cache = preallocated_cache(model)
    model(prefix, past_key_values=cache, use_cache=True)
    fed = new.shape[1]
    attention = torch.ones(200 + fed, 200 + fed, dtype=torch.bool).tril()[None, None, 200:].expand(new.shape[0], -1, -1, -1)
    start = time.thread_time()
    with lossy_tail(model, masks) if tail and masks else nullcontext():
        logits = model(new, past_key_values=cache, use_cache=True, logits_to_keep=fed, attention_mask=attention,
                       position_ids=torch.arange(200, 200 + fed)[None].expand(new.shape[0], -1)).logits
    return (time.thread_time() - start) * 1000, logits[:, : fed - masks]


with torch.inference_mode():
    model, tokenizer = load_model(spec, dtype="bfloat16", exact_kernels="auto")[:2]
    mtp = tokenizer.convert_tokens_to_ids("<mtp>")
    times, same = {}, True
    for run in range(16):
        for batch, real, masks in ((1, 1, 0), (1, 1, 7), (1, 3, 7), (16, 1, 0), (16, 1, 7)):
            if batch > 1 and run >= 6:  # batch 16 is dear: median of 5
                continue
            prefix = torch.randint(0, 49000, (batch, 200), generator=generator)
            new = torch.randint(0, 49000, (batch, real + masks), generator=generator)
            new[:, real:] = mtp
            outs = {}
            for tail in (False, True):
                ms, outs[tail] = one_pass(model, prefix, new, masks, tail)
                times.setdefault((batch, real, masks, tail), []).append(ms)
            same &= torch.equal(outs[False], outs[True])
    for (batch, real, masks, tail), values in times.items():
        label = f"{real} real + {masks} masks" if masks else f"{real} real"
        label = f"batch {batch}: {label}"
        variant = "masks in one call" if tail else "per query"
        print(f"{spec} {label:28s} {variant:18s} {statistics.median(values[1:]):6.1f} ms")
    print("real tokens' logits bit for bit the same both ways:", same)
