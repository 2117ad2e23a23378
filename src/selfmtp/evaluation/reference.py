"""Metrics against a reference row: the original model (`teacher`) or the student's own static k=1.

- paired difference: accuracy minus the reference's, with the standard error of the per-item
  differences. Both rows score the same items, so this error is far smaller than the two accuracies'
  own (one standard error of each is 1 to 1.5 points on 500 items; of their difference, ~1);
- answer agreement: the share of items whose extracted answer equals the one the teacher's own
  greedy decoding gave (the `teacher` row), with the same standard error as accuracy;
- coherence: the teacher's mean per-token negative log-likelihood of the generated text, given the
  prompt. A student that keeps writing what the original model would write scores like the teacher's
  own greedy text; confident multi-token mistakes show up as a higher NLL.
"""

from __future__ import annotations

import statistics

import torch

from selfmtp.errors import SelfMTPError
from selfmtp.evaluation.report import accuracy_with_stderr


def _item_pairs(outputs: list[dict], reference_outputs: list[dict], metric: str, field: str) -> list[tuple]:
    """(this row's value, the reference row's) of scores[metric][field], for every item both hold."""
    by_index = {o["index"]: o["scores"][metric][field] for o in reference_outputs}
    return [(o["scores"][metric][field], by_index[o["index"]]) for o in outputs if o["index"] in by_index]


def answer_agreement(outputs: list[dict], teacher_outputs: list[dict], metric: str) -> dict:
    """Both lists as stored in runs/<strategy>.json ("scores"[metric]["extracted"]), item by item."""
    return accuracy_with_stderr([mine == theirs for mine, theirs in _item_pairs(outputs, teacher_outputs, metric, "extracted")])


def identical_outputs(outputs: list[dict], reference_outputs: list[dict]) -> dict:
    """Items whose generated token ids equal the reference row's (exact decoding: all of them), of shared items."""
    by_index = {o["index"]: o.get("token_ids") for o in reference_outputs}
    shared = [o for o in outputs if o["index"] in by_index and by_index[o["index"]] is not None]
    return {"identical": sum(o.get("token_ids") == by_index[o["index"]] for o in shared), "of": len(shared)}


def paired_difference(outputs: list[dict], reference_outputs: list[dict], metric: str) -> dict:
    """Mean over shared items of correct - reference_correct (each 0 or 1), with its standard error
    (sample std of the differences / sqrt(n)); fractions, like accuracy."""
    diffs = [int(mine) - int(theirs) for mine, theirs in _item_pairs(outputs, reference_outputs, metric, "correct")]
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else 0.0
    stderr = statistics.stdev(diffs) / n**0.5 if n > 1 else 0.0
    return {"difference": mean, "stderr": stderr, "n": n}


@torch.no_grad()
def token_nll(model, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """-log p(output token | prompt, earlier output tokens) under `model`, one value per output token."""
    if not output_ids:
        return []
    ids = torch.tensor([prompt_ids + output_ids], device=model.device)
    logits = model(input_ids=ids, logits_to_keep=len(output_ids) + 1).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return (-log_probs.gather(1, ids[0, len(prompt_ids) :, None])[:, 0]).tolist()


def coherence(teacher, prompts: list, outputs: list[dict], *, chat: bool) -> dict:
    """Teacher NLL per generated token: mean over all tokens, and the mean and std over items."""
    per_item, total, count = [], 0.0, 0
    vocab = teacher.model.get_input_embeddings().num_embeddings
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = output.get("token_ids")  # runs stored before token ids were kept: re-tokenize the text
        ids = ids if ids is not None else teacher.tokenizer(output["output"], add_special_tokens=False)["input_ids"]
        if ids and max(ids) >= vocab:
            raise SelfMTPError(f"--coherence: the teacher's vocabulary ({vocab} tokens) differs from the student's "
                               f"(token id {max(ids)}): it must share the student's tokenizer")
        nll = token_nll(teacher.model, teacher.encode(prompt, chat=chat), ids)
        if nll:
            per_item.append(sum(nll) / len(nll))
            total, count = total + sum(nll), count + len(nll)
    mean = statistics.fmean(per_item) if per_item else float("nan")
    std = statistics.pstdev(per_item) if per_item else float("nan")
    return {"teacher_nll_per_token": total / count if count else float("nan"), "teacher_nll_item_mean": mean,
            "teacher_nll_item_std": std, "teacher_nll_tokens": count}  # fmt: skip
