"""`selfmtp bench`: wall-clock decoding speed of our strategies beside the engines people use today.

One model object, one set of prompt ids, every engine measured in the same run and interleaved:
for each run, for each prompt, every engine in turn (the order rotating from prompt to prompt), so a
burst of background load hits all of them alike. Engines:

- each strategy through our KV-cached loop (`ntp` is always measured: it is the reference); an
  `auto` strategy (load-aware, e.g. `auto:verify:8`) probes the pass cost once before any timing
  and keeps its acceptance stats from prompt to prompt, as a running server would,
- `hf-generate`: transformers `generate`, greedy, on the same model object and prompt ids,
- `hf-prompt-lookup`: the same with transformers' prompt lookup decoding (`prompt_lookup_num_tokens`,
  n-gram drafts copied from the prompt and verified: greedy output, the lossless baseline people try first),
- `llama-cpp`: llama.cpp (llama-cpp-python) on the original GGUF, greedy, same prompt ids and
  torch's thread count; skipped with a note when the package or a GGUF is missing.

A warm-up pass of every engine comes first. Figures and how they are summarised: `bench_report.py`.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from selfmtp.errors import SelfMTPError
from selfmtp.evaluation.bench_report import Sample, format_markdown, summarize
from selfmtp.evaluation.pass_cost_bench import cpu_info
from selfmtp.files import write_json_atomic, write_text_atomic

BASELINES = ("hf-generate", "hf-prompt-lookup", "llama-cpp")
PROMPT_LOOKUP_TOKENS = 10  # drafts per lookup: transformers' documented example value
LLAMA_CPP_HINT = "pip install 'selfmtp[llama-cpp]'"


@dataclass
class BenchConfig:
    model: str
    prompts: str  # a prompts file, as for `selfmtp generate --prompts-file`
    strategies: list[str] = field(default_factory=lambda: ["ntp", "confadapt:0.9:4", "confadapt:0.9:8"])
    baselines: list[str] = field(default_factory=lambda: ["hf-generate"])
    runs: int = 3
    max_new_tokens: int = 128
    limit: int | None = None  # only the first N prompts
    gguf: str | None = None  # the GGUF llama.cpp runs (default: the model's own, when known)
    chat: bool | None = None  # None: chat template iff the tokenizer has one
    threads: int | None = None  # torch (and llama.cpp) threads; None: leave torch's setting
    warmup_tokens: int = 16
    seed: int = 0
    dtype: str = "auto"
    compare_dtypes: list[str] = field(default_factory=list)  # more dtypes whose ntp (and hf-generate) run beside
    device: str = "cpu"
    prepack: bool | None = None  # CPU: oneDNN-packed linears (models/prepack.py; None: bf16 packed, float32 not)
    progress: bool = True


@dataclass
class Timing:
    """One generation, timed from outside the engine's call."""

    tokens: list[int]
    seconds: float
    first_token_seconds: float | None  # None where the engine cannot tell
    first_tokens: int = 1  # tokens out at first_token_seconds (a multi-token pass gives several)
    passes: int | None = None
    tokens_fed: list[int] | None = None


def run_bench(config: BenchConfig, output_dir: str | Path) -> dict:
    """Measure, write `bench.json` and `bench.md` into `output_dir`, and return what bench.json holds."""
    from selfmtp.api import read_prompts

    strategies, baselines = _check(config)
    prompts = read_prompts(config.prompts)[: config.limit]
    if any(not p.strip() for p in prompts):
        raise SelfMTPError("empty prompt in the prompts file")
    if config.threads:
        torch.set_num_threads(config.threads)
    load_before = os.getloadavg()
    engines, notes, mtp = _build_engines(config, strategies, baselines)
    prompt_ids = [mtp.encode(p, chat=config.chat) for p in prompts]
    _warm_up(engines, prompt_ids[0], min(config.warmup_tokens, config.max_new_tokens), config.progress)
    samples = _measure(engines, prompt_ids, config)
    result = summarize(samples, [name for name, _ in engines], runs=config.runs, prompts=len(prompts))
    texts = {s.engine: {} for s in samples}
    for s in samples:
        if s.run == 0:
            texts[s.engine][s.prompt] = mtp.tokenizer.decode(s.tokens, skip_special_tokens=True)
    result = {
        "config": asdict(config),
        "decode": getattr(mtp.model, "selfmtp_decode", None),
        "machine": _machine(config, load_before),
        "notes": notes,
        "prompts": [{"prompt": p, "prompt_tokens": len(ids)} for p, ids in zip(prompts, prompt_ids, strict=True)],
        **result,
        "texts": {engine: [by_prompt[i] for i in sorted(by_prompt)] for engine, by_prompt in texts.items()},
        "samples": [s.to_dict() for s in samples],
    }
    output = Path(output_dir)
    write_json_atomic(output / "bench.json", result)
    write_text_atomic(output / "bench.md", format_markdown(result))
    return result


