"""What `verify`'s draft rule leaves on the table: tokens per pass counted offline from one teacher-forced
pass per answer of a finished `selfmtp eval` run, under the real rule and under looser ones
(`selfmtp eval ... --draft-headroom verify:K`; the draft-rule pilot of the third smollm2-135m-mtp attempt).

One forward pass per answer (prompt + answer, in the eval's dtype and the decode's kernels) with a block
of K-1 `<mtp>` masks after every position (the training layout, `training.layout.assemble_layout`, k = K
at every position: mask i after x_t sits at position t + i and proposes x_{t+1+i}, as a decoding pass's
mask block does) gives, at every position, the model's greedy next token and each mask's proposal and
confidence, read as decoding reads them (`pass_layout.greedy_readout`). Then `decoding.verify.ExactRow`
itself (its plan/accept and draft rule) is driven pass by pass over the answer, with those proposals in
place of a live pass's, under:

- `rule`: verify.py as it is (DRAFT_MIN_CONFIDENCE, width 1 after a miss, back-off after misses);
- `threshold`: the confidence threshold, no back-off and no narrowing (every pass feeds K-1 masks);
- `all`: every mask proposal is a draft (threshold 0), no back-off, no narrowing.

`verify:K` (merged: the next drafts exist only after a fully accepted pass) and `verify:K:tree` (a block
after every draft; under `all` this is the oracle: a pass emits 1 + the run of consecutive correct mask
proposals) are both counted. The answers are the eval run's `verify:K` (or `verify:K:tree`) outputs: an
exact strategy's text is the model's greedy text in its dtype (in every dtype but float32 decoding runs
batch-invariant kernels, and so does this pass, so it reads the decode's own argmaxes).
`real_greedy_agreement` says how often this pass's argmax agrees with the answers, `rule_passes_equal`
on how many answers the simulated real rule's pass count equals the run's measured one. Also: mask
agreement by position i = 1..K-1 (mask i's argmax == the answer's token i+1 ahead of the last real
token), and how much of it the confidence threshold keeps. Records: docs/measurements/smollm2-135m-mtp-v3-cpu.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

import selfmtp.decoding.verify as verify_rule
from selfmtp.decoding.pass_layout import Plan, greedy_readout
from selfmtp.decoding.rows import StopRules, new_row
from selfmtp.decoding.strategies import Verify, parse_strategy
from selfmtp.decoding.verify import ExactRow
from selfmtp.errors import SelfMTPError
from selfmtp.files import write_json_atomic
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
        raise SelfMTPError("the simulated row left the answer's text: the answers are not this model's greedy text")
    return row.passes, len(row.token_ids), sum(row.tokens_fed)


def mask_agreement(forced: dict, answer: list[int], threshold: float) -> dict:
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


def count_answers(mtp, task, outputs: list[dict], strategy: Verify, budget: int, progress: bool = True) -> dict:
    """The offline counts over every answer (`outputs`: a finished eval run's, in the task's item order)."""
    k, label = strategy.k_max, strategy.name
    stops = StopRules(frozenset(mtp.stop_token_ids), list(task.stop), mtp.tokenizer)
    strategies = {s.name: s for s in (Verify(k), Verify(k, tree=True))}
    totals = {f"{s}/{r}": {"tokens": 0, "passes": 0, "fed": 0} for s in strategies for r in RULES}
    per_item, agree, real_hits = [], None, 0
    for item, out in progress_bar(list(zip(task.items, outputs, strict=True)), desc="answers", unit="answer",
                                  disable=not progress):  # fmt: skip
        prompt = mtp.encode(task.prompt(item, mtp.tokenizer), chat=task.chat)  # as `selfmtp eval` encodes it
        answer = list(out["token_ids"])
        forced = teacher_forced(mtp.model, prompt, answer, k)
        real_hits += int((forced["real"] == torch.tensor(answer)).sum())
        counts = mask_agreement(forced, answer, verify_rule.DRAFT_MIN_CONFIDENCE)
        agree = counts if agree is None else {key: [a + b for a, b in zip(agree[key], counts[key], strict=True)]
                                                 for key in agree}  # fmt: skip
        record = {"index": item.index, "tokens": len(answer), "measured_passes": out["forward_passes"]}
        for name, simulated in strategies.items():
            for rule in RULES:
                with draft_rule(rule):
                    passes, emitted, fed = simulate(simulated, prompt, answer, forced, budget, stops)
                for key, value in (("tokens", emitted), ("passes", passes), ("fed", fed)):
                    totals[f"{name}/{rule}"][key] += value
                record[f"{name}/{rule}"], record[f"{name}/{rule}/fed"] = passes, fed
        per_item.append(record)
    return figures(totals, agree, per_item, real_hits, label)


def figures(totals: dict, agree: dict, per_item: list[dict], real_hits: int, label: str) -> dict:
    """Rates from the summed counts, and the simulated real rule beside the measured run `label`."""
    real_n = sum(r["tokens"] for r in per_item)
    measured = sum(r["measured_passes"] for r in per_item)
    return {
        "answers": len(per_item), "draft_min_confidence": verify_rule.DRAFT_MIN_CONFIDENCE,
        "tokens_per_pass_pooled": {key: t["tokens"] / t["passes"] for key, t in totals.items()},
        "tokens_fed_per_pass": {key: t["fed"] / t["passes"] for key, t in totals.items()},
        "totals": totals, "real_greedy_hits": real_hits, "real_greedy_agreement": real_hits / real_n,
        "mask_agreement_by_i": [h / n if n else None for h, n in zip(agree["hit"], agree["n"], strict=True)],
        "mask_confident_share_by_i": [c / n if n else None for c, n in zip(agree["confident"], agree["n"], strict=True)],
        "confident_precision_by_i": [h / c if c else None for h, c in zip(agree["confident_hit"], agree["confident"], strict=True)],
        "measured_passes": measured, "measured_tokens_per_pass_pooled": real_n / measured,
        "rule_passes_equal": sum(r["measured_passes"] == r[f"{label}/rule"] for r in per_item),
        "pass_difference_mean": sum(r[f"{label}/rule"] - r["measured_passes"] for r in per_item) / len(per_item),
        "mask_counts": agree, "per_item": per_item,
    }  # fmt: skip


def run_draft_headroom(config, label: str, output_dir: str | Path, *, progress: bool = True) -> dict:
    """On the finished run `label` (verify:K or verify:K:tree) of the eval `config` in `output_dir`:
    the offline counts, written to OUTPUT/draft_headroom_<label>.json (and returned)."""
    from selfmtp.api import MTPModel
    from selfmtp.evaluation.sweep import PlannedRun, load_finished
    from selfmtp.evaluation.tasks import load_task

    strategy = parse_strategy(label)
    if config.device != "cpu":
        raise SelfMTPError("--draft-headroom runs on the CPU (--device cpu): its teacher-forced pass is built there")
    if not isinstance(strategy, Verify) or strategy.lookup or strategy.k is None:
        raise SelfMTPError(f"--draft-headroom takes verify:K or verify:K:tree (its drafts come from masks), got {label!r}")
    output_dir = Path(output_dir)
    filename = PlannedRun(strategy.name, label, strategy, config.model).filename
    record = load_finished(output_dir / "runs" / filename, config.fingerprint(config.model))
    if record is None:
        raise SelfMTPError(f"no finished {strategy.name} run in {output_dir}: run this `selfmtp eval` command with "
                           f"--strategies {strategy.name} first (same flags)")  # fmt: skip
    task = load_task(config.task, data=config.data, fewshot_data=config.fewshot_data, limit=config.limit,
                     shots=config.shots, chat=config.chat, seed=config.seed)  # fmt: skip
    mtp = MTPModel.from_pretrained(config.model, seed=config.seed, dtype=config.dtype, device=config.device,
                                   prepack=config.prepack)  # fmt: skip
    mtp.model.eval()
    started = time.process_time()
    counted = count_answers(mtp, task, record["outputs"], strategy, config.max_new_tokens, progress)
    decode = getattr(mtp.model, "selfmtp_decode", None) or {}
    result = {"model": config.model, "dtype": mtp.dtype_name, "kernels": "exact" if decode.get("exact_kernels") else "stock",
              "k": strategy.k_max, "eval": str(output_dir), "answers_from": strategy.name,
              "threads": torch.get_num_threads(), "cpu_s": time.process_time() - started} | counted  # fmt: skip
    write_json_atomic(output_dir / f"draft_headroom_{filename}", result)
    return result


def format_headroom(result: dict) -> str:
    """Tokens per pass and tokens fed per pass under each rule and layout, beside the measured run."""
    lines = [f"# Draft headroom: {result['answers_from']} on {result['answers']} answers ({result['model']}, "
             f"{result['dtype']}, {result['kernels']} kernels)", "",
             "| strategy/rule | tokens per pass | fed per pass |", "|---|---|---|"]  # fmt: skip
    for key, rate in result["tokens_per_pass_pooled"].items():
        lines.append(f"| {key} | {rate:.3f} | {result['tokens_fed_per_pass'][key]:.1f} |")
    lines += ["", f"Measured {result['answers_from']}: {result['measured_tokens_per_pass_pooled']:.3f} tokens per pass; "
              f"the simulated real rule gives its pass count on {result['rule_passes_equal']}/{result['answers']} "
              f"answers; this pass's greedy token equals the answer's at {100 * result['real_greedy_agreement']:.2f}%."]  # fmt: skip
    return "\n".join(lines) + "\n"
