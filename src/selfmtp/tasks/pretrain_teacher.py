"""Pretrain a tiny Llama from scratch on tiny-gsm: the NTP teacher for CPU-scale experiments.

Recipe: generate tiny-gsm train problems, train a byte-level BPE tokenizer on them, build a small
`LlamaForCausalLM` (tied embeddings), and train it with next-token cross-entropy on the response
tokens of the plain template (BOS + question + "\\n\\n" + answer + EOS) with AdamW, linear warm-up
and cosine decay. Then measure greedy accuracy on tiny-gsm test problems with transformers
`generate` and save a standard HF checkpoint with a `recipe.json` beside it.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from selfmtp.files import write_json_atomic
from selfmtp.models.loading import tiny_llama_config
from selfmtp.progress import progress_bar, progress_write
from selfmtp.tasks.tiny_gsm import generate_tiny_gsm
from selfmtp.tasks.tokenizer import encode_plain, train_tokenizer

IGNORE_INDEX = -100
_NUMBER = re.compile(r"-?\d+")


@dataclass
class TeacherConfig:
    seed: int = 0
    n_train: int = 60_000
    n_test: int = 200
    vocab_size: int = 512
    tokenizer_texts: int = 5_000
    layers: int = 3
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    context: int = 256
    steps: int = 1_600
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # One thread: on a shared 2-core box, 2 intra-op threads per process spin in OpenMP barriers;
    # measured here, 1 thread ran this model 20x faster per step than 2 under load.
    threads: int = 1
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 100
    max_new_tokens: int = 120
    output_dir: str | None = None


def answer_number(text: str) -> str | None:
    """The number after `####`, else the last number in `text` (what we grade teachers on)."""
    _, sep, tail = text.partition("####")
    numbers = _NUMBER.findall(tail if sep else text)
    if sep and numbers:
        return numbers[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def build_model(config: TeacherConfig, tokenizer) -> LlamaForCausalLM:
    llama_config = tiny_llama_config(
        tokenizer, hidden=config.hidden, intermediate=config.intermediate, layers=config.layers,
        heads=config.heads, kv_heads=config.kv_heads, context=config.context,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama_config)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are the response tokens (prompt and padding ignored)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def lr_at(step: int, config: TeacherConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, *, batch_size: int = 100, max_new_tokens: int = 120) -> dict:
    """Greedy `generate` on `problems` (left-padded batches); fraction whose answer number is right."""
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    correct, outputs = 0, []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [encode_plain(tokenizer, p.question)[0] for p in chunk]
            batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
            generated = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            for problem, row in zip(chunk, generated[:, batch["input_ids"].shape[1] :], strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(text)
                correct += answer_number(text) == str(problem.answer_value)
    finally:
        tokenizer.padding_side = padding_side
    return {"accuracy": correct / max(1, len(problems)), "n": len(problems), "outputs": outputs}


def pretrain_tiny_teacher(config: TeacherConfig | dict) -> dict:
    """Run the whole recipe; returns metrics (and writes the checkpoint if `output_dir` is set)."""
    config = config if isinstance(config, TeacherConfig) else TeacherConfig(**config)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    train = generate_tiny_gsm(config.n_train, seed=config.seed, split="train")
    test = generate_tiny_gsm(config.n_test, seed=config.seed, split="test")
    tokenizer = train_tokenizer(
        [f"{p.question}\n\n{p.answer}" for p in train[: config.tokenizer_texts]], vocab_size=config.vocab_size
    )
    encoded = [encode_plain(tokenizer, p.question, p.answer) for p in train]
    model = build_model(config, tokenizer)
    losses = _train(model, encoded, tokenizer.pad_token_id, config, test, tokenizer)
    train_seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10) :]
    result = greedy_accuracy(model, tokenizer, test, batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
    metrics = {
        "test_accuracy": result["accuracy"],
        "test_n": result["n"],
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "final_loss": round(sum(tail) / len(tail), 5),
        "losses": losses,
        "config": asdict(config),
        "sample_output": result["outputs"][0] if result["outputs"] else "",
    }
    if config.output_dir:
        save_teacher(model, tokenizer, Path(config.output_dir), metrics)
    return metrics


def _train(model, encoded, pad_id: int, config: TeacherConfig, test, tokenizer) -> list[float]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    batches = _length_bucketed_batches(encoded, config.batch_size, random.Random(config.seed))
    losses: list[float] = []
    progress = progress_bar(range(config.steps), desc="pretrain teacher", mininterval=5)
    for step in progress:
        batch = collate(next(batches), pad_id)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(round(loss.item(), 5))
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(step, config):.2e}")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            probe = greedy_accuracy(model, tokenizer, test[:100], max_new_tokens=config.max_new_tokens)
            progress_write(f"step {step + 1}: loss {loss.item():.4f} test accuracy {probe['accuracy']:.3f} (n=100)")
    return losses


def _length_bucketed_batches(encoded: list, batch_size: int, rng: random.Random, pool: int = 16):
    """Endless shuffled batches; each pool of `pool` batches is sorted by length to cut padding."""
    span = batch_size * pool
    while True:
        order = rng.sample(range(len(encoded)), len(encoded))
        for start in range(0, len(order), span):  # a short last pool just gives a few short batches
            chunk = sorted(order[start : start + span], key=lambda i: len(encoded[i][0]))
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(batches)
            yield from ([encoded[i] for i in batch] for batch in batches)


def save_teacher(model, tokenizer, out_dir: Path, metrics: dict) -> Path:
    """HF checkpoint (safetensors, tokenizer, greedy generation config) plus `recipe.json`."""
    from selfmtp.models.loading import save_checkpoint

    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=metrics["config"]["max_new_tokens"],
    )
    save_checkpoint(model, tokenizer, out_dir)
    recipe = {key: value for key, value in metrics.items() if key != "losses"}
    recipe["loss_every_100_steps"] = metrics["losses"][::100]
    write_json_atomic(out_dir / "recipe.json", recipe)
    return out_dir