def _check(config: BenchConfig):
    from selfmtp.decoding.strategies import resolve_strategy

    if config.runs < 1:
        raise SelfMTPError(f"--runs must be >= 1, got {config.runs}")
    if config.max_new_tokens < 1:
        raise SelfMTPError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    if config.limit is not None and config.limit < 1:
        raise SelfMTPError(f"--limit must be >= 1, got {config.limit}")
    if config.threads is not None and config.threads < 1:
        raise SelfMTPError(f"--threads must be >= 1, got {config.threads}")
    unknown = [b for b in config.baselines if b not in BASELINES]
    if unknown:
        raise SelfMTPError(f"unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
    strategies = {}  # engine name -> (strategy, load-aware); an `auto` name keeps its spelling
    for text in ["ntp", *config.strategies]:
        strategy, aware = resolve_strategy(text)
        strategies[text.strip().lower() if aware else strategy.name] = (strategy, aware)
    from selfmtp.models.decode_dtype import DECODE_DTYPES

    bad = [d for d in [config.dtype, *config.compare_dtypes] if d not in DECODE_DTYPES]
    if bad:
        raise SelfMTPError(f"unknown dtype {bad[0]!r} (use one of {', '.join(DECODE_DTYPES)})")
    if config.gguf is not None and not Path(config.gguf).is_file():
        raise SelfMTPError(f"GGUF file not found: {config.gguf}")
    return list(strategies.items()), list(dict.fromkeys(config.baselines))


# ---------------------------------------------------------------------------------------------
# Engines: name -> a function (prompt ids, max new tokens) -> Timing


def _build_engines(config: BenchConfig, strategies, baselines):
    from selfmtp.api import MTPModel
    from selfmtp.decoding.load_aware import LoadAware
    from selfmtp.decoding.strategies import resolve_strategy

    mtp = MTPModel.from_pretrained(
        config.model, seed=config.seed, dtype=config.dtype, device=config.device, prepack=config.prepack
    )
    # each `auto` engine: its own rule and stats on the one probed cost curve
    engines = [(name, _loop_engine(mtp, s, LoadAware(mtp.load_aware().cost) if aware else None))
               for name, (s, aware) in strategies]  # fmt: skip
    notes = []
    if "hf-generate" in baselines:
        engines.append(("hf-generate", _hf_generate_engine(mtp)))
    for dtype in config.compare_dtypes:  # the same model in another dtype, side by side (e.g. ntp@float32)
        other = MTPModel.from_pretrained(config.model, seed=config.seed, dtype=dtype, device=config.device)
        engines.append((f"ntp@{dtype}", _loop_engine(other, resolve_strategy("ntp")[0])))
        if "hf-generate" in baselines:
            engines.append((f"hf-generate@{dtype}", _hf_generate_engine(other)))
    if "hf-prompt-lookup" in baselines:
        engines.append(("hf-prompt-lookup", _hf_generate_engine(mtp, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)))
    if "llama-cpp" in baselines:
        engine, note = _llama_cpp_engine(config, mtp)
        if engine is None:
            notes.append(f"llama-cpp skipped: {note}")
        else:
            engines.append(("llama-cpp", engine))
    return engines, notes, mtp


def _loop_engine(mtp, strategy, load_aware=None):
    """`load_aware`: an `auto` strategy's rule, probed before any timing; its stats carry over between prompts."""
    from selfmtp.decoding.loop import generate_batch

    pad_id = mtp.tokenizer.pad_token_id if mtp.tokenizer.pad_token_id is not None else 0
    stops = mtp.stop_token_ids

    def run(ids: list[int], max_new_tokens: int) -> Timing:
        start = time.perf_counter()
        result = generate_batch(
            mtp.model, [ids], strategy, max_new_tokens=max_new_tokens, stop_token_ids=stops, pad_token_id=pad_id,
            load_aware=load_aware,
        )[0]
        seconds = time.perf_counter() - start
        first = len(result.chunks[0].token_ids) if result.chunks else 0
        return Timing(result.token_ids, seconds, result.first_token_seconds, first, result.forward_passes, result.tokens_fed)

    return run


def _hf_generate_engine(mtp, **generate_options):
    """transformers `generate` with its stock attention (not our batch-invariant one) on the same weights."""
    from transformers.generation.streamers import BaseStreamer

    from selfmtp.models.exact_kernels import stock_attention

    class FirstTokenClock(BaseStreamer):  # generate puts the prompt first, then each new token
        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self):
            pass

    pad_id = mtp.tokenizer.pad_token_id if mtp.tokenizer.pad_token_id is not None else mtp.tokenizer.eos_token_id

    def run(ids: list[int], max_new_tokens: int) -> Timing:
        clock = FirstTokenClock()
        input_ids = torch.tensor([ids], device=mtp.model.device)
        start = time.perf_counter()
        with torch.inference_mode(), stock_attention(mtp.model):
            out = mtp.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, streamer=clock, **generate_options,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        first = clock.at - start if clock.at is not None else None
        return Timing(out[0, len(ids) :].tolist(), seconds, first)

    return run


