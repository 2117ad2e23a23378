"""GSM8K data for the real-model MTP recipe: a fixed train/dev split, optionally self-answers.

    PYTHONPATH=src python scripts/prepare_gsm8k_mtp.py --output data/gsm8k-mtp
    PYTHONPATH=src python scripts/prepare_gsm8k_mtp.py --output data/gsm8k-mtp --self-answers 300

Split: the last `--dev` lines (default 300) of GSM8K train.jsonl are the dev set, the rest is
train; both are copied verbatim (selfmtp.data strips the <<a*b=c>> calculator annotations when it
reads them). With `--self-answers N`, the original model answers the first N train questions
greedily (chat template, our NTP decode loop) and `self-train.jsonl` gets {"question", "answer"}
records holding those answers: training prefixes like the ones the model meets at inference.
An answer cut by --max-new-tokens gets an EOS appended when selfmtp.data reads it; with the default
160 and the recipe's 192-token rows that EOS never fits in a row (every chat prompt is > 32 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def split(lines: list[str], dev: int) -> tuple[list[str], list[str]]:
    """(train, dev): the last `dev` non-blank lines are dev."""
    lines = [line for line in lines if line.strip()]
    if not 0 < dev < len(lines):
        raise SystemExit(f"--dev must be between 1 and {len(lines) - 1}")
    return lines[:-dev], lines[-dev:]


def self_answers(questions: list[str], model: str, max_new_tokens: int, batch_size: int) -> list[dict]:
    """The model's own greedy chat answers, one {"question", "answer"} record each."""
    from tqdm import tqdm

    from selfmtp.api import MTPModel

    mtp = MTPModel.from_pretrained(model)
    records = []
    for lo in tqdm(range(0, len(questions), batch_size), desc="self-answers"):
        group = questions[lo : lo + batch_size]
        results = mtp.generate(group, strategy="ntp", max_new_tokens=max_new_tokens, chat=True, batch_size=batch_size)
        records += [{"question": q, "answer": r.text, "stop_reason": r.stop_reason} for q, r in zip(group, results, strict=True)]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(GSM8K), help="GSM8K train.jsonl")
    parser.add_argument("--output", required=True, help="folder for train.jsonl, dev.jsonl (and self-train.jsonl)")
    parser.add_argument("--dev", type=int, default=300, help="dev problems: the last N lines (default 300)")
    parser.add_argument("--self-answers", type=int, default=0, metavar="N", help="greedy answers to N train questions")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = split(Path(args.source).read_text(encoding="utf-8").splitlines(), args.dev)
    (out / "train.jsonl").write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    (out / "dev.jsonl").write_text("".join(f"{line}\n" for line in dev), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(dev)} dev problems to {out}")
    if args.self_answers:
        questions = [json.loads(line)["question"] for line in train[: args.self_answers]]
        started = time.perf_counter()
        records = self_answers(questions, args.model, args.max_new_tokens, args.batch_size)
        seconds = time.perf_counter() - started
        (out / "self-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"wrote {len(records)} self-answers to {out / 'self-train.jsonl'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
