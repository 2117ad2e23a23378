import cProfile, pstats, time, torch, sys
from selfmtp.api import MTPModel
torch.set_num_threads(1)
mtp = MTPModel.from_pretrained("smollm2-135m-mtp", dtype="bfloat16")
p = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"]
strategy = sys.argv[1]
with torch.inference_mode():
    mtp.generate(p, strategy=strategy, max_new_tokens=16, chat=True)
    pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
    r = mtp.generate(p, strategy=strategy, max_new_tokens=64, chat=True)
    pr.disable(); el = time.perf_counter() - t
print(strategy, "s", round(el, 2), "passes", r[0].forward_passes, "ms/pass", round(1000 * el / r[0].forward_passes, 1))
pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