def gguf_for(config: BenchConfig) -> Path | None:
    """The GGUF llama.cpp should run: --gguf, the model spec itself, or the file an alias was converted from."""
    from selfmtp.models.adapters import base_spec
    from selfmtp.models.gated_dir import is_gated_dir
    from selfmtp.models.loading import ALIASES, parse_model_spec, smollm2_gguf_path

    if config.gguf:
        return Path(config.gguf)
    spec = parse_model_spec(config.model)
    if spec.kind == "gguf":
        return Path(spec.source)
    if spec.kind == "alias" and spec.source == "smollm2-135m":
        return smollm2_gguf_path()
    directory = ALIASES[spec.source]() if spec.kind == "alias" else Path(spec.source) if spec.kind == "dir" else None
    if directory is not None and is_gated_dir(directory):  # real tokens run the base: its GGUF gives the same greedy text
        return gguf_for(replace(config, model=base_spec(directory)))
    return None


def _llama_cpp_engine(config: BenchConfig, mtp):
    """(engine, None), or (None, why it is skipped)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, f"llama-cpp-python is not installed ({LLAMA_CPP_HINT})"
    path = gguf_for(config)
    if path is None:
        return None, f"no GGUF is known for model {config.model!r}: pass --gguf with the original model's file"
    threads = torch.get_num_threads()
    llm = Llama(
        model_path=str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, seed=config.seed, verbose=False
    )
    stops = mtp.stop_token_ids | {llm.token_eos()}

    def run(ids: list[int], max_new_tokens: int) -> Timing:
        if max(ids) >= llm.n_vocab():
            raise SelfMTPError(f"prompt token ids exceed {path.name}'s vocabulary: is --gguf the same model?")
        llm.reset()  # no reuse of the previous prompt's KV cache: every engine prefills the whole prompt
        tokens, first = [], None
        start = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):  # temp 0: greedy
            if first is None:
                first = time.perf_counter() - start
            tokens.append(int(token))
            if token in stops or len(tokens) >= max_new_tokens:
                break
        return Timing(tokens, time.perf_counter() - start, first)

    return run, None


# ---------------------------------------------------------------------------------------------
# The measurement


def _warm_up(engines, ids: list[int], max_new_tokens: int, progress: bool) -> None:
    from selfmtp.progress import progress_bar

    for _, run in progress_bar(engines, desc="warm-up", disable=not progress, leave=False):
        run(ids, max_new_tokens)


def _measure(engines, prompt_ids: list[list[int]], config: BenchConfig) -> list[Sample]:
    """Round robin: for each run, for each prompt, every engine once, starting one engine later each time."""
    from selfmtp.progress import progress_bar

    samples = []
    bar = progress_bar(total=config.runs * len(prompt_ids) * len(engines), desc="bench", disable=not config.progress)
    turn = 0
    for run_index in range(config.runs):
        for p, ids in enumerate(prompt_ids):
            order = engines[turn % len(engines) :] + engines[: turn % len(engines)]
            turn += 1
            for name, run in order:
                bar.set_postfix_str(name)
                timing = run(ids, config.max_new_tokens)
                samples.append(Sample.from_timing(name, run_index, p, timing))
                bar.update()
    bar.close()
    return samples


def _machine(config: BenchConfig, load_before) -> dict:
    import transformers

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_info()["model_name"],
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": config.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llama_cpp_python": llama_version,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
