"""The load-aware exact mode (`auto:verify[:K][:lookup]`): the sizing of exact rows (pure, on a fake
cost curve), what a cap makes a row feed, and that whatever is fed the output is greedy NTP (static:1)
token for token: alone, mixed with other rows, joining a running batch, through `generate`.

Token equality is checked on the sharpened tiny model (`peaked`, clear greedy margins: see
test_verify's `assert_clear_margins`), on prompts whose repeats make lookup drafts right and whose
random masks draft wrong, so both the accept and the reject paths run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from selfmtp.decoding.batch import BatchDecoder
from selfmtp.decoding.load_aware import AcceptanceStats, LoadAware, PassCost, ProposalRule
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.strategies import NTP, ConfAdapt, Static, Verify, resolve_strategy
from selfmtp.errors import SelfMTPError

FLAT = PassCost([(1, 0.010), (256, 0.010)])  # overhead-bound: any pass costs the same
LINEAR = PassCost([(1, 0.010), (256, 2.560)])  # compute-bound: every token fed costs a pass's worth
REPEATS = "a b c d a b c d a b c"  # greedy output of `peaked` loops here: lookup drafts are right


def greedy(mtp, prompt: list[int], max_new_tokens: int) -> list[int]:
    return generate_batch(mtp.model, [prompt], Static(1), max_new_tokens=max_new_tokens)[0].token_ids


def kept_always(k_max: int, passes: int = 50) -> AcceptanceStats:
    stats = AcceptanceStats(k_max)
    for _ in range(passes):
        stats.record(proposed=k_max, accepted=k_max)
    return stats


def test_auto_verify_names():
    assert resolve_strategy("auto:verify") == (Verify(), True)
    assert resolve_strategy("auto:verify:4:lookup") == (Verify(4, lookup=True), True)
    assert resolve_strategy("verify:4") == (Verify(4), False)
    with pytest.raises(SelfMTPError, match="tree"):
        resolve_strategy("auto:verify:4:tree")
    with pytest.raises(SelfMTPError, match="verify K"):
        resolve_strategy("auto:verify:x")


def test_exact_rule_charges_a_draft_and_a_mask_per_proposal():
    """A pass costs the same up to 8 tokens fed, then 3/8 per token: a lossy row affords 8 proposals
    (7 masks), an exact row 4 (3 drafts + 3 masks = 7 tokens beside its own)."""
    curve = PassCost([(1, 1.0), (8, 1.0), (16, 4.0)])
    stats = kept_always(8)
    assert ProposalRule(stats, curve, explore_share=0.0).choose(rows=1, fed_per_row=1) == 8
    exact = ProposalRule(stats, curve, explore_share=0.0, fed_per_proposal=2)
    assert exact.choose(rows=1, fed_per_row=1) == 4
    assert exact.choose(rows=1, fed_per_row=1, most=3) == 3  # no more than the rows' K
    assert exact.choose(rows=4, fed_per_row=1) == 1  # 4 rows x 3 tokens already cost more than 3 passes' tokens


def fake_row(kind: str, k_max: int, load_aware: bool = True, k: int | None = None):
    return SimpleNamespace(kind=kind, load_aware=load_aware, strategy=SimpleNamespace(k_max=k_max),
                           state=SimpleNamespace(k=k or k_max, pending=[0]))  # fmt: skip


def test_each_row_kind_has_its_own_stats_and_cap():
    """Exact drafts always confirmed, lossy masks never kept: where a token fed costs 0.4% of a pass,
    exact rows get their K, lossy rows NTP; a kind with no load-aware row in the pass is not asked."""
    load = LoadAware(PassCost([(1, 1.0), (256, 2.0)]), k_max=8)
    for rule in load.rules.values():
        rule.explore_share = 0.0
    for _ in range(50):
        load.record("exact", 8, 8)
        load.record("lossy", 8, 1)
    rows = [fake_row("exact", 4), fake_row("lossy", 8), fake_row("lossy", 1, load_aware=False)]  # + an NTP row
    assert load.caps(rows) == {"exact": 4, "lossy": 1}
    fixed_verify = fake_row("exact", 8, load_aware=False)  # feeds 7 masks anyway: using them costs nothing
    assert load.caps([fake_row("lossy", 8), fixed_verify]) == {"lossy": 8}
    assert load.caps([fake_row("exact", 8)]) == {"exact": 8}
    assert load.chosen == {"exact": {4: 1, 8: 1}, "lossy": {1: 1, 8: 1}}


def test_a_cap_limits_masks_and_lookup_drafts_but_feeds_the_drafts_already_made(peaked, monkeypatch):
    """Cap 4 feeds 3 masks; the next pass, capped to 1, still feeds the 3 drafts those masks made (paid
    for) and no masks, and counts 1 + 3 proposals; then plain 1-token passes. Output: greedy."""
    monkeypatch.setattr("selfmtp.decoding.verify.DRAFT_MIN_CONFIDENCE", 0.0)  # every mask proposal drafts
    prompt = peaked.encode("The capital of France is", chat=False)
    decoder = BatchDecoder(peaked.model, tokenizer=peaked.tokenizer)
    row = decoder.add(prompt, Verify(4), max_new_tokens=20, load_aware=True)
    (first,) = decoder.step(max_proposals=4)
    assert row.state.tokens_fed == [len(prompt) + 3] and first.proposed == 1  # nothing paid before it
    (second,) = decoder.step(max_proposals=1)
    assert row.state.tokens_fed[-1] == 1 + 3 and second.proposed == 4
    for _ in range(3):
        (event,) = decoder.step(max_proposals=1)
        assert row.state.tokens_fed[-1] == 1 and event.proposed == 1 and len(event.token_ids) == 1
    while decoder.active:
        decoder.step(max_proposals=1)
    assert row.token_ids == greedy(peaked, prompt, 20)


class RecordingModel:
    """The model, recording what every forward pass is fed."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kwargs):
        self.calls.append({"input_ids": kwargs["input_ids"].clone(), "logits_to_keep": kwargs["logits_to_keep"]})
        return self.model(**kwargs)


