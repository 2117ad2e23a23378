"""`selfmtp export --model SPEC`: any model as a directory `AutoModelForCausalLM` loads, with `custom_generate/`.

An ordinary model (plain checkpoint, merged adapter, GGUF, tiny) is saved as is (`save_checkpoint`, which writes
`custom_generate/`); a gated one as the base weights plus the deltas, with `trust_remote_code` model code
(hf/gated_model.py) that applies the gate inside the forward.
"""

from __future__ import annotations

from pathlib import Path

from selfmtp.errors import SelfMTPError
from selfmtp.models.hf_files import write_custom_generate

REMOTE_CODE_MODULE = "modeling_selfmtp_gated"

REMOTE_CODE_PY = '''"""A selfmtp gated model: Llama with deltas that act only at `<mtp>` positions, applied inside the forward
(selfmtp.hf.gated_model). Load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)."""

from selfmtp.hf.gated_model import SelfMTPGatedLlamaConfig, SelfMTPGatedLlamaForCausalLM  # noqa: F401
'''


def export_model(spec: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write `spec` (any `--model` spec) as a directory transformers loads, with `custom_generate/`, atomically.

    A gated model becomes base weights + deltas with `trust_remote_code` model code; everything else a plain
    checkpoint (stock `from_pretrained`, no remote code). float32, as selfmtp decodes on a CPU."""
    from selfmtp.models.gated import is_gated
    from selfmtp.models.loading import load_model, save_checkpoint

    model, tokenizer = load_model(spec, seed=seed)
    if not is_gated(model):
        return save_checkpoint(model, tokenizer, out_dir)  # writes custom_generate/ too
    return _save_gated_checkpoint(model, tokenizer, Path(out_dir))


def _save_gated_checkpoint(model, tokenizer, out_dir: Path) -> Path:
    from selfmtp.files import atomic_dir_write
    from selfmtp.hf.gated_model import GATED_CONFIG_KEY, SelfMTPGatedLlamaConfig, SelfMTPGatedLlamaForCausalLM

    if model.config.model_type != "llama":
        raise SelfMTPError(f"exporting a gated model needs a Llama-architecture base (SmolLM2, tiny); this one is "
                           f"{model.config.model_type!r}: load the gated directory with selfmtp instead")
    settings = {key: getattr(model.gated, key) for key in ("rank", "alpha", "head")}
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = SelfMTPGatedLlamaConfig(**fields)
    setattr(config, GATED_CONFIG_KEY, settings)
    config.auto_map = {"AutoConfig": f"{REMOTE_CODE_MODULE}.SelfMTPGatedLlamaConfig",
                       "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.SelfMTPGatedLlamaForCausalLM"}
    exported = SelfMTPGatedLlamaForCausalLM(config)
    exported.load_state_dict(model.state_dict(), strict=True)  # same names: the same apply_gate built both
    exported.generation_config = model.generation_config
    exported.eval()

    def write(tmp: Path) -> None:
        exported.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / f"{REMOTE_CODE_MODULE}.py").write_text(REMOTE_CODE_PY)
        write_custom_generate(tmp)

    atomic_dir_write(out_dir, write)
    return out_dir
