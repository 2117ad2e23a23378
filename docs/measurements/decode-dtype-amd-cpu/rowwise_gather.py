# Rowwise attention with pads and holes, 8 rows: one gather per query (the old code) against one per row (now).
# Usage: git show 82e3e1a:src/selfmtp/models/exact_kernels.py > /tmp/ek_old.py
#        OMP_NUM_THREADS=1 python docs/measurements/decode-dtype-amd-cpu/rowwise_gather.py Q /tmp/ek_old.py   (Q queries a row)
# thread CPU time per call (one layer), min of 4 rounds of 30 calls; "equal": the two outputs bit for bit.
import sys, time, importlib.util, torch
sys.path.insert(0, "src")
torch.set_num_threads(1)
def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
old, new = load(sys.argv[2], "ek_old"), load("src/selfmtp/models/exact_kernels.py", "ek_new")
g = torch.Generator().manual_seed(0)
B, S, Q = 8, 300, int(sys.argv[1]) if len(sys.argv) > 1 else 1
q = torch.randn(B, 9, Q, 64, generator=g).bfloat16(); k = torch.randn(B, 3, S, 64, generator=g).bfloat16(); v = torch.randn(B, 3, S, 64, generator=g).bfloat16()
mask = torch.ones(B, 1, Q, S, dtype=torch.bool).tril(S - Q)
for b in range(B): mask[b, :, :, : 5 * b] = False  # left pads of different widths
mask[1, :, :, 100] = False; mask[3, :, :, 50:53] = False  # holes (rejected drafts)
class M: is_causal = True
def run(mod, n=30):
    for _ in range(3): mod.rowwise_attention(M(), q, k, v, mask, scaling=0.125)
    t = time.thread_time()
    for _ in range(n):  # 30 layers' calls on the same mask, as one pass makes them
        out = mod.rowwise_attention(M(), q, k, v, mask, scaling=0.125)[0]
    return (time.thread_time() - t) / n * 1e3, out
res = {}
for name, mod in [("old", old), ("new", new)] * 4:
    ms, out = run(mod); res.setdefault(name, []).append(ms); res[name + "_out"] = out
print(res["old"], res["new"]); print(f"B={B} Q={Q} S={S}: old {min(res['old']):.3f} ms/layer, new {min(res['new']):.3f} ms/layer, equal: {torch.equal(res['old_out'], res['new_out'])}")
