"""The files selfmtp writes beside a model so that plain transformers can use it (docs/using-elsewhere.md).

- `write_custom_generate(dir)`: `custom_generate/generate.py` (one import of `selfmtp.hf.generate.generate`:
  the same decode loop as `selfmtp generate`, no second copy) and `requirements.txt` (`selfmtp`, which
  transformers checks before running it). Every writer calls it: `save_checkpoint` (train `final/`, merged
  LoRA, the converted-model cache), `save_gated_dir`, the adapter export, and `selfmtp export --model`.
- `write_gated_dir_marker(dir)`: a gated directory holds deltas, not a model; its `config.json` makes a stock
  `from_pretrained` stop with an error that names `selfmtp export` instead of "no config.json".
- `decoding_files(dir)`: those files, which change no weight (a model's fingerprint leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

from selfmtp import __version__

CUSTOM_GENERATE_DIR = "custom_generate"
GATED_WEIGHTS = "gated_model.safetensors"  # what makes a directory a gated one (models/gated_dir.py)

GATED_DIR_MODEL_TYPE = (
    "selfmtp-gated: gated MTP deltas without their base weights, which transformers alone cannot load. "
    "Load this directory with selfmtp (`--model DIR`, `selfmtp.api.MTPModel.from_pretrained(DIR)`), or write a "
    "transformers checkpoint of it with `selfmtp export --model DIR --output OUT` and load OUT with "
    "trust_remote_code=True"
)

CUSTOM_GENERATE_PY = '''"""Multi-token decoding by selfmtp (`pip install selfmtp`), for transformers:

    model.generate(**inputs, custom_generate=THIS_MODEL_DIR, trust_remote_code=True,
                   strategy="verify:8", max_new_tokens=128)

strategy: "verify[:K]" (default: exact, the model's own greedy output in fewer forward passes),
"confadapt:TAU[:KMAX]", "static:K" or "ntp". Returns what greedy `generate` returns (with
return_dict_in_generate=True also `forward_passes` per row). The decoding is selfmtp's own, imported
below (requirements.txt); docs/using-elsewhere.md in selfmtp says why and what is supported.
"""

from selfmtp.hf.generate import generate  # noqa: F401  (the function transformers calls)
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
    directory = Path(directory)
    found = {f for f in (directory / CUSTOM_GENERATE_DIR).rglob("*") if f.is_file()}
    marker = directory / "config.json"
    if marker.is_file() and (directory / GATED_WEIGHTS).is_file():
        found.add(marker)
    return found
