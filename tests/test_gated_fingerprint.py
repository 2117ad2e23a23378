"""A gated directory refuses a base whose weights differ anywhere from the ones it was trained on, hashes the
base once per identity of its files, and still loads directories written with fingerprint version 1."""

from __future__ import annotations

import json

import pytest
import torch

import selfmtp.models.gated_dir as gated_dir
from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import apply_gate
from selfmtp.models.gated_dir import sampled_base_fingerprint, save_gated_dir
from selfmtp.models.loading import load_model, save_checkpoint
from selfmtp.models.mtp_token import mtp_token_id


@pytest.fixture
def gated_over_a_base_dir(tmp_path):
    """(base checkpoint directory, gated directory trained over it: random rank-2 deltas, not zero)."""
    base_dir, out = tmp_path / "base", tmp_path / "gated"
    model, tokenizer = load_model("tiny", seed=0)
    save_checkpoint(model, tokenizer, base_dir)
    model, tokenizer = load_model(str(base_dir), seed=0)
    apply_gate(model, mtp_token_id=mtp_token_id(model), rank=2)
    save_gated_dir(model, tokenizer, out, base_spec=str(base_dir), seed=0)
    return base_dir, out


def change_base(base_dir, name: str, change) -> None:
    model, tokenizer = load_model(str(base_dir), seed=0, add_mtp=False)
    with torch.no_grad():
        change(model.get_parameter(name))
    save_checkpoint(model, tokenizer, base_dir)  # the base rewritten in place (new files, new mtimes)


# Each change is outside what fingerprint version 1 read (the first 4096 values of each gated linear).
CHANGES = {
    "model.norm.weight": lambda w: w.mul_(1.5),
    "model.layers.1.mlp.down_proj.weight": lambda w: w.view(-1)[-1].add_(1e-3),
    "model.embed_tokens.weight": lambda w: w[7].add_(1e-3),  # a real token's row (the head is tied to it)
}


@pytest.mark.parametrize("name", CHANGES)
def test_a_change_anywhere_in_the_base_is_refused(gated_over_a_base_dir, name):
    base_dir, out = gated_over_a_base_dir
    load_model(str(out))  # fine as trained (and now cached)
    change_base(base_dir, name, CHANGES[name])
    with pytest.raises(SelfMTPError, match="fingerprint mismatch"):
        load_model(str(out))


def test_the_base_is_hashed_once_per_identity_of_its_files(gated_over_a_base_dir, monkeypatch):
    base_dir, out = gated_over_a_base_dir
    real, calls = gated_dir.base_weights_fingerprint, []
    monkeypatch.setattr(gated_dir, "base_weights_fingerprint", lambda model: calls.append(1) or real(model))
    first, _ = load_model(str(out))
    again, _ = load_model(str(out))
    assert len(calls) == 1  # the second load read the cache
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    change_base(base_dir, "model.norm.weight", lambda w: w.mul_(1.0))  # same weights, rewritten: hashed again
    load_model(str(out))
    assert len(calls) == 2


def test_a_directory_with_a_version_1_fingerprint_still_loads_and_is_checked(gated_over_a_base_dir):
    """Directories written before version 2 (such as older `train --gated` outputs) hold only "base_fingerprint",
    the sampled hash: it is still checked, by its own rule."""
    base_dir, out = gated_over_a_base_dir
    model, _ = load_model(str(out))
    record_path = out / "selfmtp.json"
    record = json.loads(record_path.read_text())
    assert record["gated"]["base_fingerprint_version"] == 2
    del record["gated"]["base_fingerprint_version"]
    record["gated"]["base_fingerprint"] = sampled_base_fingerprint(model)
    record_path.write_text(json.dumps(record))
    load_model(str(out))
    change_base(base_dir, "model.layers.0.self_attn.q_proj.weight", lambda w: w.view(-1)[0].add_(1e-3))
    with pytest.raises(SelfMTPError, match="fingerprint mismatch"):
        load_model(str(out))
    record["gated"]["base_fingerprint_version"] = 3
    record_path.write_text(json.dumps(record))
    with pytest.raises(SelfMTPError, match="version 3 is unknown"):
        load_model(str(out))
