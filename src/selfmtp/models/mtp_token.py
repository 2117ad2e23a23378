"""The `<mtp>` token: the one special token and embedding row that make a causal LM a multi-token predictor.

The surgery adds `<mtp>` to the tokenizer and one row to the input and output embeddings, drawn from
the mean and variance of the existing rows; the model keeps its architecture, so any stock loader
still reads the checkpoint. The token's id is recorded in the model config (`MTP_CONFIG_KEY`), which
is how every other part of selfmtp finds it.
"""

from __future__ import annotations

import torch

MTP_TOKEN = "<mtp>"
MTP_CONFIG_KEY = "mtp_mask_token_id"
K_MAX_CONFIG_KEY = "selfmtp_k_max"  # the trained k_max, written into a checkpoint's config at export


def mtp_token_id(model) -> int | None:
    """The `<mtp>` id recorded in the model config, or None for an unconverted model."""
    return getattr(model.config, MTP_CONFIG_KEY, None)


def add_mtp_token(model, tokenizer, *, seed: int = 0) -> int:
    """Add `<mtp>` to tokenizer and model (idempotent); return its id.

    The new input and output rows are drawn from a Gaussian with the per-dimension mean and
    variance of the existing rows, so the mask token starts "in distribution" and every original
    token's logits are unchanged (the resize copies the old rows exactly).
    """
    existing = mtp_token_id(model)
    if existing is not None and tokenizer.convert_tokens_to_ids(MTP_TOKEN) == existing:
        return existing
    tokenizer.add_tokens([MTP_TOKEN], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(MTP_TOKEN)
    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if token_id >= old_rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    reference_rows = min(old_rows, token_id)  # rows of real tokens only
    with torch.no_grad():
        _init_row_from_stats(model.get_input_embeddings().weight, token_id, reference_rows, generator)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            _init_row_from_stats(output.weight, token_id, reference_rows, generator)
            if getattr(output, "bias", None) is not None:
                output.bias[token_id] = output.bias[:reference_rows].mean()
    setattr(model.config, MTP_CONFIG_KEY, token_id)
    return token_id


def _init_row_from_stats(weight: torch.Tensor, row: int, reference_rows: int, generator: torch.Generator) -> None:
    ref = weight[:reference_rows].float()
    mean, std = ref.mean(dim=0), ref.std(dim=0)
    noise = torch.randn(weight.shape[1], generator=generator)
    weight[row] = (mean + std * noise).to(weight.dtype)
