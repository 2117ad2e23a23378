"""Adaptive k (`confadapt:TAU:KMAX:adaptive`): fewer masks after unconfident passes, checked against an
uncached recomputation with its own copy of the rule, static decoding, and one-prompt-at-a-time decoding."""

from __future__ import annotations

import pytest
import torch

from selfmtp.decoding.strategies import AdaptiveConfAdapt, ConfAdapt, Static, next_proposals, parse_strategy
from selfmtp.errors import SelfMTPError

PROMPTS = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "x",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
TAU, K_MAX = 0.45, 6  # on `peaked` this accepts 1 to 6 tokens per pass


def uncached_adaptive(mtp, prompt_ids: list[int], tau: float, k_max: int, max_new_tokens: int):
    """From scratch every pass (no cache): prompt + generated + (k-1) masks, with the rule written out
    again here: start at k_max; all kept -> double (cap k_max); else as many as were kept. No pass feeds
    masks past the budget (a pass with t tokens left proposes at most t)."""
    mask_id = mtp.model.config.mtp_mask_token_id
    generated, sizes, fed, k = [], [], [], k_max
    while len(generated) < max_new_tokens:
        pending = len(prompt_ids) if not generated else sizes[-1]
        proposed = min(k, max_new_tokens - len(generated))
        fed.append(pending + proposed - 1)
        ids = torch.tensor([prompt_ids + generated + [mask_id] * (proposed - 1)])
        with torch.no_grad():
            logits = mtp.model(ids).logits[0, -proposed:].float()
        logits[:, mask_id] = float("-inf")
        confidences, proposals = logits.softmax(-1).max(-1)
        run = 0
        while run < proposed and confidences[run] >= tau:
            run += 1
        kept = max(run, 1)
        take = proposals[:kept].tolist()[: max_new_tokens - len(generated)]
        assert not set(take) & mtp.stop_token_ids  # the tiny model never says EOS in these few tokens
        generated += take
        sizes.append(len(take))
        k = min(k_max, 2 * k) if kept == k else kept
    return generated, sizes, fed


def chunk_sizes(result) -> list[int]:
    return [len(c.token_ids) for c in result.chunks]


def test_adaptive_equals_uncached_recomputation(peaked):
    strategy = AdaptiveConfAdapt(TAU, K_MAX)
    widths = set()
    for prompt in PROMPTS[:3]:
        ids = peaked.encode(prompt, chat=False)
        result = peaked.generate(prompt, strategy=strategy, max_new_tokens=20, chat=False)
        tokens, sizes, fed = uncached_adaptive(peaked, ids, TAU, K_MAX, 20)
        assert result.token_ids == tokens
        assert chunk_sizes(result) == sizes
        assert result.tokens_fed == fed
        widths |= {f - s for f, s in zip(fed[1:], sizes[:-1], strict=True)}  # masks fed per later pass
    assert len(widths) >= 3  # k really varied from pass to pass


def test_adaptive_with_tiny_tau_is_static_kmax(peaked):
    for prompt in PROMPTS[:2]:
        adaptive = peaked.generate(prompt, strategy=AdaptiveConfAdapt(1e-9, 5), max_new_tokens=18, chat=False)
        static = peaked.generate(prompt, strategy=Static(5), max_new_tokens=18, chat=False)
        assert adaptive.token_ids == static.token_ids
        assert chunk_sizes(adaptive) == chunk_sizes(static) == [5, 5, 5, 3]
        assert adaptive.tokens_fed == static.tokens_fed
        prompt_tokens = len(peaked.encode(prompt, chat=False))
        assert static.tokens_fed == [prompt_tokens + 4, 5 + 4, 5 + 4, 5 + 2]  # 3 tokens left: 2 masks, not 4


def test_adaptive_feeds_fewer_tokens_than_static_kmax(peaked):
    adaptive = peaked.generate(PROMPTS, strategy=AdaptiveConfAdapt(TAU, K_MAX), max_new_tokens=24, chat=False)
    fixed = peaked.generate(PROMPTS, strategy=ConfAdapt(TAU, K_MAX), max_new_tokens=24, chat=False)
    fed_adaptive = sum(sum(r.tokens_fed[1:]) for r in adaptive)  # after the prompt's pass
    fed_fixed = sum(sum(r.tokens_fed[1:]) for r in fixed)
    passes_adaptive = sum(r.forward_passes - 1 for r in adaptive)
    passes_fixed = sum(r.forward_passes - 1 for r in fixed)
    assert fed_adaptive < 0.9 * fed_fixed  # fewer tokens in all (175 vs 208 when written)
    assert fed_adaptive / passes_adaptive < 0.8 * fed_fixed / passes_fixed  # and far fewer per pass
    assert all(r.acceleration > 1 for r in adaptive)
    assert all(len(r.tokens_fed) == r.forward_passes for r in adaptive + fixed)


def test_adaptive_batched_equals_one_by_one(peaked):
    strategy = AdaptiveConfAdapt(TAU, K_MAX)
    alone = [peaked.generate(p, strategy=strategy, max_new_tokens=20, chat=False) for p in PROMPTS]
    batched = peaked.generate(PROMPTS, strategy=strategy, max_new_tokens=20, chat=False, batch_size=4)
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids
        assert chunk_sizes(b) == chunk_sizes(a)
    firsts = {tuple(chunk_sizes(r)[:3]) for r in batched}
    assert len(firsts) > 1  # rows asked for different k in the same pass


def test_parse_and_rule():
    strategy = parse_strategy("confadapt:0.9:8:adaptive")
    assert strategy == AdaptiveConfAdapt(0.9, 8) and strategy.name == "confadapt:0.9:8:adaptive"
    assert parse_strategy(strategy.name) == strategy
    cases = [(8, 8), (2, 2), (4, 4), (8, 3), (5, 1)]  # (proposed, kept) -> next k
    assert [next_proposals(strategy, k, n) for k, n in cases] == [8, 4, 8, 3, 1]
    assert next_proposals(ConfAdapt(0.9, 8), 8, 1) == 8 and next_proposals(Static(3), 3, 3) == 3
    with pytest.raises(SelfMTPError, match="unknown strategy"):
        parse_strategy("confadapt:0.9:8:sometimes")
    with pytest.raises(SelfMTPError, match="tau must be in"):
        parse_strategy("confadapt:0:8:adaptive")


def test_bad_next_k_is_a_bug(peaked):
    class Broken(AdaptiveConfAdapt):
        def next_k(self, proposed, accepted):
            return 0

    with pytest.raises(ValueError, match="next_k\\(\\) returned 0"):
        peaked.generate("hello", strategy=Broken(0.5, 4), max_new_tokens=8, chat=False)
