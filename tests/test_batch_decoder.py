"""The steppable batch decoder: rows joining mid-decode and leaving early decode exactly as alone."""

from __future__ import annotations

import pytest
import torch

from selfmtp.decoding.batch import COMPACT_AT_LEAST, BatchDecoder
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.strategies import NTP, AdaptiveConfAdapt, ConfAdapt, Static, Verify


def alone(mtp, prompt, strategy, max_new_tokens):
    return generate_batch(mtp.model, [prompt], strategy, max_new_tokens=max_new_tokens, tokenizer=mtp.tokenizer)[0]


@pytest.mark.parametrize("strategy", [NTP(), ConfAdapt(0.6, 4), AdaptiveConfAdapt(0.6, 4)], ids=lambda s: s.name)
def test_row_added_mid_decode_gets_exactly_its_tokens_alone(peaked, strategy):
    tokenizer = peaked.tokenizer
    first = tokenizer("The quick brown fox jumps over")["input_ids"]
    late = tokenizer("A late prompt that joins while the first decodes")["input_ids"]
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer, compact_cache=True)
    row_a = decoder.add(first, strategy, max_new_tokens=24)
    for _ in range(3):
        decoder.step()
    row_b = decoder.add(late, Static(2), max_new_tokens=12)  # a different strategy in the same batch
    assert len(decoder.active) == 2
    while decoder.active:
        decoder.step()
    assert row_a.token_ids == alone(peaked, first, strategy, 24).token_ids
    assert row_b.token_ids == alone(peaked, late, Static(2), 12).token_ids


@pytest.mark.parametrize("strategy", [Verify(4), Verify(4, tree=True), Verify(4, lookup=True)], ids=lambda s: s.name)
def test_exact_row_joining_a_running_ntp_batch_gives_greedy_tokens(peaked, strategy):
    """A verify row shares passes with NTP rows (its drafts and masks beside their single tokens), joins
    mid-decode and leaves early: its tokens and theirs are those of static:1 alone."""
    tokenizer = peaked.tokenizer
    prompts = [tokenizer(text)["input_ids"] for text in ("The quick brown fox", "Once upon a time there was",
                                                          "A late prompt that joins while others decode")]  # fmt: skip
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer, compact_cache=True)
    rows = [decoder.add(prompts[0], NTP(), max_new_tokens=30), decoder.add(prompts[1], NTP(), max_new_tokens=8)]
    for _ in range(3):
        decoder.step()
    rows.append(decoder.add(prompts[2], strategy, max_new_tokens=20))
    fed = []
    while decoder.active:
        fed.append(sum(len(row.state.pending) for row in decoder.active))
        decoder.step()
    for prompt, row in zip(prompts, rows, strict=True):
        assert row.token_ids == alone(peaked, prompt, Static(1), row.state.budget).token_ids
    result = rows[2].result(tokenizer)
    assert result.strategy == strategy.name and sum(result.draft_offered) > 0  # it did draft, beside the others
    assert result.token_ids == alone(peaked, prompts[2], strategy, 20).token_ids


def test_rows_joining_and_leaving_keep_the_cache_bounded(peaked):
    """With compact_cache, a batch that never drains keeps only columns some live row can see."""
    tokenizer = peaked.tokenizer
    prompts = [tokenizer(f"Prompt number {i} " + "says hello again and again " * 10)["input_ids"] for i in range(9)]
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer, compact_cache=True)
    rows = [decoder.add(prompts[0], NTP(), max_new_tokens=80)]
    lengths = []
    for prompt in prompts[1:]:  # a new short row joins every few passes; each leaves after 6 tokens
        rows.append(decoder.add(prompt, NTP(), max_new_tokens=6))
        for _ in range(7):
            decoder.step()
        lengths.append(decoder.key_is_real.shape[1])
        live_columns = int(decoder.key_is_real.any(dim=0).sum())
        assert lengths[-1] < live_columns + max(COMPACT_AT_LEAST, live_columns)  # dead columns get dropped
        assert decoder.cache.layers[0].keys.shape[-2] == lengths[-1]
    while decoder.active:
        decoder.step()
    for prompt, row in zip(prompts, rows, strict=True):
        assert row.token_ids == alone(peaked, prompt, NTP(), row.state.budget).token_ids


def test_removed_row_frees_its_place_and_others_continue(peaked):
    tokenizer = peaked.tokenizer
    a, b = tokenizer("First row")["input_ids"], tokenizer("Second row is longer than the first")["input_ids"]
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer)
    row_a = decoder.add(a, ConfAdapt(0.6, 4), max_new_tokens=16)
    row_b = decoder.add(b, ConfAdapt(0.6, 4), max_new_tokens=16)
    decoder.step()
    decoder.remove(row_a)
    assert decoder.active == [row_b] and decoder.cache.layers[0].keys.shape[0] == 1
    while decoder.active:
        decoder.step()
    assert row_b.token_ids == alone(peaked, b, ConfAdapt(0.6, 4), 16).token_ids


def test_a_failing_row_leaves_with_its_error_when_errors_are_caught(peaked):
    class Exploding(ConfAdapt):
        def accept(self, confidences: torch.Tensor) -> int:
            raise RuntimeError("boom")

    tokenizer = peaked.tokenizer
    prompt = tokenizer("Hello")["input_ids"]
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer, catch_row_errors=True)
    bad = decoder.add(prompt, Exploding(0.5, 2), max_new_tokens=8)
    good = decoder.add(prompt, NTP(), max_new_tokens=8)
    events = decoder.step()
    assert [e.finished for e in events] == [True, False] and str(bad.error) == "boom"
    assert decoder.active == [good]
    while decoder.active:
        decoder.step()
    assert good.token_ids == alone(peaked, prompt, NTP(), 8).token_ids


def test_load_aware_cap_limits_proposals(peaked):
    tokenizer = peaked.tokenizer
    decoder = BatchDecoder(peaked.model, tokenizer=tokenizer)
    row = decoder.add(tokenizer("Cap me")["input_ids"], ConfAdapt(1e-6, 8), max_new_tokens=12, load_aware=True)
    fixed = decoder.add(tokenizer("Not me")["input_ids"], Static(2), max_new_tokens=12)
    event_row, event_fixed = decoder.step(max_proposals=1)
    assert event_row.proposed == 1 and len(event_row.token_ids) == 1  # capped to NTP for this pass
    assert len(event_fixed.token_ids) == 2  # a fixed strategy is never capped
    # each row feeds its own masks only: the capped row none (the other row's mask column is a pad for it)
    assert row.state.tokens_fed[-1] == len(tokenizer("Cap me")["input_ids"])
    assert fixed.state.tokens_fed[-1] == len(tokenizer("Not me")["input_ids"]) + 1
    (event_row, _) = decoder.step()
    assert len(event_row.token_ids) == 8  # uncapped; tau 1e-6 < 1/vocab keeps every proposal
    assert fixed.strategy == Static(2)
