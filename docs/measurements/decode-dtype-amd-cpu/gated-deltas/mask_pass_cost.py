"""Cost of a cached pass of smollm2-135m-mtp with `<mtp>` masks, the gated deltas per layer (before) or grouped.

    OMP_NUM_THREADS=1 python mask_pass_cost.py MODEL [MODEL ...]

Prefix 200 tokens, then one pass of: 1 real token; 8 real tokens; 1 real token + 7 masks (what verify:8 and
ConfAdapt feed at batch 1). bf16, the decoding kernels (exact_kernels="auto"), lossy attention (one SDPA call a
layer, as a ConfAdapt pass runs). Variants, interleaved pass by pass: "per-layer" = every gated linear its own
delta and an index_add of it (the code before models/gated_fused.py), "grouped" = the default now. Thread CPU time,
median of 15.
"""
import statistics
import sys
import time

import torch

import selfmtp.models.gated as gated_module
from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.models.exact_kernels import lossy_attention
from selfmtp.models.loading import load_model

torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)


def one_pass(model, mtp, fed, masks):
    cache = preallocated_cache(model)
    model(torch.randint(0, 49000, (1, 200), generator=generator), past_key_values=cache, use_cache=True)
    new = torch.randint(0, 49000, (1, fed), generator=generator)
    if masks:
        new[0, 1:] = mtp
    attention = torch.ones(200 + fed, 200 + fed, dtype=torch.bool).tril()[None, None, 200:]
    start = time.thread_time()
    with lossy_attention(model):
        model(new, past_key_values=cache, use_cache=True, logits_to_keep=fed, attention_mask=attention,
              position_ids=torch.arange(200, 200 + fed)[None])
    return (time.thread_time() - start) * 1000


def set_variant(model, variant, groups):
    for group in groups:
        for member in group.members:
            member.group = group if variant == "grouped" else None
    gated_module._consecutive = consecutive if variant == "grouped" else (lambda rows: None)


consecutive = gated_module._consecutive
with torch.inference_mode():
    for spec in sys.argv[1:]:
        model, tokenizer = load_model(spec, dtype="bfloat16", exact_kernels="auto")[:2]
        mtp, groups = tokenizer.convert_tokens_to_ids("<mtp>"), model.gated.gate.groups
        times = {}
        for _ in range(16):
            for variant in ("per-layer", "grouped"):
                set_variant(model, variant, groups)
                for fed, masks in ((1, False), (8, False), (8, True)):
                    times.setdefault((variant, fed, masks), []).append(one_pass(model, mtp, fed, masks))
        for (variant, fed, masks), values in times.items():
            label = "1 real + 7 masks" if masks else f"{fed} real"
            print(f"{spec} rank {model.gated.rank} {variant:9s} {label:16s} {statistics.median(values[1:]):6.1f} ms")
