"""Where a load-aware mode's time goes against NTP's: a per-pass trace of the serving decode loop.

In-process, no HTTP: for each concurrency level, keeps that many requests in flight through one
`BatchDecoder` set up as the server's engine (a finished row is replaced at the next pass, as
bench_serve's client threads do), each mode in turn, the order rotating per round. The decoder and
its `LoadAware` (one start-up probe, as `selfmtp serve` does) live for the whole run, so the rule's
stats carry over from level to level as they do in a server. Every pass is timed; per mode and level:

- passes: decode passes (no row prefilling) and prefill passes (a row joined);
- extra: the share of decode passes in which some row fed more than its own tokens (masks or
  drafts), and the tokens per row-pass those passes gave;
- NTP-sized: the median seconds of decode passes in which every row fed exactly one token, against
  the NTP mode's at the same batch width (the bookkeeping overhead of the rule, its cost table and
  its stats), and the rule's own seconds per pass (`LoadAware.caps` + `record`);
- explore: the rule's exploration passes and their seconds beyond the exploit choice, by the curve,
  as a share of all its passes' seconds by the curve;
- extra cost: over the mode's passes that fed extra tokens, measured seconds minus the NTP mode's
  median for a pass of the same width, as a share of the mode's decode seconds;
- throughput: tokens / seconds of all passes, per round over NTP's in the same round (median, min-max).

The rule prices passes by the curve `selfmtp serve` uses: the probe's, corrected by the passes the
decoder times (`pass_cost.LearnedPassCost`); the report ends with the probe's and the learned price
per size and the passes timed at each. `--fixed-curve` keeps the probe's curve all run (the rule
before the curve was learned), for a before/after comparison.

    python scripts/trace_serve.py --model smollm2-135m --prompts docs/measurements/serve-smollm2-cpu/prompts.txt \\
      --prepack --output docs/measurements/serve-trace-cpu/smollm2-135m

(about 3 minutes on a quiet machine at 1 thread with the defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from selfmtp.api import MTPModel, read_prompts
from selfmtp.decoding.batch import BatchDecoder
from selfmtp.decoding.load_aware import LoadAware
from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost, pass_clock
from selfmtp.decoding.strategies import resolve_strategy
from selfmtp.files import write_json_atomic, write_text_atomic

DEFAULT_MODES = ("ntp", "auto:0.9:8", "auto:verify:8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output", required=True, help="a folder: trace.json and README.md")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="strategies; ntp is the reference")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2, help="per mode, level and round: this many x the level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prepack", action="store_true", help="as `selfmtp serve --prepack`")
    parser.add_argument("--curve", help="the rule's pass costs as `selfmtp serve` logs them ('1: 59.0 ms, 2: 99.4 ms, "
                        "...'), e.g. a quiet machine's, instead of probing here (the passes are still timed)")
    parser.add_argument("--fixed-curve", action="store_true",
                        help="price passes by the probed (or --curve) curve all run, not learn it from the timed passes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    modes, levels = args.modes.split(","), [int(c) for c in args.concurrency.split(",")]
    if "ntp" not in modes:
        parser.error("--modes must include ntp (the reference)")
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained(args.model, seed=args.seed, prepack=args.prepack)
    prompts = [mtp.encode(p, chat=False) for p in read_prompts(args.prompts)]
    started = time.perf_counter()
    probe = PassCost.parse(args.curve) if args.curve else PassCost.measure(mtp.model, max_rows=max(levels))
    probe_seconds = time.perf_counter() - started
    cost = probe if args.fixed_curve else LearnedPassCost(probe, clock=pass_clock(mtp.model.device))
    load_aware = LoadAware(cost, 16)
    pad = mtp.tokenizer.pad_token_id if mtp.tokenizer.pad_token_id is not None else 0
    decoder = BatchDecoder(mtp.model, tokenizer=mtp.tokenizer, pad_token_id=pad, compact_cache=True,
                           load_aware=load_aware)  # fmt: skip
    rule_seconds = time_rule(load_aware)
    passes = defaultdict(list)  # (mode, level) -> one dict per pass
    for level in levels:
        for r in range(args.rounds):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                run_cell(decoder, mtp, prompts, mode, level, args.requests * level, args.max_tokens, r,
                         passes[mode, level], rule_seconds)  # fmt: skip
    result = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "prepack": args.prepack,
        "probe_seconds": probe_seconds, "pass_cost": probe.points, "learned": learned_table(cost),
        "cells": [summarise(passes, mode, level) for level in levels for mode in modes],
        "chosen": load_aware.chosen, "explorations": load_aware.explorations,
    }  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "trace.json", {**result, "passes": {f"{m}@{c}": p for (m, c), p in passes.items()}})
    text = report(result)
    write_text_atomic(out / "README.md", text)
    print(text)


def time_rule(load_aware: LoadAware) -> list[float]:
    """Wrap the decoder's rule so that its seconds per pass (caps + record + observe) add up in the list returned."""
    spent = [0.0]
    for name in ("caps", "record", "observe"):
        inner = getattr(load_aware, name)

        def timed(*a, _inner=inner, **kw):
            start = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(load_aware, name, timed)
    return spent


