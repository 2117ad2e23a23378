"""The server's settings and strategy names (no web stack imported: the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from selfmtp.decoding.strategies import AUTO_HELP, resolve_strategy
from selfmtp.errors import SelfMTPError

__all__ = ["AUTO_HELP", "ServeConfig", "resolve_strategy"]


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
