"""Kernel-level: the grouped deltas' block-diagonal B against separate B matmuls (r64, 7 rows, bf16, packed; thread CPU time, median of 400, us)."""
import time, statistics, torch
torch.set_num_threads(1)
def packed(w):
    p = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
def t(fn, n=400):
    v=[]
    for _ in range(n):
        s=time.thread_time_ns(); fn(); v.append(time.thread_time_ns()-s)
    return statistics.median(v)/1000
with torch.inference_mode():
    for name, outs in (("qkv", [576,192,192]), ("gate/up", [1536,1536])):
        r=64; n=len(outs)
        Bs=[torch.randn(o, r).bfloat16() for o in outs]
        bd=packed(torch.block_diag(*Bs)); sep=[packed(b) for b in Bs]
        h=torch.randn(7, r*n).bfloat16()
        f_bd=lambda: bd(h)
        f_sep=lambda: [s(h[:, i*r:(i+1)*r]) for i, s in enumerate(sep)]
        print(name, "block-diag", t(f_bd), "separate", t(f_sep))
