"""evaluation/draft_headroom.py (`selfmtp eval --draft-headroom`) counts `verify`'s passes offline from one
teacher-forced pass: its count must equal the pass count of a real `verify` decode of the same model, under
each draft rule.

The reference is the decoder itself (batch.BatchDecoder through MTPModel.generate), which computes every
pass with a KV cache; the tool reads the same proposals from one uncached pass over the whole answer. In
float32 the two differ by ~1e-5 in a logit, so the test first checks that every argmax the count depends
on has a margin of CLEAR_MARGIN (100x that), and the equality does not hinge on float noise.
"""

from __future__ import annotations

import pytest
import torch

from selfmtp.api import MTPModel
from selfmtp.decoding.rows import StopRules
from selfmtp.decoding.strategies import Verify
from selfmtp.models.loading import load_model
from selfmtp.models.mtp_token import mtp_token_id

CLEAR_MARGIN = 1e-3
K = 4
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def tool():
    from selfmtp.evaluation import draft_headroom

    return draft_headroom


@pytest.fixture(scope="module")
def mtp():
    model, tokenizer = load_model("tiny-gsm-teacher", seed=0)  # pretrained: clear greedy margins
    model.eval()
    return MTPModel(model, tokenizer)


def min_margin(model, prompt: list[int], answer: list[int]) -> float:
    """Smallest top-1 minus top-2 logit over the real greedy choices and every mask proposal."""
    from selfmtp.training.layout import RegionPlan, assemble_layout
    from selfmtp.training.objective import SelectedLogits

    ids = torch.tensor([prompt + answer])
    starts = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    ks = torch.clamp(ids.shape[1] - 1 - starts, max=K)
    layout = assemble_layout(ids, torch.tensor([len(prompt)]), torch.tensor([ids.shape[1]]),
                             RegionPlan(starts[None], ks[None]), mtp_token_id=mtp_token_id(model), eos_token_id=-1,
                             pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        logits = SelectedLogits(model)(layout.input_ids, layout.position_ids, layout.attention_mask,
                                       layout.sup_batch, layout.sup_pos).float()  # fmt: skip
    logits[:, mtp_token_id(model)] = float("-inf")
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("rule", ["rule", "threshold", "all"])
def test_offline_count_equals_the_decoders_passes(tool, mtp, rule, tree):
    from selfmtp.evaluation.tasks import load_task

    task = load_task("tiny-gsm", limit=2)
    texts = [task.prompt(item, mtp.tokenizer) for item in task.items]
    prompts = [mtp.encode(text, chat=False) for text in texts]
    strategy = Verify(K, tree=tree)
    stops = StopRules(frozenset(mtp.stop_token_ids), [], mtp.tokenizer)
    with tool.draft_rule(rule):
        decoded = mtp.generate(texts, strategy=strategy, max_new_tokens=NEW_TOKENS, chat=False)
        for prompt, result in zip(prompts, decoded, strict=True):
            answer = list(result.token_ids)
            assert min_margin(mtp.model, prompt, answer) > CLEAR_MARGIN, "a near tie: pick another seed"
            forced = tool.teacher_forced(mtp.model, prompt, answer, K)
            assert forced["real"].tolist() == answer  # the pass's own greedy choices are the decoded text
            passes, emitted, fed = tool.simulate(strategy, prompt, answer, forced, NEW_TOKENS, stops)
            assert (passes, emitted, fed) == (result.forward_passes, len(answer), sum(result.tokens_fed))


def test_rules_differ_where_they_should(tool):
    """`all` feeds every proposal (threshold 0), `threshold` keeps 0.5 but never narrows or backs off."""
    import selfmtp.decoding.verify as verify_rule

    before = verify_rule.DRAFT_MIN_CONFIDENCE
    with tool.draft_rule("all"):
        assert verify_rule.DRAFT_MIN_CONFIDENCE == 0.0 and verify_rule.MISS_WIDTH == 0
    with tool.draft_rule("threshold"):
        assert verify_rule.DRAFT_MIN_CONFIDENCE == before and verify_rule.MISSES_BEFORE_BACKOFF > 10**6
    assert (verify_rule.DRAFT_MIN_CONFIDENCE, verify_rule.MISS_WIDTH) == (before, 1)


def test_the_eval_flag_counts_a_finished_eval_run(tmp_path, capsys):
    """`selfmtp eval ... --draft-headroom verify:K` on that eval's own run: the simulated real rule gives the
    measured pass count on every answer; before the run exists, or for a strategy without mask drafts, a
    one-line error and status 2."""
    import json

    from selfmtp.cli import main

    flags = ["eval", "--model", "tiny-gsm-teacher", "--task", "tiny-gsm", "--limit", "2", "--dtype", "float32",
             "--max-new-tokens", str(NEW_TOKENS), "--output", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main([*flags, "--draft-headroom", f"verify:{K}"]) == 2
    assert f"no finished verify:{K} run" in capsys.readouterr().err
    assert main([*flags, "--draft-headroom", "confadapt:0.9"]) == 2
    assert "--draft-headroom takes verify:K" in capsys.readouterr().err
    assert main([*flags, "--strategies", f"verify:{K}"]) == 0
    capsys.readouterr()
    assert main([*flags, "--draft-headroom", f"verify:{K}", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # the summary: without the per-answer records
    assert printed["rule_passes_equal"] == 2 and "per_item" not in printed
    result = json.loads((tmp_path / f"draft_headroom_verify_{K}.json").read_text())
    assert result["answers"] == 2 and result["rule_passes_equal"] == 2 and result["real_greedy_agreement"] == 1.0
    assert result["measured_passes"] == result["totals"][f"verify:{K}/rule"]["passes"]
    assert set(result["tokens_per_pass_pooled"]) == {f"verify:{K}{tree}/{rule}" for tree in ("", ":tree")
                                                     for rule in ("rule", "threshold", "all")}  # fmt: skip
