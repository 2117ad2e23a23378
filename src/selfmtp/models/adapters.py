"""LoRA adapter checkpoints: what `selfmtp train --lora-rank R --lora-export adapter` writes, loaded back.

An adapter directory holds peft's `adapter_config.json` + `adapter_model.safetensors` (the LoRA
matrices and the trained `<mtp>` embedding rows), the tokenizer with `<mtp>`, and `selfmtp.json`,
which names the base model by the `--model` spec it was trained from. peft records the base by the
path it was loaded from, which for an alias such as `smollm2-135m` is a cache directory that a fresh
machine does not have, hence our own record. Loading resolves the base spec, adds `<mtp>` (the same
id, appended after the base vocabulary), applies the adapter and merges it, so every caller gets a
plain model exactly like the `--lora-export merged` checkpoint of the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfmtp.errors import SelfMTPError

ADAPTER_CONFIG = "adapter_config.json"
BASE_RECORD = "selfmtp.json"


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def write_base_record(directory: Path, base_spec: str, *, extra: dict | None = None) -> None:
    """Record the base model spec beside the adapter (absolute if it is a local directory), with `extra`
    fields (a gated model's settings, models/gated.py)."""
    base = Path(base_spec).expanduser()
    spec = str(base.resolve()) if base.is_dir() else base_spec
    (directory / BASE_RECORD).write_text(json.dumps({"base_model": spec, **(extra or {})}, indent=2) + "\n")


def base_spec(directory: Path) -> str:
    record = directory / BASE_RECORD
    try:
        if record.is_file():
            return str(json.loads(record.read_text())["base_model"])
        spec = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SelfMTPError(f"{directory}: unreadable adapter record ({exc.__class__.__name__}: {exc})") from exc
    if not spec:
        raise SelfMTPError(f"{directory}: the adapter names no base model (no {BASE_RECORD}, no base_model_name_or_path)")
    return spec


def load_adapter_dir(directory: str | Path, load_base, *, seed: int):
    """(merged model, tokenizer) for a LoRA adapter directory, in float32 on the CPU.

    `load_base(spec, seed=...)` -> (model, tokenizer) loads the base model (models/loading.py's
    `load_model`, passed in so that this module does not import the resolver that dispatches to it).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from selfmtp.models.mtp_token import mtp_token_id

    directory = Path(directory)
    spec = base_spec(directory)
    try:
        base, _ = load_base(spec, seed=seed)
    except SelfMTPError as exc:
        raise SelfMTPError(f"{directory}: could not load its base model {spec!r}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(directory)
    saved_id = tokenizer.convert_tokens_to_ids("<mtp>")
    if saved_id != mtp_token_id(base):
        raise SelfMTPError(f"{directory}: <mtp> is token {saved_id} in the adapter's tokenizer but "
                           f"{mtp_token_id(base)} on its base {spec!r}: the adapter was trained on another base")
    try:
        model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    except Exception as exc:  # peft raises ValueError/KeyError/RuntimeError for mismatched adapters
        raise SelfMTPError(f"could not apply the adapter in {directory} to {spec!r}: {exc}") from exc
    return model, tokenizer
