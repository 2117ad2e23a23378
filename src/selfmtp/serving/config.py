"""The server's settings and strategy names (no web stack imported: the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from selfmtp.decoding.strategies import ConfAdapt, Strategy, parse_strategy
from selfmtp.errors import SelfMTPError

AUTO = "auto"
AUTO_HELP = "auto[:TAU[:KMAX]] (ConfAdapt whose mask count follows the load; default auto:0.9:16)"


def resolve_strategy(text: str) -> tuple[Strategy, bool]:
    """A strategy name -> (strategy, load_aware). 'auto[:TAU[:KMAX]]' is ConfAdapt with a load-aware cap."""
    parts = (text or "").strip().lower().split(":")
    if parts[0] != AUTO:
        return parse_strategy(text), False
    if len(parts) > 3:
        raise SelfMTPError(f"unknown strategy {text!r}: use {AUTO_HELP}")
    inner = parse_strategy(":".join(["confadapt", parts[1] if len(parts) > 1 else "0.9", *parts[2:]]))
    return ConfAdapt(inner.tau, inner.k_max), True


@dataclass
class ServeConfig:
    model_name: str = "selfmtp"
    strategy: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int = 512
    probe: bool = True  # measure the pass-cost curve at start-up (needed by 'auto')

    def check(self) -> None:
        resolve_strategy(self.strategy)  # SelfMTPError for a bad name
        for name in ("max_batch", "max_queue", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise SelfMTPError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise SelfMTPError(f"--port must be in 0..65535, got {self.port}")
