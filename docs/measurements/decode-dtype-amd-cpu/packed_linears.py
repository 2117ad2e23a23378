"""Kernel level, 1 thread: 1-row bf16 linears of SmolLM2-135M's shapes, 30 layers' worth (cold in cache), stock F.linear vs
oneDNN-packed vs float32; plus a reduction compiled by torch.compile for comparison. Run as it was:
OMP_NUM_THREADS=1 python packed_linears.py (2026-12-07 ~15:20 UTC, #26's training on the other core); output in packed_linears.txt."""
import time, torch, statistics, sys
torch.set_num_threads(1)
torch.manual_seed(0)
shapes=[(576,576),(576,192),(576,192),(576,576),(576,1536),(576,1536),(1536,576)]
layers=[[(torch.randn(o,i)*0.05).bfloat16() for (i,o) in shapes] for _ in range(30)]
xs={i: torch.randn(1,i).bfloat16() for i in (576,1536)}
def run(fn):
    for L in layers:
        for W in L: fn(xs[W.shape[1]], W)
def t(f, n=7):
    f(); s=[]
    for _ in range(n):
        a=time.perf_counter(); f(); s.append(time.perf_counter()-a)
    return statistics.median(s)*1000
F=torch.nn.functional
print("bytes MB", sum(W.numel()*2 for L in layers for W in L)/1e6)
print("A F.linear bf16 %.2f ms" % t(lambda: run(lambda x,W: F.linear(x,W))))
packed={id(W): torch.ops.mkldnn._reorder_linear_weight(W, None) for L in layers for W in L}
print("B mkldnn packed bf16 %.2f ms" % t(lambda: run(lambda x,W: torch.ops.mkldnn._linear_pointwise(x, packed[id(W)], None, "none", [], ""))))
packed1={id(W): torch.ops.mkldnn._reorder_linear_weight(W, 1) for L in layers for W in L}
print("B1 mkldnn packed(bs=1) bf16 %.2f ms" % t(lambda: run(lambda x,W: torch.ops.mkldnn._linear_pointwise(x, packed1[id(W)], None, "none", [], ""))))
lf=[[W.float() for W in L] for L in layers]
def runf(fn):
    for L in lf:
        for W in L: fn(xs[W.shape[1]].float(), W)
print("f32 F.linear %.2f ms" % t(lambda: runf(lambda x,W: F.linear(x,W))))
def gemv(x, W):
    return (W.float() * x.float()).sum(-1).to(torch.bfloat16)
cg=torch.compile(gemv, dynamic=False)
a=time.perf_counter(); run(cg); print("compile s", time.perf_counter()-a)
print("D compiled reduction %.2f ms" % t(lambda: run(cg)))
x=xs[576]; W=layers[0][4]
print("max diff D vs A", (cg(x,W).float()-F.linear(x,W).float()).abs().max().item())
