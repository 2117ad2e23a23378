"""What `verify`'s draft rule leaves on the table: tokens per pass counted offline from one teacher-forced
pass per answer, under the real rule and under looser ones (issue #26, pilot B).

    # 1. the model's own greedy answers, and the measured verify:8 on them (any decode dtype):
    selfmtp eval --model smollm2-135m-mtp --dtype bfloat16 --task gsm8k --data dev.jsonl --limit 64 --shots 0 \
        --chat --max-new-tokens 128 --batch-size 16 --strategies verify:8,static:1 --output EVAL
    # 2. the offline counts on the same answers:
    PYTHONPATH=src python benchmarks/measure_draft_headroom.py --model smollm2-135m-mtp --dtype bfloat16 \
        --eval EVAL --answers verify:8 --data dev.jsonl --output headroom.json

One forward pass per answer (prompt + answer, in --dtype) with a block of K-1 `<mtp>` masks after every
position (the training layout, `training.layout.assemble_layout`, k = K at every position: mask i after
x_t sits at position t + i and proposes x_{t+1+i}, as a decoding pass's mask block does) gives, at every
position, the model's greedy next token and each mask's proposal and confidence, read as decoding reads
them (`pass_layout.greedy_readout`). Then `decoding.verify.ExactRow` itself (its plan/accept and draft
rule) is driven pass by pass over the answer, with those proposals in place of a live pass's, under:

- `rule`: verify.py as it is (DRAFT_MIN_CONFIDENCE, width 1 after a miss, back-off after misses);
- `threshold`: the confidence threshold, no back-off and no narrowing (every pass feeds K-1 masks);
- `all`: every mask proposal is a draft (threshold 0), no back-off, no narrowing.

`verify:K` (merged: the next drafts exist only after a fully accepted pass) and `verify:K:tree` (a block after
every draft; under `all` this is the oracle: a pass emits 1 + the run of consecutive correct mask proposals)
are both counted. The answers' tokens stand for the model's greedy choices (they are its greedy text in the
dtype it decoded in); `real_greedy_agreement` reports how often this pass's own argmax agrees with them, and
`rule_passes_equal` how many answers' simulated verify:K pass count equals the measured one. In bfloat16 the
pass runs the decode's batch-invariant kernels (`--kernels exact`, the decode default there), so it reads the
decode's own argmaxes; with torch's stock kernels about 1% of bf16 argmaxes flip at near-ties.
Also: mask agreement by position i = 1..K-1 (mask i's argmax == the answer's token i+1 ahead of the last real
token), and how much of it the confidence threshold keeps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import selfmtp.decoding.verify as verify_rule
from selfmtp.api import MTPModel
from selfmtp.decoding.pass_layout import Plan, greedy_readout
from selfmtp.decoding.rows import StopRules, new_row
from selfmtp.decoding.strategies import Verify
from selfmtp.decoding.verify import ExactRow
from selfmtp.evaluation.tasks import load_task
from selfmtp.files import write_json_atomic
from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id
from selfmtp.progress import progress_bar
from selfmtp.training.layout import RegionPlan, assemble_layout
from selfmtp.training.objective import SelectedLogits

RULES = ("rule", "threshold", "all")
NO_PROPOSAL = -1  # past the answer's end: nothing to propose (never equals a token)


@contextlib.contextmanager
def draft_rule(name: str):
    """verify.py's constants for one of RULES (restored after): the rule's own code runs with them."""
    saved = {key: getattr(verify_rule, key) for key in ("DRAFT_MIN_CONFIDENCE", "MISS_WIDTH", "MISSES_BEFORE_BACKOFF")}
    if name in ("threshold", "all"):
        verify_rule.MISS_WIDTH = 0  # `width = MISS_WIDTH or width`: a miss keeps K-1 masks
        verify_rule.MISSES_BEFORE_BACKOFF = 10**9
    if name == "all":
        verify_rule.DRAFT_MIN_CONFIDENCE = 0.0  # every proposal clears it
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(verify_rule, key, value)


@torch.no_grad()
def teacher_forced(model, prompt: list[int], answer: list[int], k: int) -> dict:
    """Per position t = len(prompt)-1 .. end-2: the real greedy next token and the K-1 masks' proposals and
    confidences ((n, K-1) tensors; entries past the answer are NO_PROPOSAL with confidence 0)."""
    ids = torch.tensor([prompt + answer])
    length, start = ids.shape[1], len(prompt)
    starts = torch.arange(start - 1, length - 1)
    ks = torch.clamp(length - 1 - starts, max=k)  # only the known tokens
    mask_id = mtp_token_id(model)
    layout = assemble_layout(ids, torch.tensor([start]), torch.tensor([length]), RegionPlan(starts[None], ks[None]),
                             mtp_token_id=mask_id, eos_token_id=-1, pad_token_id=0)  # fmt: skip
    logits = SelectedLogits(model)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                   layout.sup_batch, layout.sup_pos)  # fmt: skip
    confidences, proposals = greedy_readout(logits[None], mask_id)
    n = len(starts)
    real = torch.full((n,), NO_PROPOSAL)
    masks = torch.full((n, k - 1), NO_PROPOSAL)
    mask_conf = torch.zeros(n, k - 1)
    region, j = layout.sup_region, layout.sup_j
    first = j == 1
    real[region[first]] = proposals[0, first]
    rest = ~first
    masks[region[rest], j[rest] - 2] = proposals[0, rest]
    mask_conf[region[rest], j[rest] - 2] = confidences[0, rest]
    return {"real": real, "masks": masks, "conf": mask_conf}


def simulate(strategy: Verify, prompt: list[int], answer: list[int], forced: dict, budget: int, stops: StopRules):
    """Drive ExactRow over `answer` with the teacher-forced proposals; returns (passes, tokens emitted, tokens fed:
    real tokens and masks summed over the passes, the prompt included, as `selfmtp eval` counts them)."""
    row, exact = new_row(prompt, budget, None, strategy.k_max), ExactRow(strategy, list(prompt))
    text = prompt + answer
    base = len(prompt) - 1  # index into `forced` = absolute position - base
    n = forced["masks"].shape[0]
    while row.stop_reason is None:
        cached = len(prompt) + len(row.token_ids) - len(row.pending)
        plan: Plan = exact.plan(row, cached, None)
        last_pending = len(prompt) + len(row.token_ids) - 1
        first_real = last_pending - (len(plan.real) - plan.drafts - 1)
        greedy = [text[p + 1] if p + 1 < len(text) else NO_PROPOSAL
                  for p in range(first_real, first_real + len(plan.real))]  # fmt: skip
        proposals, confidences = list(greedy), [1.0] * len(greedy)
        for b in range(plan.blocks):
            after = last_pending + (b if plan.tree else plan.drafts)  # the real token the block follows
            i = after - base
            if 0 <= i < n:
                proposals += forced["masks"][i, : plan.n_masks].tolist()
                confidences += forced["conf"][i, : plan.n_masks].tolist()
            else:
                proposals += [NO_PROPOSAL] * plan.n_masks
                confidences += [0.0] * plan.n_masks
        exact.accept(row, plan, torch.tensor(proposals), torch.tensor(confidences), len(plan.real), stops)
    if row.token_ids != answer[: len(row.token_ids)]:
        raise AssertionError("the simulated row left the answer's text")
    return row.passes, len(row.token_ids), sum(row.tokens_fed)


def mask_agreement(forced: dict, answer: list[int], prompt_len: int, threshold: float) -> dict:
    """Counts by mask index i: proposals, correct ones, and the same among those >= threshold confident."""
    text_next = torch.tensor(answer + [NO_PROPOSAL] * forced["masks"].shape[1])
    n, k1 = forced["masks"].shape
    counts = {"n": [0] * k1, "hit": [0] * k1, "confident": [0] * k1, "confident_hit": [0] * k1}
    for i in range(k1):
        target = text_next[torch.arange(n) + 1 + i]  # mask i+1 after position t = prompt_len-1+r: answer[r+1+i]
        known = target != NO_PROPOSAL
        hit = (forced["masks"][:, i] == target) & known
        sure = (forced["conf"][:, i] >= threshold) & known
        counts["n"][i], counts["hit"][i] = int(known.sum()), int(hit.sum())
        counts["confident"][i], counts["confident_hit"][i] = int(sure.sum()), int((hit & sure).sum())
    return counts


def read_answers(eval_dir: Path, label: str) -> list[dict]:
    path = eval_dir / "runs" / (label.replace(":", "_") + ".json")
    if not path.is_file():
        raise SystemExit(f"{path}: no finished eval run of {label} (run `selfmtp eval` with it first)")
    return json.loads(path.read_text())["outputs"]


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, exact_kernels=args.kernels == "exact")
    model.eval()
    encoder, k = MTPModel(model, tokenizer), args.k
    items = read_answers(Path(args.eval), args.answers)[: args.limit]
    task = load_task("gsm8k", data=args.data, limit=len(items), shots=0, chat=True)
    measured = read_answers(Path(args.eval), f"verify:{k}")[: len(items)] if args.compare else None
    stops = StopRules(frozenset({tokenizer.eos_token_id}), [], tokenizer)
    strategies = {f"verify:{k}": Verify(k), f"verify:{k}:tree": Verify(k, tree=True)}
    totals = {f"{s}/{r}": {"tokens": 0, "passes": 0, "fed": 0} for s in strategies for r in RULES}
    per_item, agree, real_hits, started = [], None, 0, time.process_time()
    for item, out in progress_bar(list(zip(task.items, items, strict=True)), desc="answers", unit="answer"):
        assert item.index == out["index"]
        prompt = encoder.encode(task.prompt(item, tokenizer), chat=True)  # as `selfmtp eval` encodes it
        answer = list(out["token_ids"])
        forced = teacher_forced(model, prompt, answer, k)
        real_hits += int((forced["real"] == torch.tensor(answer)).sum())
        counts = mask_agreement(forced, answer, len(prompt), verify_rule.DRAFT_MIN_CONFIDENCE)
        agree = counts if agree is None else {key: [a + b for a, b in zip(agree[key], counts[key], strict=True)]
                                                 for key in agree}  # fmt: skip
        record = {"index": item.index, "tokens": len(answer)}
        for s_name, strategy in strategies.items():
            for rule in RULES:
                with draft_rule(rule):
                    passes, emitted, fed = simulate(strategy, prompt, answer, forced, args.max_new_tokens, stops)
                for name, value in (("tokens", emitted), ("passes", passes), ("fed", fed)):
                    totals[f"{s_name}/{rule}"][name] += value
                record[f"{s_name}/{rule}"] = passes
                record[f"{s_name}/{rule}/fed"] = fed
        if measured is not None:
            record["measured_passes"] = measured[len(per_item)]["forward_passes"]
        per_item.append(record)
    settings = {"model": args.model, "dtype": args.dtype, "kernels": args.kernels, "k": k, "eval": args.eval,
                "answers_from": args.answers, "threads": args.threads, "cpu_s": time.process_time() - started}  # fmt: skip
    return settings | figures(totals, agree, per_item, real_hits, k)


def figures(totals: dict, agree: dict, per_item: list[dict], real_hits: int, k: int) -> dict:
    """Rates from the summed counts (what one run or a pool of runs reports)."""
    real_n = sum(r["tokens"] for r in per_item)
    out = {
        "answers": len(per_item), "draft_min_confidence": verify_rule.DRAFT_MIN_CONFIDENCE,
        "tokens_per_pass_pooled": {key: t["tokens"] / t["passes"] for key, t in totals.items()},
        "tokens_fed_per_pass": {key: t["fed"] / t["passes"] for key, t in totals.items()},
        "totals": totals, "real_greedy_hits": real_hits, "real_greedy_agreement": real_hits / real_n,
        "mask_agreement_by_i": [h / n if n else None for h, n in zip(agree["hit"], agree["n"], strict=True)],
        "mask_confident_share_by_i": [c / n if n else None for c, n in zip(agree["confident"], agree["n"], strict=True)],
        "confident_precision_by_i": [h / c if c else None for h, c in zip(agree["confident_hit"], agree["confident"], strict=True)],
        "mask_counts": agree, "per_item": per_item,
    }  # fmt: skip
    if per_item and "measured_passes" in per_item[0]:
        measured = sum(r["measured_passes"] for r in per_item)
        out["measured_passes"] = measured
        out["measured_tokens_per_pass_pooled"] = real_n / measured
        out["rule_passes_equal"] = sum(r["measured_passes"] == r[f"verify:{k}/rule"] for r in per_item)
        out["pass_difference_mean"] = statistics.mean(r[f"verify:{k}/rule"] - r["measured_passes"] for r in per_item)
    return out


def pool(paths: list[str]) -> dict:
    """Several runs' results (same model, dtype, K) as one: counts summed, rates recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for run in runs[1:]:
        if any(run[key] != first[key] for key in ("model", "dtype", "k")):
            raise SystemExit("--pool: the runs differ in model, dtype or K")
    keys = first["totals"].keys()
    totals = {key: {n: sum(_counts(r)[key][n] for r in runs) for n in ("tokens", "passes", "fed")} for key in keys}
    agree = {name: [sum(v) for v in zip(*(r["mask_counts"][name] for r in runs), strict=True)]
             for name in first["mask_counts"]}  # fmt: skip
    per_item = [item for r in runs for item in r["per_item"]]
    hits = sum(r.get("real_greedy_hits", round(r["real_greedy_agreement"] * sum(i["tokens"] for i in r["per_item"])))
               for r in runs)  # fmt: skip
    settings = {key: first[key] for key in ("model", "dtype", "kernels", "k", "threads")}
    return settings | {"pooled_from": paths, "cpu_s": sum(r["cpu_s"] for r in runs)} | figures(
        totals, agree, per_item, hits, first["k"])


