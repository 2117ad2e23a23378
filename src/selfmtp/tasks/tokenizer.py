"""A small byte-level BPE tokenizer for tiny-gsm, saved as a transformers `PreTrainedTokenizerFast`.

Pre-tokenization makes arithmetic and the prompt/response boundary easy to learn and stable:
every digit is its own token (the model adds digit by digit), and every newline is its own token,
so `encode(prompt + "\\n\\n") + encode(response)` equals `encode(prompt + "\\n\\n" + response)`:
the plain template (BOS + prompt + "\\n\\n" + response + EOS) tokenizes the same whether the two
parts are encoded together or apart. Byte-level BPE keeps the text round trip exact.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
PROMPT_SEPARATOR = "\n\n"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` (digits and newlines split) and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


def encode_plain(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], int]:
    """Plain template ids: BOS + prompt + "\\n\\n" (+ response + EOS); returns (ids, prompt length)."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt + PROMPT_SEPARATOR, add_special_tokens=False)]
    if response is None:
        return prompt_ids, len(prompt_ids)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    return [*prompt_ids, *response_ids, tokenizer.eos_token_id], len(prompt_ids)