def run_cell(decoder, mtp, prompts, mode, level, requests, max_tokens, round_, log, rule_seconds) -> None:
    """`requests` requests, `level` in flight; one dict per pass appended to `log`."""
    strategy, aware = resolve_strategy(mode)
    rules = decoder.load_aware.rules.values()
    sent = 0

    def admit():
        nonlocal sent
        while sent < requests and len(decoder.active) < level:
            decoder.add(prompts[sent % len(prompts)], strategy, max_new_tokens=max_tokens,
                        stop_token_ids=mtp.stop_token_ids, load_aware=aware)  # fmt: skip
            sent += 1

    admit()
    while decoder.active:
        rows = list(decoder.active)
        own = [len(row.state.pending) if row.state.passes == 0 or row.exact is None else 1 for row in rows]
        prefill = any(row.state.passes == 0 for row in rows)
        explored, curve_s, ruled = [rule.explored for rule in rules], [rule.seconds for rule in rules], rule_seconds[0]
        start = time.perf_counter()
        events = decoder.step()
        seconds = time.perf_counter() - start
        extra = [row.state.tokens_fed[-1] - n for row, n in zip(rows, own, strict=True)]
        log.append({
            "round": round_, "rows": len(rows), "prefill": prefill, "seconds": seconds,
            "rule_seconds": rule_seconds[0] - ruled, "extra_fed": extra, "tokens": [len(e.token_ids) for e in events],
            "explored": sum(r.explored for r in rules) - sum(explored),
            "curve_seconds": sum(r.seconds for r in rules) - sum(curve_s),
        })  # fmt: skip
        admit()


def summarise(passes, mode: str, level: int) -> dict:
    mine, ntp = passes[mode, level], passes["ntp", level]
    decode = [p for p in mine if not p["prefill"]]
    extra = [p for p in decode if any(p["extra_fed"])]
    ntp_sized = [p for p in decode if not any(p["extra_fed"])]
    ntp_by_rows = median_by_rows([p for p in ntp if not p["prefill"]])
    mine_by_rows = median_by_rows(ntp_sized)
    overhead = {rows: s / ntp_by_rows[rows] for rows, s in mine_by_rows.items() if rows in ntp_by_rows}
    extra_cost = sum(p["seconds"] - ntp_by_rows.get(p["rows"], p["seconds"]) for p in extra)
    rounds = sorted({p["round"] for p in mine})
    ratios = [rate(mine, r) / rate(ntp, r) for r in rounds]
    return {
        "mode": mode, "concurrency": level, "passes": len(mine), "decode_passes": len(decode),
        "extra_share": len(extra) / len(decode) if decode else 0.0,
        "extra_tokens_per_row_pass": (sum(sum(p["tokens"]) for p in extra) / sum(p["rows"] for p in extra)
                                      if extra else None),
        "ntp_sized_over_ntp": overhead,
        "rule_ms_per_pass": 1000 * sum(p["rule_seconds"] for p in mine) / len(mine),
        "explored_share_by_curve": (sum(p["explored"] for p in mine) / sum(p["curve_seconds"] for p in mine)
                                    if any(p["curve_seconds"] for p in mine) else 0.0),
        "explore_passes": sum(p["explored"] > 0 for p in mine),
        "extra_cost_share": extra_cost / sum(p["seconds"] for p in decode) if decode else 0.0,
        "tokens_per_second": sum(sum(p["tokens"]) for p in mine) / sum(p["seconds"] for p in mine),
        "vs_ntp": ratios,
    }  # fmt: skip


