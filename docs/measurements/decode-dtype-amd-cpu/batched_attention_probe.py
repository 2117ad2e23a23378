"""Could the exact attention compute a row's draft queries in ONE call instead of one call per query? (#25)

The batch-invariant attention (models/exact_kernels.py) makes one SDPA call per query: a verify pass of 9
queries costs 9 calls a layer. One call per row would do, if each query's output in it equalled, bit for bit,
that query alone over its visible keys (what an NTP pass computes). Measured here, float32 (the attention dtype
of bf16 models), GQA 9/3 heads, head dim 64, prefixes S0 of 1-1500 keys, Q = 2-72 draft queries, each query i
seeing keys[:S0 + i + 1]:
1. SDPA, one masked call against per-query calls (and against a 1-query call with its masked row over all keys);
2. attention spelled out in matmuls, stage by stage: which stage depends on the other queries in the call.
Run: OMP_NUM_THREADS=1 python batched_attention_probe.py > batched_attention_probe.txt
"""

import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
H, HKV, D = 9, 3, 64
G = H // HKV


def sdpa_probe():
    counts = {"per-query calls": 0, "1-query call, its masked row over all keys": 0}
    total = 0
    for S0 in (1, 5, 37, 200, 511, 512, 513, 700, 1500):
        for Q in (2, 3, 4, 8, 9, 16, 17, 33, 72):
            S = S0 + Q
            q = torch.randn(1, H, Q, D, generator=g)
            k, v = torch.randn(1, HKV, S, D, generator=g), torch.randn(1, HKV, S, D, generator=g)
            vis = torch.ones(Q, S, dtype=torch.bool).tril(S0)
            together = F.scaled_dot_product_attention(q, k, v, attn_mask=vis[None, None], enable_gqa=True)
            for i in range(Q):
                n = S0 + i + 1
                qi = q[:, :, i : i + 1]
                alone = F.scaled_dot_product_attention(qi, k[:, :, :n], v[:, :, :n], enable_gqa=True)
                row = F.scaled_dot_product_attention(qi, k, v, attn_mask=vis[None, None, i : i + 1], enable_gqa=True)
                total += 1
                counts["per-query calls"] += not torch.equal(alone[:, :, 0], together[:, :, i])
                counts["1-query call, its masked row over all keys"] += not torch.equal(row[:, :, 0], together[:, :, i])
    print(f"1. SDPA: queries whose output in one masked call differs from ({total} queries):")
    for name, bad in counts.items():
        print(f"   {name}: {bad} differ")


def stage_probe():
    res = {"scores q @ k^T (M = 3Q rows vs 3, N = S vs n keys)": 0,
           "softmax over n keys vs n keys + -inf tail": 0,
           "P @ V, K = n vs K = S with a zero tail (same M)": 0,
           "P @ V, one query's rows vs all 3Q rows (same K)": 0}  # fmt: skip
    total = 0
    for S0 in (5, 37, 200, 700):
        for Q in (2, 4, 9, 16):
            S = S0 + Q
            q = torch.randn(HKV, G * Q, D, generator=g)
            k, v = torch.randn(HKV, S, D, generator=g), torch.randn(HKV, S, D, generator=g)
            scores = torch.matmul(q, k.transpose(1, 2))
            for i in range(Q):
                n = S0 + i + 1
                rows = torch.arange(G) * Q + i
                total += 1
                alone = torch.matmul(q[:, rows], k[:, :n].transpose(1, 2))
                res["scores q @ k^T (M = 3Q rows vs 3, N = S vs n keys)"] += not torch.equal(alone, scores[:, rows, :n])
                x = torch.randn(HKV, G, n, generator=g)
                padded = torch.cat([x, torch.full((HKV, G, S - n), float("-inf"))], -1)
                res["softmax over n keys vs n keys + -inf tail"] += not torch.equal(torch.softmax(x, -1), torch.softmax(padded, -1)[..., :n])
                p = torch.softmax(x, -1)
                p_tail = torch.cat([p, torch.zeros(HKV, G, S - n)], -1)
                res["P @ V, K = n vs K = S with a zero tail (same M)"] += not torch.equal(torch.matmul(p, v[:, :n]), torch.matmul(p_tail, v))
                P = torch.softmax(torch.randn(HKV, G * Q, S, generator=g), -1)
                res["P @ V, one query's rows vs all 3Q rows (same K)"] += not torch.equal(torch.matmul(P, v)[:, rows], torch.matmul(P[:, rows], v))
    print(f"2. attention in matmuls, per stage ({total} queries): outputs that differ")
    for name, bad in res.items():
        print(f"   {name}: {bad}")


def timings():
    def median_us(f, n=50):
        f()
        s = []
        for _ in range(n):
            a = time.perf_counter()
            f()
            s.append(time.perf_counter() - a)
        return statistics.median(s) * 1e6

    print("3. cost, 200 cached keys, 1 thread (median of 50): one masked SDPA call vs one call per query")
    S0 = 200
    for Q in (1, 2, 4, 9, 16):
        S = S0 + Q
        q, k, v = torch.randn(1, H, Q, D), torch.randn(1, HKV, S, D), torch.randn(1, HKV, S, D)
        vis = torch.ones(Q, S, dtype=torch.bool).tril(S0)[None, None]
        one = median_us(lambda q=q, k=k, v=v, vis=vis: F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=True))
        many = median_us(lambda q=q, k=k, v=v, Q=Q: [F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, : S0 + i + 1],
                                                                v[:, :, : S0 + i + 1], enable_gqa=True) for i in range(Q)])  # fmt: skip
        print(f"   Q={Q}: one masked call {one:.1f} us, per-query calls {many:.1f} us")


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    sdpa_probe()
    stage_probe()
    timings()
