"""What `auto:verify` feeds and keeps at batch 1 under a given pass-cost curve: counts, no timing.

The rule's choices depend on the probed cost curve, which a loaded machine measures badly; this
script fixes the curve (a quiet-window probe, `--curve`) and counts tokens per pass and tokens fed
per pass of `verify:K[:lookup]` and `auto:verify:K[:lookup]` on the same prompts, plus the wall-clock
speed-up over NTP that the curve predicts: tokens / sum over passes of cost(tokens fed), over 1 / cost(1).

    python scripts/count_auto_verify.py --model smollm2-135m-mtp \\
      --prompts src/selfmtp/assets/gsm8k-dev-sample.jsonl --curve docs/measurements/serve-loadaware-cpu/bench_serve.json
"""

from __future__ import annotations

import argparse
import json

import torch

from selfmtp.api import MTPModel, read_prompts
from selfmtp.decoding.load_aware import LoadAware, PassCost
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.strategies import Verify


def probed_curve(bench_serve_json: str, model: str) -> PassCost:
    """The start-up probe a bench_serve run logged for `model` ("pass cost by tokens fed: 1: 53.2 ms, ...")."""
    runs = json.load(open(bench_serve_json))
    run = next(r for r in runs.get("models", [runs]) if r["model"] == model)
    return PassCost.parse(run["pass_cost_log"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--curve", required=True, help="a bench_serve.json whose probe of --model to use")
    parser.add_argument("--curve-model", help="the model's name in --curve (default: --model)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed)
    cost = probed_curve(args.curve, args.curve_model or args.model)
    prompts = [mtp.encode(p) for p in read_prompts(args.prompts)[: args.limit]]
    for strategy in (Verify(args.k), Verify(args.k, lookup=True)):
        for aware in (False, True):
            load = LoadAware(cost) if aware else None
            tokens = passes = fed = 0
            seconds = 0.0  # by the curve, decode passes only (the prompt's pass is the same for all)
            for ids in prompts:
                result = generate_batch(mtp.model, [ids], strategy, max_new_tokens=args.max_new_tokens,
                                        stop_token_ids=mtp.stop_token_ids, load_aware=load)[0]  # fmt: skip
                tokens += result.num_tokens - len(result.chunks[0].token_ids)
                passes += result.forward_passes - 1
                fed += sum(result.tokens_fed[1:])
                seconds += sum(cost(n) for n in result.tokens_fed[1:])
            print(json.dumps({
                "strategy": ("auto:" if aware else "") + strategy.name, "tokens_per_pass": round(tokens / passes, 3),
                "fed_per_pass": round(fed / passes, 2), "modelled_vs_ntp": round(tokens * cost(1) / seconds, 3),
                "caps_chosen": load.chosen["exact"] if load else None,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
