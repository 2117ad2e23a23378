"""CPU time the load-aware rule's bookkeeping adds per pass, with the probed curve and with the learned one.

No model: a loop of what the decoder calls per pass, `LoadAware.caps` for `rows` exact rows, `record`
per row and (learned curve) `observe` with noisy seconds, so the curve is rebuilt every REFRESH_EVERY
passes and the rule re-prices after each rebuild. Thread CPU time, so a loaded machine gives the same.

    python scripts/measure_rule_overhead.py     # (a few seconds)
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

from selfmtp.decoding.load_aware import LoadAware
from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost

# smollm2-135m-mtp --prepack, probed under load (docs/measurements/serve-trace-cpu/session10-fixed-vs-learned-c1)
PROBE = PassCost([(1, 0.0683), (2, 0.0889), (4, 0.1001), (8, 0.1232), (16, 0.1565), (32, 0.2274), (64, 0.3566)])


def ms_per_pass(rows: int, learned: bool, passes: int) -> float:
    load_aware = LoadAware(LearnedPassCost(PROBE) if learned else PROBE)
    batch = [SimpleNamespace(load_aware=True, kind="exact", state=SimpleNamespace(k=1, pending=[1]),
                             strategy=SimpleNamespace(k_max=8)) for _ in range(rows)]  # fmt: skip
    draw, start = random.Random(0), time.thread_time()
    for _ in range(passes):
        k = load_aware.caps(batch)["exact"]
        for _ in batch:
            load_aware.record("exact", k, 1)
        if learned:
            load_aware.observe(rows * k, PROBE(rows * k) * draw.uniform(0.95, 1.1))
    return 1000 * (time.thread_time() - start) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3000)
    args = parser.parse_args()
    for rows in (1, 8):
        fixed, learned = ms_per_pass(rows, False, args.passes), ms_per_pass(rows, True, args.passes)
        print(f"{rows} rows: {fixed:.4f} ms CPU per pass with the probed curve, {learned:.4f} with the learned one")


if __name__ == "__main__":
    main()
