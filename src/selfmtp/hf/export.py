"""Model directories that plain transformers uses: `custom_generate/` beside every one selfmtp writes, and
`export_model`, which turns any `--model` spec into a directory `AutoModelForCausalLM` loads.

- `write_custom_generate(dir)`: `custom_generate/generate.py` (one import of `selfmtp.hf.generate.generate`:
  the same decode loop as `selfmtp generate`, no second copy) and `requirements.txt` (`selfmtp`, which
  transformers checks before running it). Every writer calls it: `save_checkpoint` (train `final/`, merged
  LoRA, the converted-model cache), `save_gated_dir`, the adapter export, and `export_model`.
- `write_gated_dir_marker(dir)`: a gated directory holds deltas, not a model; its `config.json` makes a stock
  `from_pretrained` stop with an error that names `selfmtp export` instead of "no config.json".
- `export_model(spec, out)`: an ordinary model (plain checkpoint, merged adapter, GGUF, tiny) is saved as is;
  a gated one as the base weights plus the deltas, with `trust_remote_code` model code (hf/gated_model.py)
  that applies the gate inside the forward.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfmtp import __version__
from selfmtp.errors import SelfMTPError

CUSTOM_GENERATE_DIR = "custom_generate"
REMOTE_CODE_MODULE = "modeling_selfmtp_gated"
GATED_DIR_MODEL_TYPE = (
    "selfmtp-gated: gated MTP deltas without their base weights, which transformers alone cannot load. "
    "Load this directory with selfmtp (`--model DIR`, `selfmtp.api.MTPModel.from_pretrained(DIR)`), or write a "
    "transformers checkpoint of it with `selfmtp export --model DIR --output OUT` and load OUT with "
    "trust_remote_code=True"
)

CUSTOM_GENERATE_PY = '''"""Multi-token decoding by selfmtp (https://github.com/selfmtp), for transformers:

    model.generate(**inputs, custom_generate=THIS_MODEL_DIR, trust_remote_code=True,
                   strategy="verify:8", max_new_tokens=128)

strategy: "verify[:K]" (default: exact, the model's own greedy output in fewer forward passes),
"confadapt:TAU[:KMAX]", "static:K" or "ntp". Returns what greedy `generate` returns (with
return_dict_in_generate=True also `forward_passes` per row). The decoding is selfmtp's own, imported
below (requirements.txt); docs/using-elsewhere.md in selfmtp says why and what is supported.
"""

from selfmtp.hf.generate import generate  # noqa: F401  (the function transformers calls)
'''

REMOTE_CODE_PY = '''"""A selfmtp gated model: Llama with deltas that act only at `<mtp>` positions, applied inside the forward
(selfmtp.hf.gated_model). Load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)."""

from selfmtp.hf.gated_model import SelfMTPGatedLlamaConfig, SelfMTPGatedLlamaForCausalLM  # noqa: F401
'''


def write_custom_generate(directory: str | Path) -> Path:
    """Write `directory/custom_generate/` (generate.py, requirements.txt). Call it on a directory being
    written (an atomic_dir_write temp dir), so the model and its decoder appear together."""
    target = Path(directory) / CUSTOM_GENERATE_DIR
    target.mkdir(parents=True, exist_ok=True)
    (target / "generate.py").write_text(CUSTOM_GENERATE_PY)
    (target / "requirements.txt").write_text(f"selfmtp>={__version__}\n")
    return target


def write_gated_dir_marker(directory: str | Path) -> None:
    """A gated directory's `config.json`: only a `model_type` that says what it is and how to export it
    (selfmtp reads `selfmtp.json`, never this file)."""
    marker = {"model_type": GATED_DIR_MODEL_TYPE, "selfmtp_format": "gated", "selfmtp_record": "selfmtp.json"}
    (Path(directory) / "config.json").write_text(json.dumps(marker, indent=2) + "\n")


def decoding_files(directory: str | Path) -> set[Path]:
    """The files of `directory` that selfmtp adds beside a model and that change no weight: `custom_generate/`,
    a gated directory's marker `config.json`. A model's fingerprint leaves them out, so a run started before they
    were written (or rewritten) still resumes."""
    from selfmtp.models.gated_dir import GATED_WEIGHTS

    directory = Path(directory)
    found = {f for f in (directory / CUSTOM_GENERATE_DIR).rglob("*") if f.is_file()}
    marker = directory / "config.json"
    if marker.is_file() and (directory / GATED_WEIGHTS).is_file():
        found.add(marker)
    return found


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
