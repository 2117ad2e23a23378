"""Decoding: the KV-cached multi-token loop and the strategies that say how many proposals to keep.

`loop.generate_batch` decodes several prompts at once, a thin wrapper over the one decode loop,
`batch.BatchDecoder` (rows join and leave between passes); `rows` is one prompt's state, stop rules
and acceptance, `pass_layout` one pass's inputs and attention mask. A strategy (`strategies.parse_strategy`:
ntp, static:K, confadapt:TAU...) answers how many of a pass's proposals to accept, and the exact
`verify:K[:tree]` checks the masks' drafts in the next pass (`verify`); `kv_cache` is the
croppable cache the loop runs on; `results` is what a generation returns and how generations add
up (`summarize`); `chunk_view` shows which tokens each forward pass produced.
"""

from selfmtp.decoding.loop import generate_batch
from selfmtp.decoding.results import Chunk, GenerationResult, summarize
from selfmtp.decoding.strategies import (
    NTP,
    STRATEGY_HELP,
    AdaptiveConfAdapt,
    ConfAdapt,
    Static,
    Strategy,
    Verify,
    parse_strategy,
)

__all__ = [
    "NTP",
    "STRATEGY_HELP",
    "AdaptiveConfAdapt",
    "Chunk",
    "ConfAdapt",
    "GenerationResult",
    "Static",
    "Strategy",
    "Verify",
    "generate_batch",
    "parse_strategy",
    "summarize",
]
