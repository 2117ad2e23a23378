"""Evaluation tasks: which items, how each becomes a prompt, when generation stops, how it is graded.

- `gsm8k`    chain-of-thought few-shot ("Q: ...\\nA: Let's think step by step.\\n<rationale>\\nThe answer
             is N."), exemplars from a train file and excluded from the items; cut at "Q:"; graded by
             flexible-extract (primary) and strict-match. `chat=True` puts the exemplars and the question
             in the model's chat template as turns instead (`shots=0` for zero-shot).
- `bbh:TASK` the standard 3-shot CoT prompt of `cot-prompts/TASK.txt` + "Q: {input}\\nA: Let's think step
             by step."; exact match after "So the answer is ...".
- `tiny-gsm` zero-shot in the plain template the tiny teacher was trained with (BOS + question +
             "\\n\\n"), stop at EOS; graded on the `#### N` number (else the last number).

A task is a small object: `prompt(item, tokenizer)` and `score(output, item)`; the sweep needs nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from selfmtp.errors import SelfMTPError
from selfmtp.evaluation import extract
from selfmtp.jsonl import numbered_lines, parse_json_line

TASK_HELP = "gsm8k, bbh:TASK (e.g. bbh:date_understanding) or tiny-gsm"
COT_SUFFIX = "Let's think step by step."
FEWSHOT_STOP = ("Q:",)
CHAT_INSTRUCTION = (
    'Solve the problem step by step. End your answer with "The answer is N." where N is the final number.'
)
TINY_GSM_DEFAULT_N = 200
_ANNOTATION = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class EvalItem:
    index: int  # position in the source file (or generator order)
    question: str
    target: str  # normalised gold answer


@dataclass
class GSM8K:
    items: list[EvalItem]
    exemplars: list[dict] = field(default_factory=list)  # {"question", "answer"} records
    chat: bool = False
    name: str = "gsm8k"
    metrics: tuple[str, ...] = ("flexible_extract", "strict_match")

    @property
    def stop(self) -> tuple[str, ...]:
        return () if self.chat else FEWSHOT_STOP

    def prompt(self, item: EvalItem, tokenizer=None) -> str | list[dict]:
        if self.chat:
            messages = []
            for shot in self.exemplars:
                messages.append({"role": "user", "content": f"{shot['question']}\n{CHAT_INSTRUCTION}"})
                messages.append({"role": "assistant", "content": cot_rationale(shot["answer"])})
            return [*messages, {"role": "user", "content": f"{item.question}\n{CHAT_INSTRUCTION}"}]
        shots = [f"Q: {s['question']}\nA: {COT_SUFFIX}\n{cot_rationale(s['answer'])}" for s in self.exemplars]
        return "\n\n".join([*shots, f"Q: {item.question}\nA: {COT_SUFFIX}"])

    def score(self, output: str, item: EvalItem) -> dict[str, dict]:
        found = {
            "flexible_extract": extract.flexible_extract(output),
            "strict_match": extract.strict_match(output),
        }
        return {m: {"extracted": v, "correct": v == item.target} for m, v in found.items()}


@dataclass
class BBH:
    items: list[EvalItem]
    fewshot: str  # the cot-prompts text without its canary header
    subtask: str
    chat: bool = False
    metrics: tuple[str, ...] = ("exact_match",)
    stop: tuple[str, ...] = FEWSHOT_STOP

    @property
    def name(self) -> str:
        return f"bbh:{self.subtask}"

    def prompt(self, item: EvalItem, tokenizer=None) -> str:
        return f"{self.fewshot}\n\nQ: {item.question}\nA: {COT_SUFFIX}"

    def score(self, output: str, item: EvalItem) -> dict[str, dict]:
        answer = extract.bbh_extract(output)
        return {"exact_match": {"extracted": answer, "correct": extract.bbh_match(answer, item.target)}}


@dataclass
class TinyGSM:
    items: list[EvalItem]
    name: str = "tiny-gsm"
    chat: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    stop: tuple[str, ...] = ()  # EOS only

    def prompt(self, item: EvalItem, tokenizer) -> str:
        """BOS + question + "\\n\\n" as text; BOS is written out unless the tokenizer adds it itself."""
        return bos_prefix(tokenizer) + item.question + "\n\n"

    def score(self, output: str, item: EvalItem) -> dict[str, dict]:
        from selfmtp.tasks.pretrain_teacher import answer_number  # how the teacher itself is graded

        answer = answer_number(output)
        return {"accuracy": {"extracted": answer, "correct": answer == item.target}}


def bos_prefix(tokenizer) -> str:
    """The plain template's BOS as text (see training.data.plain_bos_id), unless the tokenizer adds it."""
    from selfmtp.training.data import plain_bos_id

    bos_id = plain_bos_id(tokenizer)
    if bos_id is None:
        return ""
    probe = tokenizer("x")["input_ids"]
    return "" if probe and probe[0] == bos_id else tokenizer.convert_ids_to_tokens(bos_id)


