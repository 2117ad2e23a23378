import time, torch, statistics
from selfmtp.models.loading import load_model
from selfmtp.decoding.kv_cache import preallocated_cache
from selfmtp.models.exact_kernels import lossy_attention
torch.set_num_threads(1)
m = load_model("smollm2-135m", dtype="bfloat16", exact_kernels="auto")[0]
g = torch.Generator().manual_seed(0)
def one(fed, lossy, mask):
    cache = preallocated_cache(m)
    ids = torch.randint(0, 49000, (1, 200), generator=g)
    m(ids, past_key_values=cache, use_cache=True)
    new = torch.randint(0, 49000, (1, fed), generator=g)
    am = torch.ones(200 + fed, 200 + fed, dtype=torch.bool).tril()[None, None, 200:] if mask else None
    pos = torch.arange(200, 200 + fed)[None]
    ctx = lossy_attention(m) if lossy else torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)
    t = time.thread_time()
    with ctx:
        m(new, past_key_values=cache, use_cache=True, logits_to_keep=fed, attention_mask=am, position_ids=pos)
    return (time.thread_time() - t) * 1000
with torch.inference_mode():
    for fed in (1, 8):
        for lossy in (False, True):
            for mask in (False, True):
                one(fed, lossy, mask)
                print(fed, "lossy" if lossy else "exact", "mask" if mask else "nomask", round(statistics.median(one(fed, lossy, mask) for _ in range(5)), 1), "ms")
