"""Training data: jsonl conversations -> fixed-length token rows with a prompt/response boundary.

Accepted lines (one JSON object each):
    {"question", "answer"}    GSM8K (calculator annotations like <<48/2=24>> are stripped by default)
    {"query", "response"}     MetaMathQA
    {"prompt", "response"}
    {"messages": [...]}       chat messages; the last one must be the assistant's response

Templates: `chat` renders with the tokenizer's chat template; `plain` is BOS + prompt + "\\n\\n" +
response, the paper's format for Qwen3 (`plain_bos_id` says which BOS a tokenizer without one gets). Every row ends with EOS unless `seq_len` cut it; the prompt is context, the response is
what the MTP regions predict.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from selfmtp.errors import SelfMTPError

TEMPLATES = ("chat", "plain")
# Qwen2/Qwen3 tokenizers define no BOS token, yet the paper feeds Qwen3 as BOS + prompt + "\n\n" +
# response. Their model configs name <|endoftext|> as bos_token_id (151643, also their pad and
# document separator in pretraining), so that is the BOS a Qwen prompt starts with here.
QWEN_BOS = "<|endoftext|>"
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass
class Example:
    prompt: list[dict]  # chat messages before the response
    response: str


@dataclass
class TokenRows:
    """Right-padded token rows: `input_ids` (n, seq_len), `lengths` (n,), `response_start` (n,)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    response_start: torch.Tensor
    dropped: int = 0  # examples whose prompt left no room for a response
    targets: torch.Tensor | None = None  # (n, seq_len) relabelled supervision targets, None: the rows themselves

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index) -> TokenRows:
        targets = None if self.targets is None else self.targets[index]
        return TokenRows(self.input_ids[index], self.lengths[index], self.response_start[index], targets=targets)


def parse_example(record, *, strip_calculator: bool = True) -> Example:
    """One JSON value -> Example; ValueError (with the reason) if it has no known shape."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise ValueError('"messages" must be a list of at least two {"role", "content"} objects')
        if messages[-1]["role"] != "assistant":
            raise ValueError('the last of "messages" must have role "assistant"')
        return Example([dict(m) for m in messages[:-1]], messages[-1]["content"])
    for prompt_key, response_key in (("question", "answer"), ("query", "response"), ("prompt", "response")):
        if prompt_key in record and response_key in record:
            prompt, response = record[prompt_key], record[response_key]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(f'"{prompt_key}" and "{response_key}" must be strings')
            if prompt_key == "question" and strip_calculator:
                response = CALCULATOR_ANNOTATION.sub("", response)
            return Example([{"role": "user", "content": prompt}], response)
    raise ValueError('expected keys "question"+"answer", "query"+"response", "prompt"+"response" or "messages"')


def read_examples(path: str | Path, *, skip_bad_lines: bool = False, strip_calculator: bool = True,
                  limit: int | None = None) -> tuple[list[Example], int]:
    """Read a jsonl file; returns (examples, skipped). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise SelfMTPError(f"data file not found: {path}")
    examples, skipped = [], 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_example(json.loads(line), strip_calculator=strip_calculator))
            except (ValueError, json.JSONDecodeError) as exc:
                if not skip_bad_lines:
                    raise SelfMTPError(f"{path}:{number}: malformed line: {exc} (use --skip-bad-lines to skip)") from exc
                skipped += 1
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise SelfMTPError(f"{path}: no usable examples" + (f" ({skipped} malformed lines skipped)" if skipped else ""))
    return examples, skipped


def render(example: Example, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response); the response ends with EOS."""
    return render_batch([example], tokenizer, template)[0]


def render_batch(examples: list[Example], tokenizer, template: str) -> list[tuple[list[int], list[int]]]:
    """`render` for many examples with one tokenizer call per list of texts: for short examples the
    per-call overhead, not the tokenizing, is the cost (10k tiny-gsm problems: 10 s one by one)."""
    if template not in TEMPLATES:
        raise SelfMTPError(f"unknown template {template!r} (use one of {', '.join(TEMPLATES)})")
    eos = tokenizer.eos_token_id
    if template == "plain":
        bos_id = plain_bos_id(tokenizer)
        bos = [bos_id] if bos_id is not None else []
        prompts = _encode(tokenizer, ["\n\n".join(m["content"] for m in e.prompt) + "\n\n" for e in examples])
        responses = _encode(tokenizer, [e.response for e in examples])
        return [(bos + prompt, response + [eos]) for prompt, response in zip(prompts, responses, strict=True)]
    if not getattr(tokenizer, "chat_template", None):
        raise SelfMTPError("--template chat needs a tokenizer with a chat template; use --template plain")
    prompt_texts, response_texts = [], []
    for example in examples:
        prompt_text = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(
            [*example.prompt, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise SelfMTPError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_texts.append(prompt_text)
        response_texts.append(full_text[len(prompt_text):])
    out = []
    for prompt, response in zip(_encode(tokenizer, prompt_texts), _encode(tokenizer, response_texts), strict=True):
        if eos in response:  # end the row at the turn's EOS (drop the template's trailing newline)
            response = response[: len(response) - response[::-1].index(eos)]
        else:
            response = response + [eos]
        out.append((prompt, response))
    return out


def plain_bos_id(tokenizer) -> int | None:
    """The token the plain template starts with: the tokenizer's BOS, <|endoftext|> for the Qwen2/Qwen3
    family (whose tokenizers have none, see QWEN_BOS), else none."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if any(cls.__name__.startswith("Qwen2Tokenizer") for cls in type(tokenizer).__mro__):  # Qwen2 and Qwen3
        return tokenizer.convert_tokens_to_ids(QWEN_BOS)
    return None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False).input_ids if texts else []


def tokenize_examples(examples: list[Example], tokenizer, *, template: str = "chat", seq_len: int = 160) -> TokenRows:
    """Render, cut to `seq_len` and right-pad. Examples whose prompt fills the row are dropped."""
    if seq_len < 4:
        raise SelfMTPError(f"--seq-len must be at least 4, got {seq_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, lengths, starts, dropped = [], [], [], 0
    for prompt, response in render_batch(examples, tokenizer, template):
        if len(prompt) > seq_len - 2:  # need at least two response tokens to predict
            dropped += 1
            continue
        ids = (prompt + response)[:seq_len]
        rows.append(ids + [pad] * (seq_len - len(ids)))
        lengths.append(len(ids))
        starts.append(len(prompt))
    if not rows:
        raise SelfMTPError(f"no example fits --seq-len {seq_len} (all {dropped} prompts are too long)")
    return TokenRows(torch.tensor(rows), torch.tensor(lengths), torch.tensor(starts), dropped)
