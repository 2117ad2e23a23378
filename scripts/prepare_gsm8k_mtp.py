"""GSM8K data for the real-model MTP recipe: a fixed train/dev split, optionally self-answers.

    PYTHONPATH=src python scripts/prepare_gsm8k_mtp.py --output data/gsm8k-mtp
    PYTHONPATH=src python scripts/prepare_gsm8k_mtp.py --output data/gsm8k-mtp --self-answers 300
    PYTHONPATH=src python scripts/prepare_gsm8k_mtp.py --output data/gsm8k-mtp --dev-self-answers 32 --mix

Split: the last `--dev` lines (default 300) of GSM8K train.jsonl are the dev set, the rest is
train; both are copied verbatim (selfmtp.training.data strips the <<a*b=c>> calculator annotations when it
reads them). With `--self-answers N`, the original model answers the first N train questions
greedily (chat template, our NTP decode loop) and `self-train.jsonl` gets {"question", "answer"}
records holding those answers: training prefixes like the ones the model meets at inference.
The answers are appended batch by batch; rerunning the same command continues where it stopped.
An answer cut by --max-new-tokens gets an EOS appended when selfmtp.training.data reads it; with the default
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


def self_answers(questions: list[str], model: str, max_new_tokens: int, batch_size: int, path: Path,
                 dtype: str = "float32") -> int:
    """Append the model's own greedy chat answers to `path`, one {"question", "answer"} record each.

    Resumable: questions already answered in `path` (a run that was stopped) are skipped, and each
    batch is appended and flushed as soon as it is decoded, so a kill loses one batch at most.
    Returns how many records `path` holds for `questions`.
    """
    from tqdm import tqdm

    from selfmtp.api import MTPModel

    done = _answered(path, len(questions))
    todo = questions[done:]
    if not todo:
        return done
    mtp = MTPModel.from_pretrained(model, dtype=dtype)
    with path.open("a", encoding="utf-8") as out:
        for lo in tqdm(range(0, len(todo), batch_size), desc="self-answers", mininterval=10):
            group = todo[lo : lo + batch_size]
            results = mtp.generate(group, strategy="ntp", max_new_tokens=max_new_tokens, chat=True, batch_size=batch_size)
            for q, r in zip(group, results, strict=True):
                out.write(json.dumps({"question": q, "answer": r.text, "stop_reason": r.stop_reason}) + "\n")
            out.flush()
    return done + len(todo)


def _answered(path: Path, limit: int) -> int:
    """Complete records already in `path` (a torn last line from a kill is cut off)."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        path.write_text(complete, encoding="utf-8")
    return min(limit, len(complete.splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(GSM8K), help="GSM8K train.jsonl")
    parser.add_argument("--output", required=True, help="folder for train.jsonl, dev.jsonl (and self-train.jsonl)")
    parser.add_argument("--dev", type=int, default=300, help="dev problems: the last N lines (default 300)")
    parser.add_argument("--self-answers", type=int, default=0, metavar="N", help="greedy answers to N train questions")
    parser.add_argument("--dev-self-answers", type=int, default=0, metavar="N",
                        help="greedy answers to the first N dev questions (dev-self.jsonl: held-out text the model wrote)")
    parser.add_argument("--mix", action="store_true",
                        help="also write mix-train.jsonl: the self-answers, then the train problems' reference solutions")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="decode dtype (bfloat16: ~2x faster on a CPU with native bf16; its greedy text may differ"
                        " from float32's after a near-tie)")
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = split(Path(args.source).read_text(encoding="utf-8").splitlines(), args.dev)
    (out / "train.jsonl").write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    (out / "dev.jsonl").write_text("".join(f"{line}\n" for line in dev), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(dev)} dev problems to {out}")
    if args.self_answers:
        questions = [json.loads(line)["question"] for line in train[: args.self_answers]]
        path = out / "self-train.jsonl"
        started = time.perf_counter()
        count = self_answers(questions, args.model, args.max_new_tokens, args.batch_size, path, args.dtype)
        seconds = time.perf_counter() - started
        print(f"{path} holds {count} self-answers ({seconds:.0f} s in this run)")
    if args.dev_self_answers:
        questions = [json.loads(line)["question"] for line in dev[: args.dev_self_answers]]
        count = self_answers(questions, args.model, args.max_new_tokens, args.batch_size, out / "dev-self.jsonl", args.dtype)
        print(f"{out / 'dev-self.jsonl'} holds {count} self-answers to dev questions")
    if args.mix:
        # Gated offline training relabels every row with the original model's greedy choices, so text
        # the model did not write (the reference solutions) still teaches the masks its own next tokens.
        own = out / "self-train.jsonl"
        lines = (own.read_text(encoding="utf-8").splitlines() if own.exists() else []) + train
        (out / "mix-train.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} records to {out / 'mix-train.jsonl'}")

if __name__ == "__main__":
    main()
