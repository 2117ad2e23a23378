"""jsonl formats, templates, truncation and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfmtp.errors import SelfMTPError
from selfmtp.training.data import read_examples, render, tokenize_examples

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as in conftest.py


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_all_formats_parse(tmp_path):
    path = write(tmp_path, [
        {"question": "Q1?", "answer": "So 48/2 = <<48/2=24>>24.\n#### 24"},
        {"query": "Q2?", "response": "R2"},
        {"prompt": "Q3?", "response": "R3"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q4?"},
                      {"role": "assistant", "content": "R4"}]},
        "",
    ])
    examples, skipped = read_examples(path)
    assert skipped == 0 and len(examples) == 4
    assert examples[0].response == "So 48/2 = 24.\n#### 24"  # calculator annotation stripped
    assert read_examples(path, strip_calculator=False)[0][0].response.count("<<") == 1
    assert examples[3].prompt[0]["role"] == "system" and examples[3].response == "R4"


@pytest.mark.parametrize("line,reason", [
    ("{not json", "malformed line"),
    ('["a list"]', "JSON object"),
    ('{"foo": 1}', "expected keys"),
    ('{"question": 3, "answer": "x"}', "must be strings"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least two"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "assistant"),
])
def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path, line, reason):
    path = write(tmp_path, [{"prompt": "p", "response": "r"}, line])
    with pytest.raises(SelfMTPError, match=rf"d\.jsonl:2: .*{reason}"):
        read_examples(path)
    examples, skipped = read_examples(path, skip_bad_lines=True)
    assert (len(examples), skipped) == (1, 1)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SelfMTPError, match="not found"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(SelfMTPError, match="no usable examples"):
        read_examples(write(tmp_path, [""]))


def test_plain_and_chat_templates(tiny):
    _, tokenizer = tiny
    example = read_examples_from([{"prompt": "What is 2+2?", "response": "It is 4."}])[0]
    prompt, response = render(example, tokenizer, "plain")
    assert prompt[0] == tokenizer.bos_token_id and response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt[1:] + response[:-1]) == "What is 2+2?\n\nIt is 4."
    prompt, response = render(example, tokenizer, "chat")
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(response) == "It is 4.<|im_end|>" and response[-1] == tokenizer.eos_token_id
    with pytest.raises(SelfMTPError, match="unknown template"):
        render(example, tokenizer, "jinja")


def read_examples_from(records):
    from selfmtp.training.data import parse_example

    return [parse_example(r) for r in records]


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").exists(), reason="../shared/data not present")
def test_tokenize_gsm8k_rows(tiny):
    _, tokenizer = tiny
    examples, _ = read_examples(SHARED_DATA / "gsm8k" / "train.jsonl", limit=30)
    rows = tokenize_examples(examples, tokenizer, template="chat", seq_len=160)
    assert rows.input_ids.shape == (len(rows), 160) and len(rows) + rows.dropped == 30
    for ids, length, start in zip(rows.input_ids, rows.lengths, rows.response_start, strict=True):
        assert 0 < start < length - 1 <= 159
        text = tokenizer.decode(ids[start:length])
        assert "<<" not in text
        if length < 160:
            assert ids[length - 1] == tokenizer.eos_token_id and text.rstrip().endswith("<|im_end|>")
    with pytest.raises(SelfMTPError, match="no example fits"):
        tokenize_examples(examples[:2], tokenizer, template="chat", seq_len=8)


def _tokenizer_saying(tmp_path, tokenizer_class: str):
    """The SmolLM2 tokenizer re-saved with no BOS and `tokenizer_class` in its config, loaded back."""
    from transformers import AutoTokenizer

    from selfmtp.models.loading import load_tokenizer

    folder = tmp_path / tokenizer_class
    load_tokenizer("smollm2").save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = tokenizer_class
    config.pop("bos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def test_plain_template_starts_qwen_prompts_with_endoftext_as_the_paper_does(tmp_path):
    """The paper: Qwen3 sees BOS + prompt + "\\n\\n" + response; Qwen tokenizers have no BOS, their
    configs name <|endoftext|>. A tokenizer of another family without BOS gets none."""
    from selfmtp.evaluation.tasks import bos_prefix
    from selfmtp.training.data import Example

    example = Example([{"role": "user", "content": "What is 2+2?"}], "It is 4.")
    qwen = _tokenizer_saying(tmp_path, "Qwen2Tokenizer")
    assert type(qwen).__name__ == "Qwen2Tokenizer" and qwen.bos_token is None
    body = qwen("What is 2+2?\n\n", add_special_tokens=False)["input_ids"]
    response = qwen("It is 4.", add_special_tokens=False)["input_ids"]
    endoftext = qwen.convert_tokens_to_ids("<|endoftext|>")
    assert render(example, qwen, "plain") == ([endoftext, *body], [*response, qwen.eos_token_id])
    assert bos_prefix(qwen) == "<|endoftext|>"
    other = _tokenizer_saying(tmp_path, "TokenizersBackend")
    assert other.bos_token is None and render(example, other, "plain") == (body, [*response, other.eos_token_id])
    assert bos_prefix(other) == ""
