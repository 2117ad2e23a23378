"""KV-cached multi-token decoding (METHOD.md, "Inference"), several prompts at once.

One pass feeds, per row, the tokens accepted last step (the whole prompt on the first pass) plus
k-1 `<mtp>` masks. The logits at the last real token and at each mask propose k tokens, read out
greedily with their max-softmax confidences; the strategy says how many leading ones to keep.
The masks' KV entries are then cropped off, so the cache only ever holds real tokens and plain
causal attention is right for every pass. k is k_max unless the strategy adapts it from pass to
pass (`strategies.next_proposals`); each result records the tokens every pass fed (`tokens_fed`).

Batching: rows are left padded and each row's new tokens are right aligned, so the masks of every
row sit at the end (one crop serves all rows) and the proposals are the last k logits of every
row. With adaptive k a pass feeds the largest k any row asks for; a row reads only its own first k
proposals, so it decodes exactly as it would alone. Pads stay in the cache and are masked out by an explicit 4-D attention mask; position ids are
counted per row over real tokens only, so each row sees exactly what it would see alone.

The loop itself is `batch.BatchDecoder` (rows may also join mid-decode, as a server needs);
`generate_batch` adds every prompt and steps until all are done. A row's state, stop rules and
acceptance are decoding/rows.py; the layout of one pass is decoding/pass_layout.py. Exact decoding
(`verify`) is a row kind of the same loop: its rows also feed drafts as real tokens (decoding/verify.py).
"""

from __future__ import annotations

from transformers import DynamicCache

from selfmtp.decoding.batch import BatchDecoder
from selfmtp.decoding.kv_cache import has_plain_cache, preallocated_cache
from selfmtp.decoding.results import GenerationResult
from selfmtp.decoding.rows import mask_token_id
from selfmtp.decoding.strategies import Strategy, with_model_defaults
from selfmtp.errors import SelfMTPError


def generate_batch(
    model,
    prompts: list[list[int]],
    strategy: Strategy,
    *,
    max_new_tokens: int,
    stop_token_ids=(),
    stop_strings=(),
    tokenizer=None,
    pad_token_id: int = 0,
    load_aware=None,
) -> list[GenerationResult]:
    """Decode all `prompts` (token id lists) together; results are in prompt order.

    `load_aware` (a `load_aware.LoadAware`): cap each pass's proposals by its rule (`auto` strategies);
    its acceptance stats carry over from call to call.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    if max_new_tokens < 1:
        raise SelfMTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    strategy = with_model_defaults(strategy, model)
    n_masks = strategy.k_max - 1
    mask_token_id(model, n_masks)
    _croppable_cache(model, n_masks, batched=len(prompts) > 1)  # refuse before any work
    decoder = BatchDecoder(
        model, tokenizer=tokenizer, pad_token_id=pad_token_id,
        cache_factory=lambda: _croppable_cache(model, n_masks, batched=len(prompts) > 1), load_aware=load_aware,
    )  # fmt: skip
    rows = [
        decoder.add(prompt, strategy, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                    stop_strings=stop_strings, load_aware=load_aware is not None)  # fmt: skip
        for prompt in prompts
    ]
    while decoder.active:
        decoder.step()
    return [row.result(tokenizer) for row in rows]


def _croppable_cache(model, n_masks: int, *, batched: bool) -> DynamicCache:
    """A cache that can drop the masks' entries; refuse models where that is not so.

    Batches need our own 4-D mask, which would override a sliding window, so they need a plain cache too.
    """
    if has_plain_cache(model):
        return preallocated_cache(model)
    cache = DynamicCache(config=model.config)
    kinds = ", ".join(sorted({type(layer).__name__ for layer in cache.layers} - {"DynamicLayer"}))
    if n_masks:
        raise SelfMTPError(
            f"{model.config.model_type} models keep a {kinds} cache that cannot drop the <mtp> masks' "
            "entries: only ntp decoding is supported for this model"
        )
    if batched:
        raise SelfMTPError(
            f"{model.config.model_type} models keep a {kinds} cache: decode one prompt at a time"
        )
    return cache
