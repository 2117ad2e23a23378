"""`MTPModel`: load a model once, generate from text, chat messages or a list of either.

from selfmtp.api import MTPModel
from selfmtp.decoding.strategies import parse_strategy

mtp = MTPModel.from_pretrained("smollm2-135m")
result = mtp.generate("What is 7 * 6?", strategy="confadapt:0.9", max_new_tokens=64)
print(result.text, result.acceleration)
"""

from __future__ import annotations

from pathlib import Path

from selfmtp.decoding.kv_cache import has_plain_cache
from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.results import GenerationResult
from selfmtp.decoding.strategies import Strategy, resolve_strategy
from selfmtp.errors import SelfMTPError
from selfmtp.files import write_text_atomic
from selfmtp.jsonl import numbered_lines, parse_json_line


class MTPModel:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._load_aware = (0, None)  # (rows probed, the `auto` strategies' LoadAware): stats kept between calls

    def load_aware(self, max_rows: int = 1):
        """The `LoadAware` rule of `auto` strategies: times cached passes of up to `max_rows` rows once."""
        from selfmtp.decoding.load_aware import LoadAware
        from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost, pass_clock

        if self._load_aware[0] < max_rows:
            probe = PassCost.measure(self.model, max_rows=max_rows)
            cost = LearnedPassCost(probe, clock=pass_clock(self.model.device))  # corrected by the passes it times
            self._load_aware = (max_rows, LoadAware(cost))
        return self._load_aware[1]

    @classmethod
    def from_pretrained(cls, spec: str, **load_model_kwargs) -> MTPModel:
        """`spec` as for `--model` (see `selfmtp.models.loading.load_model`, whose keywords pass through).

        For decoding, `exact_kernels` defaults to "auto": batch-invariant kernels in every dtype but float32,
        so `verify` gives the same model-and-dtype's greedy text token for token."""
        from selfmtp.models.loading import load_model

        load_model_kwargs.setdefault("exact_kernels", "auto")
        return cls(*load_model(spec, **load_model_kwargs))

    @property
    def dtype_name(self) -> str:
        """The dtype decoding runs in ("bfloat16", "int8", ...), after `--dtype auto` resolved it."""
        decode = getattr(self.model, "selfmtp_decode", None)
        return decode["dtype"] if decode else str(self.model.dtype).removeprefix("torch.")

    @property
    def stop_token_ids(self) -> set[int]:
        """The generation config's EOS ids (what transformers' `generate` stops on), else the tokenizer's."""
        eos = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}

    def encode(self, prompt, *, chat: bool | None = None) -> list[int]:
        """Prompt text or chat messages -> token ids. chat=None: chat template for text iff the tokenizer has one."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SelfMTPError("empty prompt: give some text to continue")
            if chat is False or (chat is None and not has_template):
                return self.tokenizer(prompt)["input_ids"]
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _check_messages(prompt)
            if chat is False:
                raise SelfMTPError("chat messages given with chat=False: pass plain text instead")
        if not has_template:
            raise SelfMTPError(
                "this tokenizer has no chat template: use chat=False (--no-chat) and plain text"
            )
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def generate(
        self,
        prompts,
        strategy: str | Strategy = "ntp",
        max_new_tokens: int = 256,
        stop: str | list[str] | None = None,
        chat: bool | None = None,
        batch_size: int = 8,
    ) -> GenerationResult | list[GenerationResult]:
        """A str or a list of {"role", "content"} dicts -> one result; a list of those -> a list of results.

        Prompts are decoded `batch_size` at a time, grouped by length to waste less on padding; the
        output of each prompt is the same as decoding it alone.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(p, dict) for p in prompts)
        )
        batch = [prompts] if single else prompts
        if not isinstance(batch, (list, tuple)) or not batch:
            raise SelfMTPError("no prompts given: pass a string, chat messages, or a non-empty list of them")
        if batch_size < 1:
            raise SelfMTPError(f"batch size must be >= 1, got {batch_size}")
        strategy, aware = resolve_strategy(strategy) if isinstance(strategy, str) else (strategy, False)
        stop_strings = _check_stop(stop)
        encoded = [self.encode(p, chat=chat) for p in batch]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[GenerationResult | None] = [None] * len(encoded)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if not has_plain_cache(self.model):
            batch_size = 1  # sliding-window caches: our padded batches cannot express their masks
        load_aware = self.load_aware(min(batch_size, len(order))) if aware else None
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            outputs = generate_batch(
                self.model, [encoded[i] for i in group], strategy, max_new_tokens=max_new_tokens,
                stop_token_ids=self.stop_token_ids, stop_strings=stop_strings, tokenizer=self.tokenizer, pad_token_id=pad_id,
                load_aware=load_aware,
            )  # fmt: skip
            for i, output in zip(group, outputs, strict=True):
                results[i] = output
        return results[0] if single else results


