"""selfmtp's decoding behind transformers' `generate` contract, for `model.generate(custom_generate=DIR, ...)`.

transformers (>= 4.56) runs `DIR/custom_generate/generate.py`'s `generate(model=..., **every generate argument)`
when a caller passes `custom_generate=DIR, trust_remote_code=True` (and on its own, in place of
`model.generate`, when the model was loaded from DIR with `trust_remote_code=True`). The `generate.py` that
selfmtp writes (`hf.export.write_custom_generate`) is one import of the function below, so a checkpoint
decodes with the same, tested loop as `selfmtp generate` (`decoding.loop.generate_batch`), not a copy.

What it takes: `input_ids` (B, L) or the positional `inputs`, an `attention_mask` whose zeros are left
padding, `strategy` ("verify[:K]", "confadapt:TAU[:KMAX]", "static:K", "ntp", ...; default "verify",
exact: the model's own greedy output), `max_new_tokens` (else `max_length`, else the generation config's),
`eos_token_id` and `pad_token_id` (else the generation config's), `return_dict_in_generate`. What it returns:
what transformers' greedy `generate` returns, the (B, L + new) LongTensor of the input followed by each
row's new tokens (after its EOS, `pad_token_id`), or with `return_dict_in_generate=True` a
`GenerateDecoderOnlyOutput` (`MTPGenerateOutput`) that adds `forward_passes` (B,) and `results` (one
`GenerationResult` per row: chunks, confidences, seconds). The plain tensor carries `forward_passes` as an
attribute too. Anything it does not implement (sampling, beams, logits processors, streamers, scores) is a
`ValueError` naming the argument, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.results import GenerationResult
from selfmtp.decoding.strategies import resolve_strategy
from selfmtp.errors import SelfMTPError

DEFAULT_STRATEGY = "verify"  # exact: the output is the model's greedy output, token for token
DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default when neither length is set

# generate() arguments that are used, or that transformers hands over and that mean nothing here
HANDLED = {"input_ids", "inputs", "attention_mask", "strategy", "max_new_tokens", "max_length", "eos_token_id",
           "pad_token_id", "bos_token_id", "return_dict_in_generate", "generation_config", "synced_gpus",
           "custom_generate", "trust_remote_code", "transformers_version", "_from_model_config"}
# values that ask for nothing beyond what this loop does (greedy readout, one sequence per prompt, a KV cache)
NEUTRAL = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "use_cache": True, "output_scores": False,
           "output_logits": False, "output_attentions": False, "output_hidden_states": False}
SAMPLING = {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
            "num_beams", "num_return_sequences", "penalty_alpha", "top_h"}


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' greedy output plus what a multi-token pass makes visible.

    forward_passes: (batch,) forward passes each row took (its new tokens / passes = tokens per pass).
    results: one `selfmtp.decoding.GenerationResult` per row (the tokens of every pass, confidences, seconds).
    """

    forward_passes: torch.LongTensor | None = None
    results: list[GenerationResult] | None = None


def generate(*args, model=None, **kwargs):
    """transformers' `generate(model=..., **kwargs)` for a model with `<mtp>`: see the module docstring.

    A mistake (a bad strategy, a model without `<mtp>`, a prompt over the context) is one ValueError."""
    try:
        return _generate(*args, model=model, **kwargs)
    except SelfMTPError as exc:
        raise ValueError(f"selfmtp: {exc}") from None


