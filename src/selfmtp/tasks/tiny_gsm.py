"""tiny-gsm: procedural multi-step arithmetic word problems in GSM8K format.

A problem tracks one quantity (a person's items, or their dollars) through 2-4 operations; each
operation is one solution line whose result feeds the next, and the last line is `#### N`:

    Q: Mia has 14 pens. Mia buys 3 boxes of pens with 4 pens in each. Mia gives 5 pens to Leo.
       How many pens does Mia have now?
    A: Mia gets 3 * 4 = 12 pens, so Mia has 14 + 12 = 26 pens.
       Mia has 26 - 5 = 21 pens.
       #### 21

The language is deliberately regular (a tiny model learns it in minutes) while every answer needs
the intermediate results. Solution text mixes predictable boilerplate (names and nouns copied from
the question) with hard spans (computed numbers): the mix multi-token prediction is built for.

Train and test are disjoint by construction: a problem belongs to the test split exactly when a
hash of its question text falls in the test bucket, and each split rejects the other's problems.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
TEST_BUCKETS = 10  # out of 100: about 10% of the problem space is test-only
MAX_VALUE = 99  # every number a solution writes stays in 0..MAX_VALUE

NAMES = ("Tom", "Mia", "Leo", "Ann", "Sam", "Eva", "Ben", "Zoe", "Max", "Ivy", "Jack", "Lily")
ITEMS = (
    ("apples", "bags"), ("pens", "boxes"), ("cookies", "jars"), ("books", "crates"),
    ("marbles", "bags"), ("stickers", "sheets"), ("cards", "packs"), ("eggs", "cartons"),
    ("shells", "buckets"), ("toys", "boxes"),
)  # (item, container) pairs: "3 boxes of pens with 4 pens in each"
MONEY = "dollars"


@dataclass(frozen=True)
class Step:
    """One solution line: `op` applied to the running value with operands, giving `result`."""

    op: str  # "add" | "sub" | "pack" (add a*b) | "spend" (sub a*b) | "split" (divide)
    before: int
    operands: tuple[int, ...]
    result: int


@dataclass(frozen=True)
class TinyGSMProblem:
    question: str
    answer: str  # step-by-step solution ending in "#### N"
    answer_value: int
    start: int
    steps: tuple[Step, ...]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def question_split(question: str) -> str:
    """Which split a question belongs to (a pure function of its text: the disjointness rule)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_BUCKETS else "train"


def apply_step(op: str, before: int, operands: tuple[int, ...]) -> int:
    """The arithmetic of each operation, independent of the text (tests recompute with it)."""
    if op == "add":
        return before + operands[0]
    if op == "sub":
        return before - operands[0]
    if op == "pack":
        return before + operands[0] * operands[1]
    if op == "spend":
        return before - operands[0] * operands[1]
    if op == "split":
        quotient, remainder = divmod(before, operands[0])
        if remainder:
            raise ValueError(f"{before} does not split evenly into {operands[0]}")
        return quotient
    raise ValueError(f"unknown op {op!r}")


