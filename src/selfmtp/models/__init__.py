"""Models: resolve a `--model` spec, add the `<mtp>` token, save and fingerprint checkpoints.

`loading` holds the spec rules and the atomic save; `mtp_token` the `<mtp>` surgery; `adapters` reads and writes the
LoRA adapter directories that `selfmtp train --lora-export adapter` produces.
"""

from selfmtp.models.adapters import is_adapter_dir
from selfmtp.models.loading import (
    DEFAULT_MODEL,
    ModelSpec,
    describe_model,
    load_model,
    load_tokenizer,
    model_fingerprint,
    parse_model_spec,
    save_checkpoint,
)
from selfmtp.models.mtp_token import MTP_TOKEN, add_mtp_token, mtp_token_id

__all__ = [
    "DEFAULT_MODEL",
    "MTP_TOKEN",
    "ModelSpec",
    "add_mtp_token",
    "describe_model",
    "is_adapter_dir",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "mtp_token_id",
    "parse_model_spec",
    "save_checkpoint",
]