def _generate(*args, model=None, **kwargs):
    if model is None:
        if not args:
            raise TypeError("generate() needs the model: generate(model, input_ids, ...)")
        model, *args = args
    if len(args) > 1:
        raise TypeError("generate() takes the inputs as its only positional argument; pass the rest by name")
    if args:
        kwargs["inputs"] = args[0]
    request = _requested_settings(kwargs)
    _refuse_unsupported(request)
    strategy, load_aware = resolve_strategy(request.get("strategy") or DEFAULT_STRATEGY)
    if load_aware:
        raise ValueError(f"strategy {request['strategy']!r}: the load-aware `auto` strategies time the machine "
                         "first and keep state between calls; use them through `selfmtp generate` or `selfmtp serve`")
    input_ids, attention_mask = _inputs(request)
    prompts = [row[mask].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.bool(), strict=True)]
    config = model.generation_config
    eos = _setting(request, config, "eos_token_id")
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    pad = _setting(request, config, "pad_token_id")
    pad = pad if pad is not None else (eos[0] if eos else 0)  # as transformers: no pad id -> the first EOS
    results = generate_batch(model, prompts, strategy, max_new_tokens=_max_new_tokens(request, config, input_ids),
                             stop_token_ids=set(eos), pad_token_id=int(pad))
    return _as_generate_output(input_ids, results, int(pad), as_dict=bool(request.get("return_dict_in_generate")))


def _as_generate_output(input_ids: torch.Tensor, results: list[GenerationResult], pad: int, *, as_dict: bool):
    """What greedy `generate` returns: the input, then each row's new tokens, `pad` after a row's end."""
    width = max(len(r.token_ids) for r in results)
    new = torch.full((len(results), width), pad, dtype=torch.long)
    for i, result in enumerate(results):
        new[i, : len(result.token_ids)] = torch.tensor(result.token_ids, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    passes = torch.tensor([r.forward_passes for r in results], dtype=torch.long)
    if as_dict:
        return MTPGenerateOutput(sequences=sequences, forward_passes=passes, results=results)
    sequences.forward_passes = passes  # the dict form above is the stable way; a tensor op drops this
    return sequences


def _requested_settings(kwargs: dict) -> dict:
    """What the caller asked for: the keywords, over the non-default fields of a `generation_config` it passed.
    transformers passes every one of generate's own arguments, most of them None: those ask for nothing."""
    request = {}
    generation_config = kwargs.get("generation_config")
    if generation_config is not None:
        request.update({k: v for k, v in generation_config.to_dict().items() if v is not None})
    request.update({k: v for k, v in kwargs.items() if v is not None and k != "generation_config"})
    return request


def _refuse_unsupported(request: dict) -> None:
    for key, value in request.items():
        if key in HANDLED or NEUTRAL.get(key, object()) == value:
            continue
        if key in SAMPLING:
            raise ValueError(f"{key}={value!r}: selfmtp's custom_generate decodes greedily (the `strategy` says how "
                             "many tokens a pass keeps) and does not sample or search beams; for that, call "
                             "transformers' own `GenerationMixin.generate(model, ...)`")
        raise ValueError(f"{key}={value!r} is not supported by selfmtp's custom_generate (it takes input_ids, "
                         "attention_mask, strategy, max_new_tokens/max_length, eos_token_id, pad_token_id, "
                         "return_dict_in_generate)")


def _inputs(request: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L); the mask must be left padding (zeros, then ones)."""
    input_ids = request.get("input_ids", request.get("inputs"))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("pass input_ids as a (batch, length) LongTensor, e.g. tokenizer(..., return_tensors='pt')")
    mask = request.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    mask = mask.to(torch.long).cpu()
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("attention_mask must be left padding (zeros before each row's tokens, at least one token): "
                         "set tokenizer.padding_side = 'left'")
    return input_ids, mask


def _setting(request: dict, config, key: str):
    return request[key] if key in request else getattr(config, key, None) if config is not None else None


def _max_new_tokens(request: dict, config, input_ids: torch.Tensor) -> int:
    """As transformers counts it: max_new_tokens, else max_length minus the (padded) input length."""
    if "max_new_tokens" in request:
        value = request["max_new_tokens"]
    elif "max_length" in request:
        value = request["max_length"] - input_ids.shape[1]
    elif getattr(config, "max_new_tokens", None) is not None:
        value = config.max_new_tokens
    else:
        value = (getattr(config, "max_length", None) or DEFAULT_MAX_LENGTH) - input_ids.shape[1]
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"nothing to generate: max_new_tokens is {value} (max_length must exceed the input length)")
    return value

