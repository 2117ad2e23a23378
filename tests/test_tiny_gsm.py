"""tiny-gsm generator, its tokenizer, the teacher recipe, and the packaged teacher."""

from __future__ import annotations

import json
import re

import pytest

from selfmtp.tasks.pretrain_teacher import (
    TeacherConfig,
    answer_number,
    greedy_accuracy,
    pretrain_tiny_teacher,
)
from selfmtp.tasks.tiny_gsm import (
    generate_problems,
    generate_tiny_gsm,
    question_split,
    write_jsonl,
)
from selfmtp.tasks.tokenizer import PROMPT_SEPARATOR, encode_plain, train_tokenizer

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_PYTHON_OP = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{p['question']}{PROMPT_SEPARATOR}{p['answer']}" for p in generate_problems(500, seed=1)]
    return train_tokenizer(texts, vocab_size=400)


def test_generator_is_deterministic_by_seed_and_split():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)
    assert generate_problems(20, seed=3, split="test") == generate_problems(20, seed=3, split="test")
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, split="dev")


def test_train_and_test_are_disjoint():
    train = {p["question"] for p in generate_problems(4000, seed=0, split="train")}
    test = {p["question"] for p in generate_problems(400, seed=0, split="test")}
    other_seed_test = {p["question"] for p in generate_problems(400, seed=7, split="test")}
    assert len(train) == 4000 and len(test) == 400  # distinct within a split
    assert not train & test and not train & other_seed_test
    # the rule itself: membership is a pure function of the question text
    assert {question_split(q) for q in train} == {"train"}
    assert {question_split(q) for q in test} == {"test"}


def test_solutions_are_arithmetically_correct_and_chained():
    for problem in generate_tiny_gsm(500, seed=2):
        assert 2 <= len(problem.steps) <= 4
        value = problem.start
        for step in problem.steps:
            assert step.before == value  # each step starts from the previous result
            value = _recompute(step.op, value, step.operands)
            assert step.result == value and 0 <= value <= 99
        assert problem.answer_value == value
        equations = _EQUATION.findall(problem.answer)
        assert equations, problem.answer
        for left, op, right, result in equations:  # every equation written in the text is true
            assert _PYTHON_OP[op](int(left), int(right)) == int(result)
            if op == "/":
                assert int(left) % int(right) == 0
        assert int(equations[-1][3]) == value  # the last equation is the answer
        assert str(problem.start) in problem.question


def _recompute(op: str, value: int, operands: tuple[int, ...]) -> int:
    """Independent of the library's apply_step: the meaning of each operation."""
    product = operands[0] * operands[1] if len(operands) == 2 else None
    return {
        "add": lambda: value + operands[0],
        "sub": lambda: value - operands[0],
        "pack": lambda: value + product,
        "spend": lambda: value - product,
        "split": lambda: value // operands[0],
    }[op]()


def test_answer_format_is_gsm8k(tmp_path):
    problems = generate_problems(30, seed=0, split="test")
    path = write_jsonl(tmp_path / "test.jsonl", problems)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == problems
    for record, problem in zip(records, generate_tiny_gsm(30, seed=0, split="test"), strict=True):
        assert set(record) == {"question", "answer"}
        last_line = record["answer"].splitlines()[-1]
        assert re.fullmatch(r"#### \d+", last_line)
        assert last_line == f"#### {problem.answer_value}"
        assert answer_number(record["answer"]) == str(problem.answer_value)
        assert record["question"].endswith("?")


def test_tokenizer_round_trips_and_template_is_stable(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for problem in generate_problems(50, seed=5, split="test"):
        text = f"{problem['question']}{PROMPT_SEPARATOR}{problem['answer']}"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # every digit is its own token
        assert all(not any(c.isdigit() for c in t) or len(t) == 1 for t in tokenizer.convert_ids_to_tokens(ids))
        # plain template: BOS + prompt + "\n\n" + response + EOS, same ids whether encoded jointly or apart
        full, prompt_len = encode_plain(tokenizer, problem["question"], problem["answer"])
        assert full == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        assert full[:prompt_len] == encode_plain(tokenizer, problem["question"])[0]


def test_packaged_teacher_answers_test_problems():
    from selfmtp.models.loading import load_model
    from selfmtp.models.mtp_token import mtp_token_id

    model, tokenizer = load_model("tiny-gsm-teacher", add_mtp=False)
    assert mtp_token_id(model) is None and len(tokenizer) == model.config.vocab_size
    problems = generate_tiny_gsm(10, seed=123, split="test")
    result = greedy_accuracy(model, tokenizer, problems, batch_size=10)
    assert result["accuracy"] >= 0.7, result["outputs"]
    model_mtp, _ = load_model("tiny-gsm-teacher")  # the <mtp> surgery works on it too
    assert mtp_token_id(model_mtp) == model.config.vocab_size


def test_pretraining_smoke_loss_decreases(tmp_path):
    config = TeacherConfig(
        n_train=64, n_test=4, tokenizer_texts=64, vocab_size=300, layers=1, hidden=32, heads=2, kv_heads=1,
        intermediate=64, steps=12, batch_size=8, lr=1e-2, warmup_steps=2, max_new_tokens=8,
        eval_batch_size=4, output_dir=str(tmp_path / "teacher"),
    )
    metrics = pretrain_tiny_teacher(config)
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5
    recipe = json.loads((tmp_path / "teacher" / "recipe.json").read_text())
    assert recipe["config"]["steps"] == 12 and 0.0 <= recipe["test_accuracy"] <= 1.0
    assert (tmp_path / "teacher" / "model.safetensors").exists()
