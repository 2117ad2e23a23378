"""A gated directory (`train --gated`'s final/): the gated weights (safetensors), the base's `<mtp>` surgery
rows, the tokenizer and `selfmtp.json` naming the base spec; a model spec of its own (models/loading.py).

`selfmtp.json` also holds a fingerprint of the base weights it was trained on, which loading checks: a base
rewritten in place, or another checkpoint of the same architecture, is refused instead of silently giving
other outputs. Version 2 hashes every byte of the base, once per identity of the base files (cached).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import (
    GATED_TARGETS,
    GatedLinear,
    apply_gate,
    gated_state,
    is_gated_weight,
    load_gated_state,
)
from selfmtp.models.hf_files import GATED_WEIGHTS

SURGERY_ROWS = ("surgery.mtp_input_row", "surgery.mtp_output_row")


def is_gated_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / GATED_WEIGHTS).is_file()


def save_gated_dir(model: nn.Module, tokenizer, out_dir, *, base_spec: str, seed: int, k_max: int | None = None,
                   dtype: torch.dtype | None = None):
    """Write `out_dir` atomically: the gated weights (safetensors), the base's `<mtp>` surgery rows (so
    loading does not depend on the seed it is loaded with), the tokenizer, and `selfmtp.json` naming the
    base spec and the seed it was loaded with (`tiny` weights depend on it), the gate settings, the trained
    `k_max` (loading puts it in the config, where bare `verify` reads it) and a fingerprint of the base weights. `dtype` (e.g. bfloat16, to commit a small file) stores the gated
    weights rounded to it; the surgery rows stay as they are, since they belong to the base model."""
    from pathlib import Path

    from safetensors.torch import save_file

    from selfmtp.files import atomic_dir_write
    from selfmtp.models.adapters import write_base_record
    from selfmtp.models.hf_files import write_custom_generate, write_gated_dir_marker
    from selfmtp.models.mtp_token import mtp_token_id

    token = mtp_token_id(model)
    tensors = {name: t.to(dtype or t.dtype) for name, t in gated_state(model).items()} | _surgery_rows(model, token)
    record = {"base_seed": seed, "gated": {"rank": model.gated.rank, "alpha": model.gated.alpha, "targets": list(GATED_TARGETS),
                        "head": model.gated.head,
                        "mtp_token_id": token, "base_fingerprint": base_weights_fingerprint(model),
                        "base_fingerprint_version": BASE_FINGERPRINT_VERSION}}
    if k_max is not None:
        record["gated"]["k_max"] = int(k_max)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / GATED_WEIGHTS), metadata={"format": "selfmtp-gated"})
        tokenizer.save_pretrained(tmp)
        write_base_record(tmp, base_spec, extra=record)
        write_gated_dir_marker(tmp)  # a stock from_pretrained then names `selfmtp export`
        write_custom_generate(tmp)

    atomic_dir_write(Path(out_dir), write)
    return Path(out_dir)


def _surgery_rows(model: nn.Module, token: int) -> dict[str, torch.Tensor]:
    rows = {SURGERY_ROWS[0]: model.get_input_embeddings().weight[token]}
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        rows[SURGERY_ROWS[1]] = output.weight[token]
    return {name: row.detach().cpu().contiguous() for name, row in rows.items()}


def load_gated_dir(directory, load_base, *, seed: int, base_identity=lambda spec, seed: None):
    """(gated model, tokenizer) for a directory written by `save_gated_dir`, float32 on the CPU.

    `load_base(spec, seed=...)` -> (model, tokenizer) loads the base model, and `base_identity(spec, seed)`
    names its files' identity for the fingerprint cache, or None (models/loading.py's `load_model` and
    `base_identity`, passed in so that this module does not import the resolver that dispatches to it).
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from selfmtp.models.adapters import BASE_RECORD, base_spec
    from selfmtp.models.mtp_token import K_MAX_CONFIG_KEY, mtp_token_id

    directory = Path(directory)
    try:
        record = json.loads((directory / BASE_RECORD).read_text())
        settings, seed = record["gated"], int(record.get("base_seed", seed))
        spec = base_spec(directory)
        tensors = load_file(str(directory / GATED_WEIGHTS))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise SelfMTPError(f"{directory}: unreadable gated model ({exc.__class__.__name__}: {exc})") from exc
    try:
        model, tokenizer = load_base(spec, seed=seed)
    except SelfMTPError as exc:
        raise SelfMTPError(f"{directory}: could not load its base model {spec!r}: {exc}") from exc
    token = mtp_token_id(model)
    if token != settings.get("mtp_token_id"):
        raise SelfMTPError(f"{directory}: <mtp> is token {settings.get('mtp_token_id')} in the gated model but {token} "
                           f"on its base {spec!r}: it was trained on another base")
    with torch.no_grad():
        for name, weight in ((SURGERY_ROWS[0], model.get_input_embeddings().weight),
                             (SURGERY_ROWS[1], getattr(model.get_output_embeddings(), "weight", None))):
            if name in tensors:
                weight[token] = tensors.pop(name)
    apply_gate(model, mtp_token_id=token, rank=int(settings["rank"]), alpha=settings.get("alpha"),
               head=bool(settings.get("head", False)))
    load_gated_state(model, tensors, where=str(directory))
    if _base_fingerprint(model, settings, identity=base_identity(spec, seed), where=directory) != settings.get("base_fingerprint"):
        raise SelfMTPError(f"{directory}: its base {spec!r} holds other weights than the ones it was trained on "
                           "(fingerprint mismatch)")
    if isinstance(settings.get("k_max"), int):
        setattr(model.config, K_MAX_CONFIG_KEY, settings["k_max"])
    model.eval()
    return model, tokenizer


