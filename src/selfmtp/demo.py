"""`selfmtp demo`: the quickest end-to-end look at a model.

At this stage it loads the model, performs the `<mtp>` surgery and answers one GSM8K-style
question greedily (plain next-token decoding), reporting tokens/s.
"""

from __future__ import annotations

import time

import torch

from selfmtp.models import describe_model, load_model

DEMO_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def build_prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """Chat template when the tokenizer has one, else the question followed by a blank line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(question + "\n\n", return_tensors="pt")["input_ids"]
    return ids


def run_demo(spec: str, *, seed: int = 0, dtype: str = "float32", device: str = "cpu", max_new_tokens: int = 96) -> dict:
    torch.manual_seed(seed)
    model, tokenizer = load_model(spec, seed=seed, dtype=dtype, device=device)
    input_ids = build_prompt_ids(tokenizer, DEMO_QUESTION).to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - start
    new_ids = output[0, input_ids.shape[1]:]
    return {
        "model": spec,
        **describe_model(model, tokenizer),
        "question": DEMO_QUESTION,
        "answer": tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
        "new_tokens": int(new_ids.numel()),
        "seconds": seconds,
        "tokens_per_second": new_ids.numel() / seconds if seconds > 0 else float("nan"),
    }
