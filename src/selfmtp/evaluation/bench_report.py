"""Figures for `selfmtp bench` from its raw samples, and the bench.md table.

Per sample (one engine, one prompt, one run):
- decode tokens/s = tokens after the first pass / seconds after it (the prompt's pass is TTFT),
- end-to-end tokens/s = new tokens / whole call, ms/token = 1000 / decode tokens/s.
Per engine: each run's tokens/s is its total tokens over its total seconds; median, min and max are
over runs. Speedups are paired: the ratio of decode tokens/s of two engines on the same prompt in the
same run (so both met the same background load), median (min, max) over all (run, prompt) pairs.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

REFERENCES = ("ntp", "hf-generate", "llama-cpp")  # engines every other engine is compared with


@dataclass
class Sample:
    engine: str
    run: int
    prompt: int
    tokens: list[int]
    seconds: float
    first_token_seconds: float | None
    first_tokens: int
    passes: int | None  # our loop only
    tokens_fed: list[int] | None  # our loop only: tokens fed per pass, the prompt's pass first

    @classmethod
    def from_timing(cls, engine: str, run: int, prompt: int, timing) -> Sample:
        return cls(engine, run, prompt, list(timing.tokens), timing.seconds, timing.first_token_seconds,
                   timing.first_tokens, timing.passes, timing.tokens_fed)  # fmt: skip

    @property
    def decode_tokens(self) -> int:
        return len(self.tokens) - (self.first_tokens if self.first_token_seconds is not None else 0)

    @property
    def decode_seconds(self) -> float:
        return self.seconds - (self.first_token_seconds or 0.0)

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.decode_tokens < 1 or self.decode_seconds <= 0:
            return None  # stopped in the first pass: nothing to time
        return self.decode_tokens / self.decode_seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "new_tokens": len(self.tokens), "decode_tokens_per_second": self.decode_tokens_per_second}


def summarize(samples: list[Sample], engines: list[str], *, runs: int, prompts: int) -> dict:
    by_key = {(s.engine, s.run, s.prompt): s for s in samples}
    present = [r for r in REFERENCES if r in engines]
    rows = []
    for name in engines:
        own = [s for s in samples if s.engine == name]
        row = {"engine": name, "kind": "strategy" if own[0].passes is not None else "baseline", **_speed(own, runs)}
        row.update(_passes(own))
        for reference in present:
            if reference != name:
                ratios = [
                    _ratio(by_key[(name, r, p)], by_key[(reference, r, p)]) for r in range(runs) for p in range(prompts)
                ]
                row[f"speedup_vs_{reference.replace('-', '_')}"] = _spread([x for x in ratios if x is not None])
        rows.append(row)
    matches = _token_identity(by_key, engines, runs, prompts)
    return {"engines": rows, "tokens_match": matches}


def _speed(own: list[Sample], runs: int) -> dict:
    def per_run(tokens, seconds) -> list[float]:
        out = []
        for r in range(runs):
            in_run = [s for s in own if s.run == r]
            total_seconds = sum(seconds(s) for s in in_run)
            if total_seconds > 0:
                out.append(sum(tokens(s) for s in in_run) / total_seconds)
        return out

    decode = per_run(lambda s: s.decode_tokens, lambda s: s.decode_seconds)
    whole = per_run(lambda s: len(s.tokens), lambda s: s.seconds)
    timed = [s.decode_tokens_per_second for s in own if s.decode_tokens_per_second]
    firsts = [1000 * s.first_token_seconds for s in own if s.first_token_seconds is not None]
    return {
        "new_tokens_mean": statistics.fmean(len(s.tokens) for s in own),
        "decode_tokens_per_second": _spread(decode),
        "end_to_end_tokens_per_second": _spread(whole),
        "ms_per_token": _spread([1000 / x for x in timed]),
        "ttft_ms": _spread(firsts),
    }


def _passes(own: list[Sample]) -> dict:
    if own[0].passes is None:
        return {}
    tokens, passes = sum(len(s.tokens) for s in own), sum(s.passes for s in own)
    later = [fed for s in own for fed in s.tokens_fed[1:]]  # passes after the prompt's
    return {
        "acceleration": tokens / passes if passes else 0.0,  # pooled: the paper's effective k
        "tokens_per_pass_mean": statistics.fmean(len(s.tokens) / s.passes for s in own if s.passes),
        "tokens_fed_per_pass": statistics.fmean(later) if later else None,
    }


def _ratio(sample: Sample, reference: Sample) -> float | None:
    a, b = sample.decode_tokens_per_second, reference.decode_tokens_per_second
    return a / b if a and b else None


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _token_identity(by_key, engines: list[str], runs: int, prompts: int) -> list[dict]:
    """Per prompt: does each engine give ntp's tokens (first run), and is every engine the same in every run?"""
    out = []
    for p in range(prompts):
        reference = by_key[("ntp", 0, p)].tokens
        identical, prefix = {}, {}
        for name in engines:
            tokens = by_key[(name, 0, p)].tokens
            identical[name] = tokens == reference
            prefix[name] = _common_prefix(tokens, reference)
        repeatable = all(by_key[(n, r, p)].tokens == by_key[(n, 0, p)].tokens for n in engines for r in range(runs))
        out.append({
            "prompt": p, "ntp_vs_hf_generate": identical.get("hf-generate"), "identical_to_ntp": identical,
            "common_prefix_with_ntp": prefix, "same_tokens_every_run": repeatable,
        })  # fmt: skip
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# ---------------------------------------------------------------------------------------------
# bench.md