BASE_FINGERPRINT_VERSION = 2  # what `base_weights_fingerprint` computes; 1 is `sampled_base_fingerprint`


def base_weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every base tensor of a gated model (parameters and buffers other than the gated weights):
    dtype, shape and all bytes, in name order. The `<mtp>` rows of the embeddings and head are left out: they
    are the gated directory's own (its surgery rows), not the base's. Wrapping a linear does not change the
    order, so this is also the fingerprint of the ungated base. It reads every byte (0.6-0.8 s for 135M
    parameters on one core): loading uses `cached_base_fingerprint`."""
    token = model.gated.gate.mtp_token_id
    own_row = {id(model.get_input_embeddings().weight), id(getattr(model.get_output_embeddings(), "weight", None))}
    tensors = dict(model.named_buffers()) | dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if is_gated_weight(name):
            continue
        tensor = tensors[name].detach()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
        for part in (tensor[:token], tensor[token + 1:]) if id(tensors[name]) in own_row else (tensor,):
            digest.update(part.reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def sampled_base_fingerprint(model: nn.Module) -> str:
    """Fingerprint version 1, kept to check gated directories written before version 2: every gated linear's
    shape and its first 4096 values, hashed. It misses a change anywhere else."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, GatedLinear):
            weight = module.base.weight.detach()
            digest.update(f"{name}:{tuple(weight.shape)}".encode())
            digest.update(weight.reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _base_fingerprint(model: nn.Module, settings: dict, *, identity: str | None, where) -> str:
    """The fingerprint of `model`'s base in the version `settings` (a selfmtp.json "gated" record) names;
    version 2 cached per identity of the base files (`cached_base_fingerprint`)."""
    version = settings.get("base_fingerprint_version", 1)  # records before version 2 name none
    if version == 1:
        return sampled_base_fingerprint(model)
    if version != BASE_FINGERPRINT_VERSION:
        raise SelfMTPError(f"{where}: base fingerprint version {version!r} is unknown to this selfmtp (it knows 1 "
                           f"and {BASE_FINGERPRINT_VERSION}): it was written by a newer one")
    return cached_base_fingerprint(model, identity)


def cached_base_fingerprint(model: nn.Module, identity: str | None) -> str:
    """`base_weights_fingerprint(model)`, kept in the cache under `identity`: the identity of the base files
    (models.loading.base_identity: spec, seed, each file's path, size and mtime) and of the libraries that
    build the weights. None (a tiny model is cheap to hash; a hub id has no file identity to trust): hashed
    every time."""
    import transformers

    from selfmtp.files import cache_dir, write_text_atomic

    if identity is None:
        return base_weights_fingerprint(model)
    identity = (f"base fingerprint v{BASE_FINGERPRINT_VERSION}|{identity}|"
                f"torch {torch.__version__}|transformers {transformers.__version__}")
    path = cache_dir() / "base-fingerprints" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    try:
        cached = path.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    value = base_weights_fingerprint(model)
    write_text_atomic(path, value + "\n")
    return value