def generate_tiny_gsm(n: int, *, seed: int, split: str = "train") -> list[TinyGSMProblem]:
    """`n` distinct problems of `split`, deterministic in (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"tiny-gsm:{seed}:{split}")
    problems: list[TinyGSMProblem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem = _sample_problem(rng)
        if problem.question in seen or question_split(problem.question) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def generate_problems(n: int, *, seed: int, split: str = "train") -> list[dict]:
    """`n` problems as GSM8K-style `{"question", "answer"}` dicts."""
    return [problem.to_dict() for problem in generate_tiny_gsm(n, seed=seed, split=split)]


def write_jsonl(path: str | Path, problems: list[dict] | list[TinyGSMProblem]) -> Path:
    """One JSON object per line, `{"question", "answer"}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            record = problem.to_dict() if isinstance(problem, TinyGSMProblem) else problem
            handle.write(json.dumps(record) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Sampling: choose the story, then draw operands that keep every value in 0..MAX_VALUE.


def _sample_problem(rng: random.Random) -> TinyGSMProblem:
    person, friend = rng.sample(NAMES, 2)
    item, container = rng.choice(ITEMS)
    money = rng.random() < 0.3
    unit = MONEY if money else item
    value = rng.randint(20, 60) if money else rng.randint(2, 30)
    start = value
    n_ops = rng.randint(2, 4)
    sentences = [f"{person} has {value} {unit}."]
    lines: list[str] = []
    steps: list[Step] = []
    for index in range(n_ops):
        last = index == n_ops - 1
        op, operands = _sample_op(rng, value, money=money, last=last)
        result = apply_step(op, value, operands)
        ctx = {"p": person, "f": friend, "item": item, "box": container, "unit": unit}
        sentences.append(_QUESTION_TEXT[op](ctx, operands))
        lines.append(_SOLUTION_TEXT[op](ctx, value, operands, result))
        steps.append(Step(op, value, operands, result))
        value = result
    if steps[-1].op == "split":
        who = "friend" if not money else "box"
        sentences.append(f"How many {unit} does each {who} get?")
    else:
        sentences.append(f"How many {unit} does {person} have now?")
    lines.append(f"#### {value}")
    return TinyGSMProblem(" ".join(sentences), "\n".join(lines), value, start, tuple(steps))


def _sample_op(rng: random.Random, value: int, *, money: bool, last: bool) -> tuple[str, tuple[int, ...]]:
    """Pick an operation valid at `value` (no negatives, no remainders, nothing above MAX_VALUE)."""
    choices = []
    if value + 2 <= MAX_VALUE:
        choices.append(("add", (rng.randint(2, min(20, MAX_VALUE - value)),)))
    if value >= 3:
        choices.append(("sub", (rng.randint(1, min(20, value - 1)),)))
    multiplier = "spend" if money else "pack"
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    if money:
        pairs = [(a, b) for a, b in pairs if a * b < value]
    else:
        pairs = [(a, b) for a, b in pairs if value + a * b <= MAX_VALUE]
    if pairs:
        choices.append((multiplier, rng.choice(pairs)))
    divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
    if last and divisors and value >= 4:
        choices.append(("split", (rng.choice(divisors),)))
    return rng.choice(choices)


def _split_text(ctx: dict, operands: tuple[int, ...]) -> str:
    if ctx["unit"] == MONEY:
        return f"{ctx['p']} puts the {MONEY} equally into {operands[0]} boxes."
    return f"{ctx['p']} shares the {ctx['item']} equally among {operands[0]} friends."


_QUESTION_TEXT = {
    "add": lambda c, o: (
        f"{c['p']} earns {o[0]} more {MONEY}." if c["unit"] == MONEY else f"{c['p']} buys {o[0]} more {c['item']}."
    ),
    "sub": lambda c, o: f"{c['p']} gives {o[0]} {c['unit']} to {c['f']}.",
    "pack": lambda c, o: f"{c['p']} buys {o[0]} {c['box']} of {c['item']} with {o[1]} {c['item']} in each.",
    "spend": lambda c, o: f"{c['p']} buys {o[0]} {c['item']} that cost {o[1]} {MONEY} each.",
    "split": _split_text,
}
_SOLUTION_TEXT = {
    "add": lambda c, v, o, r: f"{c['p']} has {v} + {o[0]} = {r} {c['unit']}.",
    "sub": lambda c, v, o, r: f"{c['p']} has {v} - {o[0]} = {r} {c['unit']}.",
    "pack": lambda c, v, o, r: (
        f"{c['p']} gets {o[0]} * {o[1]} = {o[0] * o[1]} {c['item']}, so {c['p']} has {v} + {o[0] * o[1]} = {r} {c['item']}."
    ),
    "spend": lambda c, v, o, r: (
        f"{c['p']} pays {o[0]} * {o[1]} = {o[0] * o[1]} {MONEY}, so {c['p']} has {v} - {o[0] * o[1]} = {r} {MONEY}."
    ),
    "split": lambda c, v, o, r: f"Each gets {v} / {o[0]} = {r} {c['unit']}.",
}