def _counts(run: dict) -> dict:
    """Totals as {"tokens", "passes", "fed"}; the first runs of this tool wrote them as lists."""
    return {key: v if isinstance(v, dict) else dict(zip(("tokens", "passes", "fed"), v, strict=True))
            for key, v in run["totals"].items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-mtp")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="of the teacher-forced pass")
    parser.add_argument("--kernels", choices=["exact", "stock"],
                        help="exact: the batch-invariant kernels bf16 decoding runs (default in bfloat16; then the "
                             "pass reads what the decode read), stock: torch's (default in float32)")  # fmt: skip
    parser.add_argument("--pool", nargs="+", metavar="RESULTS", help="instead of measuring: pool these results files")
    parser.add_argument("--eval", help="a `selfmtp eval` output folder (gsm8k, chat, 0 shots)")
    parser.add_argument("--answers", default="static:1", help="whose outputs are the answers (an exact strategy)")
    parser.add_argument("--data", help="the eval's --data (to rebuild the prompts)")
    parser.add_argument("--limit", type=int, help="first N answers only")
    parser.add_argument("--k", type=int, default=8, help="verify K (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the eval's budget (default 128)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="do not read the eval's measured verify:K run")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True, help="results JSON")
    args = parser.parse_args()
    args.kernels = args.kernels or ("stock" if args.dtype == "float32" else "exact")
    if not args.pool and not (args.eval and args.data):
        parser.error("give --eval and --data (or --pool)")
    result = pool(args.pool) if args.pool else measure(args)
    write_json_atomic(Path(args.output), result)
    print(json.dumps({key: v for key, v in result.items() if key not in ("per_item", "mask_counts", "totals")}, indent=2))


if __name__ == "__main__":
    main()
