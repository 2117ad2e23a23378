"""lm-evaluation-harness model `selfmtp`: generation through our multi-token decoding.

Needs the optional extra (`pip install selfmtp[lm-eval]`). lm-eval's command line knows only the
models it has imported, so run it through this module, which registers `selfmtp` first and then
hands the arguments to lm-eval's own CLI:

    python -m selfmtp.evaluation.lm_eval_adapter run --model selfmtp \\
        --model_args pretrained=DIR,strategy=confadapt:0.9,stats_file=accel.json --tasks gsm8k_cot

From Python: `import selfmtp.evaluation.lm_eval_adapter` (registers it), then
`lm_eval.simple_evaluate(model="selfmtp", model_args="pretrained=DIR,strategy=static:3", ...)`.

- `generate_until`: greedy decoding with the `strategy` model argument (ntp, static:K, verify:K[:tree],
  confadapt:TAU[:KMAX]); stop strings from the task's `until`, stop tokens from the model's EOS.
  Acceleration (tokens per forward pass) is logged after every call and, with `stats_file=PATH`,
  written there as JSON (summary + one record per request); `lm.decoding_stats()` returns the same.
- `loglikelihood` / `loglikelihood_rolling`: a plain causal forward (multi-token prediction plays no
  part in scoring), one request at a time.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from selfmtp.files import write_json_atomic
from selfmtp.progress import progress_bar

logger = logging.getLogger("lm_eval.models.selfmtp")  # under lm-eval's logger: shown with its own logs
DEFAULT_MAX_LENGTH = 2048


@register_model("selfmtp")
class SelfMTPLM(TemplateLM):
    def __init__(
        self,
        pretrained="smollm2-135m",  # a model spec, or an already loaded MTPModel
        strategy: str = "ntp",
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        seed: int = 0,
        stats_file: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        from selfmtp.api import MTPModel
        from selfmtp.decoding.strategies import parse_strategy

        if unused:
            logger.warning("selfmtp: ignoring model arguments %s", sorted(unused))
        self.strategy = parse_strategy(str(strategy))
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.stats_file = stats_file
        if isinstance(pretrained, MTPModel):
            self.mtp = pretrained
        else:
            device = _available_device(device)
            self.mtp = MTPModel.from_pretrained(str(pretrained), seed=int(seed), dtype=dtype, device=device)
        self.model, self.tokenizer = self.mtp.model, self.mtp.tokenizer
        self.model.eval()
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or context or DEFAULT_MAX_LENGTH)
        self._device = self.model.device
        self._records: list[dict] = []

    # -- tokenization (what TemplateLM needs) ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # None: the tokenizer's own default, the same encoding generation uses (MTPModel.encode).
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **special)["input_ids"]

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "selfmtp").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )  # fmt: skip

    # -- scoring: plain causal forward ---------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        answers = []
        for key, context_ids, continuation_ids in progress_bar(requests, disable=disable_tqdm, desc="loglikelihood"):
            ids = (context_ids + continuation_ids)[-(self.max_length + 1) :]
            inputs = torch.tensor([ids[:-1]], device=self.model.device)
            logits = self.model(input_ids=inputs).logits[0, -len(continuation_ids) :].float()
            log_probs = F.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation_ids, device=log_probs.device)
            logprob = log_probs.gather(1, target[:, None]).sum().item()
            is_greedy = bool((log_probs.argmax(dim=-1) == target).all())
            answers.append((logprob, is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (logprob, is_greedy))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in progress_bar(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            pieces = [(None, *make_disjoint_window(window)) for window in windows]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(pieces, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    # -- generation: our multi-token decoding ------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)  # same stop strings and budget decode together
        for index, request in enumerate(requests):
            groups[self._generation_settings(request.args[1])].append(index)
        texts: list[str | None] = [None] * len(requests)
        records: list[dict | None] = [None] * len(requests)
        bar = progress_bar(total=len(requests), disable=disable_tqdm, desc=f"generate_until ({self.strategy.name})")
        for (until, max_new_tokens), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                results = self.mtp.generate(
                    [requests[i].args[0] for i in chunk], strategy=self.strategy, max_new_tokens=max_new_tokens,
                    stop=list(until) or None, chat=False, batch_size=self.batch_size,
                )  # fmt: skip
                for i, result in zip(chunk, results, strict=True):
                    texts[i] = result.text
                    records[i] = _record(result)
                    self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
                bar.update(len(chunk))
        bar.close()
        self._records.extend(records)
        self._report()
        return texts

    def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            logger.warning("selfmtp decodes greedily: sampling settings are ignored")
        return tuple(s for s in until if s), max_new_tokens

    def decoding_stats(self) -> dict:
        """Acceleration over every generation so far: summary (as `selfmtp.decoding.results.summarize`) + records."""
        from selfmtp.decoding.results import summarize

        summary = summarize([_AsResult(r) for r in self._records])
        return {"strategy": self.strategy.name, "summary": summary, "generations": self._records}

    def _report(self) -> None:
        stats = self.decoding_stats()
        summary = stats["summary"]
        logger.info(
            "selfmtp %s: %d generations, %.2f tokens/pass pooled, %.2f +- %.2f per-generation mean, %.1f tokens/s",
            self.strategy.name, summary["generations"], summary["tokens_per_pass_pooled"], summary["acceleration_mean"],
            summary["acceleration_std"], summary["tokens_per_second_mean"],
        )  # fmt: skip
        if self.stats_file:
            from pathlib import Path

            write_json_atomic(Path(self.stats_file), stats)


def _record(result) -> dict:
    keys = ("num_tokens", "forward_passes", "acceleration", "seconds", "tokens_per_second", "stop_reason",
            "tokens_fed", "draft_offered", "draft_accepted")
    return {key: getattr(result, key) for key in keys}


class _AsResult:
    """A stored record seen through the attributes `summarize` reads."""

    def __init__(self, record: dict):
        self.__dict__.update(record)


def _available_device(device: str | None) -> str:
    # lm-eval's CLI passes device=cuda by default; follow HFLM and fall back to the CPU when there is none.
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("selfmtp: device %s is not available, using cpu", device)
        return "cpu"
    return str(device)


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        logger.warning("selfmtp: batch_size=auto is not supported, using 8")
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with `selfmtp` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
