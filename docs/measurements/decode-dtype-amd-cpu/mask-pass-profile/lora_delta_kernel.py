import torch, time, statistics
import torch.nn.functional as F
torch.set_num_threads(1)
def t(f, n=200):
    for _ in range(5): f()
    s=[]
    for _ in range(n):
        a=time.perf_counter(); f(); s.append(time.perf_counter()-a)
    return statistics.median(s)*1e6
for r in (16, 64):
  for out in (576, 1536):
    inn = 1536 if out == 576 else 576
    x = torch.randn(7, inn).bfloat16(); A = (torch.randn(r, inn)*0.05).bfloat16(); B = (torch.randn(out, r)*0.05).bfloat16()
    Af, Bf, xf = A.float(), B.float(), x.float()
    print(r, inn, out,
      "matmul.t %.1f" % t(lambda: (x @ A.t()) @ B.t() * 2.0),
      "F.linear %.1f" % t(lambda: F.linear(F.linear(x, A), B) * 2.0),
      "fp32 F.linear %.1f" % t(lambda: (F.linear(F.linear(x.float(), Af), Bf) * 2.0).bfloat16()),
      "same? %s" % torch.equal((x @ A.t()) @ B.t(), F.linear(F.linear(x, A), B)))