def test_a_cap_of_one_is_the_ntp_pass_for_every_row_kind(peaked, monkeypatch):
    """After a pass at cap 4 that made drafts and kept several tokens, a batch of a lossy auto row, an
    exact auto row with lookup and an NTP row at cap 1 feeds the tokens and drafts that pass paid for
    (the rule charged them to it), then exactly what an all-NTP batch feeds: one token per row, no
    mask, no lookup draft, one logit column; and every row gets the tokens it gets alone."""
    monkeypatch.setattr("selfmtp.decoding.verify.DRAFT_MIN_CONFIDENCE", 0.0)  # every mask proposal drafts
    prompts = [peaked.encode(text, chat=False) for text in (REPEATS, "The capital of France is", "Once upon a")]
    recorder = RecordingModel(peaked.model)
    decoder = BatchDecoder(recorder, tokenizer=peaked.tokenizer)
    kinds = [(ConfAdapt(1e-9, 4), True), (Verify(4, lookup=True), True), (NTP(), False)]  # tau ~0: keeps all 4
    rows = [decoder.add(p, s, max_new_tokens=12, load_aware=aware) for p, (s, aware) in zip(prompts, kinds, strict=True)]
    decoder.step(max_proposals=4)
    assert rows[1].exact.drafts and len(rows[0].state.pending) == 4  # drafts made, tokens kept
    del recorder.calls[:]
    while decoder.active:
        decoder.step(max_proposals=1)
    # first pass: the lossy row's 4 kept tokens and the exact row's token + 3 drafts, all paid for already
    assert [row.state.tokens_fed[1] for row in rows] == [4, 1 + 3, 1]
    assert [call["input_ids"].shape[1] for call in recorder.calls] == [4] + [1] * (len(recorder.calls) - 1)
    assert [call["logits_to_keep"] for call in recorder.calls] == [4] + [1] * (len(recorder.calls) - 1)
    assert not any(bool((call["input_ids"] == decoder.mask_id).any()) for call in recorder.calls)
    assert {n for row in rows for n in row.state.tokens_fed[2:]} == {1}
    assert [row.token_ids for row in rows[1:]] == [greedy(peaked, p, 12) for p in prompts[1:]]