def learned_table(cost) -> list[dict] | None:
    """Per size: the probe's and the learned price and the passes timed there (None with --fixed-curve)."""
    if not isinstance(cost, LearnedPassCost):
        return None
    cost.refresh()  # the passes since the last rebuild count too
    return cost.table()


def median_by_rows(passes: list[dict]) -> dict[int, float]:
    by = defaultdict(list)
    for p in passes:
        by[p["rows"]].append(p["seconds"])
    return {rows: statistics.median(s) for rows, s in sorted(by.items())}


def rate(passes: list[dict], round_: int) -> float:
    mine = [p for p in passes if p["round"] == round_]
    return sum(sum(p["tokens"]) for p in mine) / sum(p["seconds"] for p in mine)


def report(result: dict) -> str:
    curve = PassCost(result["pass_cost"]).describe()
    lines = [
        f"# Pass trace of the serving loop: {result['model']}{' (--prepack)' if result['prepack'] else ''}", "",
        f"    {result['command']}", "",
        f"Probed pass cost ({result['probe_seconds']:.1f} s to probe or parse): {curve}.", "",
        "The rule priced passes by " + ("this curve all run (--fixed-curve)." if result.get("learned") is None else
                                        "this curve corrected by the passes it timed (the table at the end)."), "",
        "| concurrency | mode | passes (decode) | extra-fed share | tokens/row-pass of those | NTP-sized pass / NTP's, by rows "
        "| rule ms/pass | explore passes | explored share (curve) | extra cost share (measured) | tokens/s | vs ntp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in result["cells"]:
        overhead = " ".join(f"{rows}:{x:.2f}" for rows, x in c["ntp_sized_over_ntp"].items())
        per = c["extra_tokens_per_row_pass"]
        ratios = c["vs_ntp"]
        lines.append(
            f"| {c['concurrency']} | {c['mode']} | {c['passes']} ({c['decode_passes']}) | {c['extra_share']:.1%} | "
            f"{'-' if per is None else f'{per:.2f}'} | {overhead} | {c['rule_ms_per_pass']:.3f} | {c['explore_passes']} | "
            f"{c['explored_share_by_curve']:.1%} | {c['extra_cost_share']:+.1%} | {c['tokens_per_second']:.3g} | "
            f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |"
        )  # fmt: skip
    lines += ["", f"Rule's choices over the run (kind -> proposals: passes): {json.dumps(result['chosen'])}; "
              f"explorations {result['explorations']}.", ""]  # fmt: skip
    if result.get("learned"):
        lines += ["Pass cost by tokens fed at the end of the run: the probe's and the learned price, and the passes "
                  "timed at that size (sizes with none take the correction of the sizes around them).", "",
                  "| tokens fed | probe ms | learned ms | learned / probe | passes timed |", "|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['probe_ms']:.1f} | {r['learned_ms']:.1f} | {r['learned_ms'] / r['probe_ms']:.2f} "
                  f"| {r['passes']} |" for r in result["learned"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