def cot_rationale(answer: str) -> str:
    """GSM8K answer -> CoT rationale: drop `<<...>>` calculator notes, "#### N" -> "The answer is N."."""
    lines = [line for line in _ANNOTATION.sub("", answer).strip().splitlines() if line.strip()]
    body = [line for line in lines if not line.lstrip().startswith("####")]
    return "\n".join([*body, f"The answer is {extract.gsm8k_gold(answer)}."])


# ---------------------------------------------------------------------------------------------
# Loading


def load_task(
    name: str,
    *,
    data: str | Path | None = None,
    fewshot_data: str | Path | None = None,
    limit: int | None = None,
    shots: int = 8,
    chat: bool = False,
    seed: int = 0,
):
    """Build a task from its name and files. SelfMTPError for unknown tasks and missing/bad files."""
    if limit is not None and limit < 1:
        raise SelfMTPError(f"--limit must be >= 1, got {limit}")
    if shots < 0:
        raise SelfMTPError(f"--shots must be >= 0, got {shots}")
    name = (name or "").strip()
    if name == "gsm8k":
        return _load_gsm8k(data, fewshot_data, limit, shots, chat)
    if name.startswith("bbh:") and name[4:]:
        return _load_bbh(name[4:], data, limit, chat)
    if name == "tiny-gsm":
        if chat:
            raise SelfMTPError("tiny-gsm has no chat mode: its teacher was trained on the plain template")
        return _load_tiny_gsm(data, limit, seed)
    raise SelfMTPError(f"unknown task {name!r}: use {TASK_HELP}")


def _load_gsm8k(data, fewshot_data, limit, shots, chat) -> GSM8K:
    if data is None:
        raise SelfMTPError("gsm8k needs --data PATH: a GSM8K jsonl file with 'question' and 'answer' fields")
    records = read_jsonl(data)
    pool = read_jsonl(fewshot_data) if fewshot_data is not None else records
    if shots > len(pool):
        raise SelfMTPError(f"--shots {shots} but the few-shot file holds only {len(pool)} problems")
    exemplars = pool[:shots]
    taken = {shot["question"] for shot in exemplars}
    items = [_gsm_item(i, r, data) for i, r in enumerate(records) if r["question"] not in taken]
    if not items:
        raise SelfMTPError(f"{data}: no problems left after removing the {shots} few-shot exemplars")
    return GSM8K(items[:limit], exemplars, chat)


def _load_bbh(subtask: str, data, limit, chat) -> BBH:
    if data is None:
        raise SelfMTPError("bbh needs --data PATH: the BBH folder (with TASK.json and cot-prompts/TASK.txt)")
    root = Path(data)
    root = root.parent if root.suffix == ".json" else root
    examples_path, prompt_path = root / f"{subtask}.json", root / "cot-prompts" / f"{subtask}.txt"
    for path in (examples_path, prompt_path):
        if not path.is_file():
            raise SelfMTPError(f"bbh:{subtask}: file not found: {path}")
    try:
        examples = json.loads(examples_path.read_text(encoding="utf-8"))["examples"]
        items = [EvalItem(i, e["input"], e["target"]) for i, e in enumerate(examples)]
    except (ValueError, KeyError, TypeError) as exc:
        raise SelfMTPError(
            f"{examples_path}: expected {{'examples': [{{'input', 'target'}}]}} ({exc})"
        ) from None
    return BBH(items[:limit], strip_canary(prompt_path.read_text(encoding="utf-8")), subtask, chat)


def _load_tiny_gsm(data, limit, seed) -> TinyGSM:
    if data is not None:
        records = read_jsonl(data)
    else:
        from selfmtp.tasks.tiny_gsm import generate_problems

        records = generate_problems(limit or TINY_GSM_DEFAULT_N, seed=seed, split="test")
    return TinyGSM([_gsm_item(i, r, data or "tiny-gsm") for i, r in enumerate(records)][:limit])


def strip_canary(text: str) -> str:
    """cot-prompts files start with a canary line and '-----'; the prompt is what follows."""
    head, sep, body = text.partition("\n-----\n")
    return (body if sep else text).strip()


def read_jsonl(path: str | Path) -> list[dict]:
    """`{"question", "answer"}` records, one JSON object per line. SelfMTPError when unreadable."""
    path = Path(path)
    records = []
    for n, line in numbered_lines(path, "data file"):
        record = parse_json_line(path, n, line)
        if not (
            isinstance(record, dict)
            and isinstance(record.get("question"), str)
            and isinstance(record.get("answer"), str)
        ):
            raise SelfMTPError(f"{path}:{n}: expected an object with 'question' and 'answer' strings")
        records.append(record)
    if not records:
        raise SelfMTPError(f"data file {path} holds no problems")
    return records


def _gsm_item(index: int, record: dict, source) -> EvalItem:
    try:
        return EvalItem(index, record["question"], extract.gsm8k_gold(record["answer"]))
    except ValueError:
        raise SelfMTPError(f"{source}: problem {index + 1} has no '#### N' answer line") from None
