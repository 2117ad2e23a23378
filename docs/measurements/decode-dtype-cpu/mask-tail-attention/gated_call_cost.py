"""One gated linear call of smollm2-135m-mtp (layer 3, bf16, 8 rows of which 7 masks) against its base and its grouped delta alone (thread CPU time, median of 300, us; hot caches)."""
import time, statistics, torch
from selfmtp.models.loading import load_model
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m-mtp", dtype="bfloat16", exact_kernels="auto")[:2]
gate = model.gated.gate
mtp = tok.convert_tokens_to_ids("<mtp>")
layer = model.model.layers[3]
x = torch.randn(1, 8, 576).bfloat16()
ids = torch.randint(0, 49000, (1, 8)); ids[0, 1:] = mtp
def t(fn, n=300):
    vals=[]
    for _ in range(n):
        s=time.thread_time_ns(); fn(); vals.append(time.thread_time_ns()-s)
    return statistics.median(vals)/1000
with torch.inference_mode():
    gate.set(ids)
    q = layer.self_attn.q_proj
    print(type(q).__name__, type(q.base).__name__)
    def gated_q():
        gate.clear(); gate.set(ids); q(x)
    def setclear():
        gate.clear(); gate.set(ids)
    def base_q(): q.base(x)
    def delta_q():
        q.group.reset(); q.group.delta(q, x, gate.span)
    m = layer.mlp.down_proj
    xd = torch.randn(1, 8, 1536).bfloat16()
    def gated_down():
        gate.clear(); gate.set(ids); m(xd)
    def base_down(): m.base(xd)
    for name, fn in [("set+clear", setclear), ("gated q", gated_q), ("base q", base_q), ("group delta q (qkv)", delta_q), ("gated down", gated_down), ("base down", base_down)]:
        print(f"{name:22s} {t(fn):7.1f} us")
