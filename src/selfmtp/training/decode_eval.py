"""Decode-time evaluation during training: ConfAdapt acceleration and agreement with the teacher.

At every evaluation the trainer decodes the same first N held-out prompts (their prompt tokens, as
the training template renders them) with ConfAdapt(tau, k_max of the run) from the current student,
and compares each continuation with the reference model's greedy (NTP) continuation of the same
prompt, computed once at the first evaluation:

    decode_acceleration    tokens per forward pass, mean over prompts (METHOD.md's acceleration)
    decode_prefix_match    share of the reference tokens reproduced before the first difference (mean)
    decode_exact_match     share of prompts whose continuation equals the reference exactly
    decode_verify_tokens_per_pass   exact decoding (verify:k_max, the student's own greedy output):
                           tokens per pass pooled over the prompts, the lossless speed-up so far
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.results import summarize
from selfmtp.decoding.strategies import NTP, Verify, parse_strategy
from selfmtp.training.data import TokenRows


@dataclass
class DecodeEval:
    prompts: list[list[int]]
    reference: list[list[int]]  # the reference model's greedy token ids, one list per prompt
    strategy_name: str
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    pad_token_id: int
    k_max: int = 0  # >= 2: also decode exactly with verify:k_max


def prompt_ids(rows: TokenRows, n: int) -> list[list[int]]:
    """The prompt tokens (everything before the response) of the first `n` rows."""
    return [rows.input_ids[i, : int(rows.response_start[i])].tolist() for i in range(min(n, len(rows)))]


@torch.no_grad()
def build_decode_eval(rows: TokenRows, n: int, reference_model, *, tau: float, k_max: int, max_new_tokens: int,
                      stop_token_ids, pad_token_id: int) -> DecodeEval:
    """The first `n` rows' prompts with `reference_model`'s greedy continuations."""
    prompts = prompt_ids(rows, n)
    settings = {"max_new_tokens": max_new_tokens, "stop_token_ids": frozenset(stop_token_ids),
                "pad_token_id": pad_token_id}
    reference = [r.token_ids for r in generate_batch(reference_model, prompts, NTP(), **settings)]
    return DecodeEval(prompts, reference, f"confadapt:{tau}:{k_max}", k_max=k_max, **settings)


def prefix_match(tokens: list[int], reference: list[int]) -> float:
    """Share of `reference` reproduced by `tokens` before their first difference."""
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same / len(reference) if reference else 1.0


@torch.no_grad()
def decode_metrics(model, de: DecodeEval) -> dict:
    """Decode the prompts with ConfAdapt from `model` and compare with the reference."""
    started = time.perf_counter()
    settings = {"max_new_tokens": de.max_new_tokens, "stop_token_ids": de.stop_token_ids, "pad_token_id": de.pad_token_id}
    results = generate_batch(model, de.prompts, parse_strategy(de.strategy_name), **settings)
    seconds = time.perf_counter() - started
    accelerations = [r.acceleration for r in results]
    exact = {}
    if de.k_max >= 2:
        verified = generate_batch(model, de.prompts, Verify(de.k_max), **settings)
        exact["decode_verify_tokens_per_pass"] = summarize(verified)["tokens_per_pass_pooled"]
    return {
        "decode_strategy": de.strategy_name,
        "decode_acceleration": statistics.fmean(accelerations),
        "decode_acceleration_std": statistics.stdev(accelerations) if len(accelerations) > 1 else 0.0,
        "decode_prefix_match": statistics.fmean(prefix_match(r.token_ids, ref) for r, ref in zip(results, de.reference, strict=True)),
        "decode_exact_match": statistics.fmean(float(r.token_ids == ref) for r, ref in zip(results, de.reference, strict=True)),
        "decode_tokens": sum(r.num_tokens for r in results),
        "decode_seconds": round(seconds, 2),
        **exact,
    }