def check_generate_args(prompts: list[str], *, max_new_tokens: int, batch_size: int) -> None:
    """The checks on a generate request that need no model: run them before minutes of loading one."""
    if max_new_tokens < 1:
        raise SelfMTPError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise SelfMTPError(f"--batch-size must be >= 1, got {batch_size}")
    if any(not p.strip() for p in prompts):
        raise SelfMTPError("empty prompt: give some text to continue")


def _check_messages(messages) -> list[dict]:
    ok = (
        isinstance(messages, (list, tuple))
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise SelfMTPError(
            "a prompt must be a string or a non-empty list of {'role': ..., 'content': ...} messages"
        )
    if not any(m["content"].strip() for m in messages):
        raise SelfMTPError("empty prompt: every chat message is empty")
    return list(messages)


def _check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise SelfMTPError("stop strings must be non-empty strings")
    return stops


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: .jsonl (or lines starting with '{') with a "prompt" or "question" field, else one per line."""
    path = Path(path)
    numbered = numbered_lines(path, "prompts file")
    if not numbered:
        raise SelfMTPError(f"prompts file {path} holds no prompts")
    if path.suffix != ".jsonl" and not numbered[0][1].lstrip().startswith("{"):
        return [line for _, line in numbered]
    prompts = []
    for n, line in numbered:
        record = parse_json_line(path, n, line)
        text = record.get("prompt", record.get("question")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SelfMTPError(f"{path}:{n}: expected an object with a 'prompt' or 'question' string")
        prompts.append(text)
    return prompts


# ---------------------------------------------------------------------------------------------
# Reporting generations (what `selfmtp generate` prints and writes)


def format_result(result: GenerationResult, tokenizer, *, chunks: bool = False, colour: bool = False) -> str:
    """The generated text and a line of its figures; `chunks`: each forward pass's tokens as one block."""
    if chunks:
        from selfmtp.decoding.chunk_view import render_terminal

        return render_terminal(result, colour=colour, tokenizer=tokenizer)
    return (
        f"{result.text}\n[{result.num_tokens} tokens, {result.forward_passes} passes, {result.acceleration:.2f} "
        f"tokens/pass, {result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}]"
    )


def format_results_summary(results: list[GenerationResult]) -> str:
    """One line over several generations: pooled and per-generation acceleration, mean speed."""
    from selfmtp.decoding.results import summarize

    summary = summarize(results)
    return (
        f"{summary['generations']} generations: {summary['tokens_per_pass_pooled']:.2f} tokens/pass pooled, "
        f"{summary['acceleration_mean']:.2f} +- {summary['acceleration_std']:.2f} per-generation mean, "
        f"{summary['tokens_per_second_mean']:.1f} tokens/s on average"
    )


def write_chunk_view(
    path: str | Path, results: list[GenerationResult], prompts: list[str], *, title: str, tokenizer
) -> None:
    """The chunk view of `results` as a standalone HTML page, written atomically."""
    from selfmtp.decoding.chunk_view import render_html

    write_text_atomic(path, render_html(results, prompts, title=title, tokenizer=tokenizer))
