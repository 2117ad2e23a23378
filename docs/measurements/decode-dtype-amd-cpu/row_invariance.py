"""Row invariance of bf16 linears on this CPU: rows computed in calls of M rows vs alone (1 thread)."""
import torch, time
torch.set_num_threads(1)
torch.manual_seed(0)
for K, N in [(1536, 576), (576, 1536), (576, 576), (576, 49152)]:
    w = (torch.randn(N, K) * K ** -0.5).bfloat16()
    x = torch.randn(2048, K).bfloat16()
    x2 = (torch.randn(2048, K) ** 3).bfloat16()  # heavy tails
    for name, xx in (("gauss", x), ("cube", x2)):
        rows = 256 if N > 10000 else 2048
        xx = xx[:rows]
        ref = {M: torch.cat([torch.nn.functional.linear(p, w) for p in xx.split(M)]) for M in (1, 2, 4, 8, 16, 32)}
        print(K, N, name, {M: int((ref[M] != ref[1]).sum()) for M in ref}, "vs16:", {M: int((ref[M] != ref[16]).sum()) for M in ref}, "elements", ref[1].numel(), flush=True)
