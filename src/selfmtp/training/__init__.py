"""Training: self-distil a causal LM into a multi-token predictor.

Components, each one idea: `data` (rows of tokens from jsonl), `layout` (pure tensor functions:
where the `<mtp>` blocks go, position ids, the blocked causal mask), `objective` (the online,
offline and ground-truth losses), `setup` (student, teacher, relabelling), `state` (atomic,
resumable checkpoints), `decode_eval` (decoding during training), `config` (TrainConfig, its sources
and checks), `step` (one optimizer step, the held-out evaluation). The recipe that runs them is
`trainer.train(TrainConfig(...))`.
"""

from selfmtp.training.config import TrainConfig, load_config_file
from selfmtp.training.trainer import train

__all__ = ["TrainConfig", "load_config_file", "train"]