def format_markdown(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    references = [r for r in REFERENCES if any(row["engine"] == r for row in result["engines"])]
    header = ["engine", "decode tok/s", "ms/token", "TTFT ms", "tokens/pass pooled", "tokens/pass mean", "fed/pass",
              "same tokens as ntp"]
    header += [f"vs {r}" for r in references]
    lines = [
        f"# selfmtp bench: {config['model']}",
        "",
        f"{len(result['prompts'])} prompts x {config['runs']} runs, up to {config['max_new_tokens']} new tokens, greedy. "
        f"{machine['torch_threads']} torch threads on {machine['cpu_count']} CPUs ({machine['cpu']}), device "
        f"{machine['device']}; load average (1, 5, 15 min) {machine['load_average_before']} before, "
        f"{machine['load_average_after']} after. torch {machine['torch']}, transformers {machine['transformers']}, "
        f"llama-cpp-python {machine['llama_cpp_python'] or '-'}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in result["engines"]:
        speed = row["decode_tokens_per_second"]
        cells = [
            row["engine"],
            f"{_f(speed['median'], 1)} ({_f(speed['min'], 1)}-{_f(speed['max'], 1)})",
            _f(row["ms_per_token"]["median"], 1),
            _f(row["ttft_ms"]["median"], 0),
            _f(row.get("acceleration"), 2),
            _f(row.get("tokens_per_pass_mean"), 2),
            _f(row.get("tokens_fed_per_pass"), 1),
            f"{sum(m['identical_to_ntp'][row['engine']] for m in result['tokens_match'])}/{len(result['tokens_match'])}",
        ]
        for reference in references:
            ratio = row.get(f"speedup_vs_{reference.replace('-', '_')}")
            cells.append("-" if ratio is None else f"{_f(ratio['median'], 2)}x ({_f(ratio['min'], 2)}-{_f(ratio['max'], 2)})")
        lines.append("| " + " | ".join(cells) + " |")
    matches = [m["ntp_vs_hf_generate"] for m in result["tokens_match"]]
    lines += [
        "",
        "decode tok/s: tokens after the first pass / seconds after it; median (min-max) over runs. "
        "TTFT: time to the first pass's tokens (the prompt's pass). tokens/pass pooled: all tokens / all passes "
        "(the paper's effective k); mean: of the per-generation ratios. fed/pass: tokens "
        "fed per pass after the prompt's (accepted tokens, drafts and masks). same tokens as ntp: prompts (first run). vs X: median (min-max) over (run, prompt) "
        "pairs of the ratio of decode tok/s, both measured on the same prompt in the same run.",
    ]
    if any(m is not None for m in matches):
        lines.append(f"ntp and hf-generate gave identical greedy tokens on {sum(bool(m) for m in matches)} of {len(matches)} prompts.")
    lines += [f"Note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