def test_masks_paid_for_that_draft_nothing_count_as_rejections(peaked, monkeypatch):
    """Masks whose proposals are too unconfident to feed cost a pass its width and gave nothing: the next
    pass counts 1 + 3 proposals with 1 token kept, so the rule's stats see the masks did not pay."""
    monkeypatch.setattr("selfmtp.decoding.verify.DRAFT_MIN_CONFIDENCE", 1.01)  # no proposal is ever confident
    prompt = peaked.encode("The capital of France is", chat=False)
    load = LoadAware(FLAT, k_max=8)
    decoder = BatchDecoder(peaked.model, tokenizer=peaked.tokenizer, load_aware=load)
    row = decoder.add(prompt, Verify(4), max_new_tokens=20, load_aware=True)
    decoder.step(max_proposals=4)
    (event,) = decoder.step(max_proposals=4)
    assert row.state.tokens_fed == [len(prompt) + 3, 1 + 1] and event.proposed == 4  # a miss: 1 mask next
    assert load.rules["exact"].stats.seen[2] == 1 and load.rules["exact"].stats.kept[2] == 0


@pytest.mark.parametrize("strategy", [Verify(4), Verify(4, lookup=True)], ids=lambda s: s.name)
def test_where_a_token_costs_a_pass_exact_rows_fall_back_to_ntp_passes(peaked, strategy):
    prompt = peaked.encode(REPEATS, chat=False)
    load = LoadAware(LINEAR, k_max=8)
    (result,) = generate_batch(peaked.model, [prompt], strategy, max_new_tokens=24, load_aware=load)
    assert load.chosen["exact"] == {1: result.forward_passes}  # never a mask nor a draft, not even to explore
    assert result.tokens_fed == [len(prompt)] + [1] * (result.forward_passes - 1)
    assert result.token_ids == greedy(peaked, prompt, 24)


def test_where_passes_cost_the_same_exact_rows_learn_to_feed_drafts_that_pay(peaked):
    """Lookup drafts on text that repeats are confirmed: on a flat curve the cap climbs to K, most
    drafts fed are accepted, and fewer passes than NTP give the same tokens."""
    prompt = peaked.encode(REPEATS, chat=False)
    load = LoadAware(FLAT, k_max=8)
    (result,) = generate_batch(peaked.model, [prompt], Verify(4, lookup=True), max_new_tokens=40, load_aware=load)
    assert max(load.chosen["exact"]) == 4 and load.rules["exact"].stats.kept[2] > 0
    assert result.lookup_accepted >= 10 and result.forward_passes < 0.7 * 40
    assert result.token_ids == greedy(peaked, prompt, 40)


def test_mixed_batch_with_a_late_joiner_gives_every_row_its_own_output(peaked):
    """auto:verify rows beside NTP, fixed verify, ConfAdapt and auto ConfAdapt rows, one joining a running
    batch: each row's tokens are those it gives alone (static:1 for every exact row)."""
    texts = [REPEATS, "Once upon a time there was", "The quick brown fox", "x y x y x y", "A late prompt joins"]
    prompts = [peaked.encode(text, chat=False) for text in texts]
    specs = [(Verify(4, lookup=True), True), (NTP(), False), (ConfAdapt(0.6, 4), True), (Verify(3), False),
             (Verify(4), True)]  # fmt: skip
    load = LoadAware(FLAT, k_max=8)
    decoder = BatchDecoder(peaked.model, tokenizer=peaked.tokenizer, compact_cache=True, load_aware=load)
    rows = [decoder.add(p, s, max_new_tokens=24, load_aware=a) for p, (s, a) in zip(prompts[:4], specs, strict=False)]
    for _ in range(3):
        decoder.step()
    rows.append(decoder.add(prompts[4], specs[4][0], max_new_tokens=24, load_aware=True))
    while decoder.active:
        decoder.step()
    for prompt, (strategy, _), row in zip(prompts, specs, rows, strict=True):
        reference = Static(1) if isinstance(strategy, Verify) else strategy
        alone = generate_batch(peaked.model, [prompt], reference, max_new_tokens=24)[0]
        assert row.token_ids == alone.token_ids, strategy.name
    assert set(load.chosen) == {"exact", "lossy"} and max(load.chosen["exact"]) > 1


def test_generate_takes_the_auto_verify_name(peaked):
    prompt = "a b c d a b c d a b c"
    result = peaked.generate(prompt, strategy="auto:verify:4:lookup", max_new_tokens=16, chat=False)
    assert result.token_ids == peaked.generate(prompt, strategy="ntp", max_new_tokens=16, chat=False).token_ids
    assert peaked.load_aware().chosen["exact"]  # the rule chose every pass's cap
