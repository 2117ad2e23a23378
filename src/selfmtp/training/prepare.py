"""`selfmtp prepare`: GSM8K data for the real-model MTP recipe: a fixed train/dev split, optionally self-answers.

Split: the last `dev` lines (default 300) of GSM8K train.jsonl are the dev set, the rest is train;
both are copied verbatim (training/data.py strips the <<a*b=c>> calculator annotations when it
reads them). With `self_answers` N, the original model answers the first N train questions
greedily (chat template, our NTP decode loop) and `self-train.jsonl` gets {"question", "answer"}
records holding those answers: training prefixes like the ones the model meets at inference.
The answers are appended batch by batch; rerunning the same command continues where it stopped.
An answer cut by `max_new_tokens` gets an EOS appended when training/data.py reads it; with the
default 160 and the recipe's 192-token rows that EOS never fits in a row (every chat prompt is > 32 tokens).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from selfmtp.errors import SelfMTPError
from selfmtp.files import write_text_atomic

DEFAULT_SOURCE = "../shared/data/gsm8k/train.jsonl"  # GSM8K's train.jsonl beside this checkout


@dataclass
class PrepareConfig:
    output: str
    source: str = DEFAULT_SOURCE
    dev: int = 300
    self_answers: int = 0
    dev_self_answers: int = 0
    mix: bool = False
    model: str = "smollm2-135m"
    max_new_tokens: int = 160
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True


def split(lines: list[str], dev: int) -> tuple[list[str], list[str]]:
    """(train, dev): the last `dev` non-blank lines are dev."""
    lines = [line for line in lines if line.strip()]
    if not 0 < dev < len(lines):
        raise SelfMTPError(f"--dev must be between 1 and {len(lines) - 1}, got {dev}")
    return lines[:-dev], lines[-dev:]


def prepare_gsm8k(config: PrepareConfig, log=print) -> dict:
    """Write train.jsonl, dev.jsonl (and self-train.jsonl, dev-self.jsonl, mix-train.jsonl) to `config.output`.

    Returns what it wrote: {"train": N, "dev": N, "files": {name: path}, "self_answers": N, ...}."""
    out, source = Path(config.output), Path(config.source)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise SelfMTPError(f"cannot read GSM8K's train.jsonl at {source} ({exc.__class__.__name__}): "
                           "give its path with --source") from None  # fmt: skip
    train, dev = split(text.splitlines(), config.dev)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.jsonl", "dev": out / "dev.jsonl"}
    write_text_atomic(files["train"], "".join(f"{line}\n" for line in train))
    write_text_atomic(files["dev"], "".join(f"{line}\n" for line in dev))
    summary = {"train": len(train), "dev": len(dev)}
    log(f"wrote {len(train)} train and {len(dev)} dev problems to {out}")
    for key, lines, count, name in (("self_answers", train, config.self_answers, "self-train.jsonl"),
                                    ("dev_self_answers", dev, config.dev_self_answers, "dev-self.jsonl")):  # fmt: skip
        if count:
            questions = [json.loads(line)["question"] for line in lines[:count]]
            started = time.perf_counter()
            files[key] = out / name
            summary[key] = self_answers(questions, config, files[key])
            log(f"{files[key]} holds {summary[key]} self-answers ({time.perf_counter() - started:.0f} s in this run)")
    if config.mix:
        # Gated offline training relabels every row with the original model's greedy choices, so text
        # the model did not write (the reference solutions) still teaches the masks its own next tokens.
        own = out / "self-train.jsonl"
        lines = (own.read_text(encoding="utf-8").splitlines() if own.exists() else []) + train
        files["mix"] = out / "mix-train.jsonl"
        write_text_atomic(files["mix"], "".join(f"{line}\n" for line in lines))
        summary["mix"] = len(lines)
        log(f"wrote {len(lines)} records to {files['mix']}")
    return summary | {"files": {key: str(path) for key, path in files.items()}}


def self_answers(questions: list[str], config: PrepareConfig, path: Path) -> int:
    """Append the model's own greedy chat answers to `path`, one {"question", "answer"} record each.

    Resumable: questions already answered in `path` (a run that was stopped) are skipped, and each
    batch is appended and flushed as soon as it is decoded, so a kill loses one batch at most.
    Returns how many records `path` holds for `questions`.
    """
    from selfmtp.api import MTPModel
    from selfmtp.progress import progress_bar

    done = answered(path, len(questions))
    todo = questions[done:]
    if not todo:
        return done
    # Batched NTP only: no verify pass must reproduce these rows, and batch-invariant attention (one SDPA call
    # per row of a padded batch) would cost a batch of 32 several times its stock time.
    mtp = MTPModel.from_pretrained(config.model, dtype=config.dtype, device=config.device, exact_kernels=False)
    size = config.batch_size
    with path.open("a", encoding="utf-8") as out:
        for lo in progress_bar(range(0, len(todo), size), desc="self-answers", disable=not config.progress):
            group = todo[lo : lo + size]
            results = mtp.generate(group, strategy="ntp", max_new_tokens=config.max_new_tokens, chat=True, batch_size=size)
            for question, result in zip(group, results, strict=True):
                out.write(json.dumps({"question": question, "answer": result.text, "stop_reason": result.stop_reason}) + "\n")
            out.flush()
    return done + len(todo)


def answered(path: Path, limit: int) -> int:
    """Complete records already in `path` (a torn last line from a kill is cut off)."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        write_text_atomic(path, complete)
    return min(limit, len(complete.splitlines()))
