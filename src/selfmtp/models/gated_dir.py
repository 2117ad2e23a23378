"""A gated directory (`train --gated`'s final/): the gated weights (safetensors), the base's `<mtp>` surgery
rows, the tokenizer and `selfmtp.json` naming the base spec; a model spec of its own (models/loading.py)."""

from __future__ import annotations

import torch
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.gated import (
    GATED_TARGETS,
    apply_gate,
    base_weights_fingerprint,
    gated_state,
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
                        "mtp_token_id": token, "base_fingerprint": base_weights_fingerprint(model)}}
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


def load_gated_dir(directory, load_base, *, seed: int):
    """(gated model, tokenizer) for a directory written by `save_gated_dir`, float32 on the CPU.

    `load_base(spec, seed=...)` -> (model, tokenizer) loads the base model (models/loading.py's
    `load_model`, passed in so that this module does not import the resolver that dispatches to it).
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
    if base_weights_fingerprint(model) != settings.get("base_fingerprint"):
        raise SelfMTPError(f"{directory}: its base {spec!r} holds other weights than the ones it was trained on "
                           "(fingerprint mismatch)")
    if isinstance(settings.get("k_max"), int):
        setattr(model.config, K_MAX_CONFIG_KEY, settings["k_max"])
    model.eval()
    return model, tokenizer
