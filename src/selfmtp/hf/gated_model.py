"""A gated model as a transformers class: what an exported gated checkpoint's `trust_remote_code` code loads.

A gated model's deltas act only where the input token is `<mtp>` (models/gated.py): no set of plain Llama
weights computes that, so stock `AutoModelForCausalLM` cannot express it. `selfmtp export` writes the base
weights and the deltas into one checkpoint whose config names these classes (`auto_map`, through a one-line
`modeling_selfmtp_gated.py` beside it); `from_pretrained(..., trust_remote_code=True)` builds a Llama, puts the
gate in with the same `apply_gate` training used, and loads every weight. Real tokens then compute exactly the
base model; `<mtp>` positions get the deltas. Llama-architecture bases only (SmolLM2, the tiny models).

The config gets its own `model_type`, so a stock load without `trust_remote_code` stops with transformers'
"contains custom code" error instead of silently loading the base without its gate.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from selfmtp.models.gated import apply_gate
from selfmtp.models.mtp_token import MTP_CONFIG_KEY

GATED_CONFIG_KEY = "selfmtp_gated"  # {"rank", "alpha", "head"}: the gate's settings, as in a gated dir's selfmtp.json


class SelfMTPGatedLlamaConfig(LlamaConfig):
    model_type = "selfmtp_gated_llama"


class SelfMTPGatedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SelfMTPGatedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        settings = getattr(config, GATED_CONFIG_KEY, None)
        token = getattr(config, MTP_CONFIG_KEY, None)
        if not isinstance(settings, dict) or not isinstance(token, int):
            raise ValueError(f"a selfmtp gated checkpoint's config needs `{GATED_CONFIG_KEY}` and `{MTP_CONFIG_KEY}`")
        apply_gate(self, mtp_token_id=token, rank=int(settings["rank"]), alpha=settings.get("alpha"),
                   head=bool(settings.get("head", False)))
