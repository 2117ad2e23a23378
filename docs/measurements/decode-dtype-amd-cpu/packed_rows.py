"""Kernel level: 1-row input through packed bf16 (mkldnn _linear_pointwise) vs stock F.linear, per SmolLM2-135M shape:
does row r of an M-row call equal the 1-row call (2,048 random rows), do packed and stock agree, and timings (head).
Run: OMP_NUM_THREADS=1 python packed_rows.py (2026-12-07 ~15:22 UTC); output in packed_rows.txt."""
import time, torch, statistics
torch.set_num_threads(1); torch.manual_seed(0)
F=torch.nn.functional
def t(f, n=15):
    f(); s=[]
    for _ in range(n):
        a=time.perf_counter(); f(); s.append(time.perf_counter()-a)
    return statistics.median(s)*1000
for (i,o) in [(576,49152),(1536,576),(576,1536),(576,576),(576,192)]:
    W=(torch.randn(o,i)*0.05).bfloat16(); P=torch.ops.mkldnn._reorder_linear_weight(W, None)
    lin=lambda x: torch.ops.mkldnn._linear_pointwise(x, P, None, "none", [], "")
    X=torch.randn(2048,i).bfloat16()
    ref=torch.cat([lin(X[r:r+1]) for r in range(2048)])
    row=[]
    for M in (1,2,3,4,8,16,32):
        out=torch.cat([lin(X[s:s+M]) for s in range(0,2048,M)])
        row.append(f"M{M}:{(out!=ref).sum().item()}")
    stock_ref=F.linear(X[:64],W); 
    tim=" ".join(f"M{M}={t(lambda: lin(X[:M])):.3f}" for M in (1,2,4,8,16)) if o>10000 else ""
    tims=" ".join(f"M{M}={t(lambda: F.linear(X[:M],W)):.3f}" for M in (1,2,8,16)) if o>10000 else ""
    print(f"{i}->{o} diff-vs-1row {' '.join(row)} | packed vs stock differ {(lin(X[:64])!=stock_ref).sum().item()} | packed {tim} | stock {tims}")
