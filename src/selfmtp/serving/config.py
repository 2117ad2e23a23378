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
    allow_no_key: bool = False  # serve beyond loopback without a key (with a warning)
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int = 512
    max_k: int | None = None  # proposals per pass, any strategy (None: the model's trained k_max, else 16)
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_stop_chars: int = 256
    limit_concurrency: int = 256  # open connections and tasks; more get uvicorn's 503
    request_timeout: float = 600.0  # seconds from the request's first byte to its answer's last
    probe: bool = True  # measure the pass-cost curve at start-up (needed by 'auto')

    def check(self) -> None:
        resolve_strategy(self.strategy)  # SelfMTPError for a bad name
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes", "max_messages", "max_stop_chars",
                     "limit_concurrency"):  # fmt: skip
            if getattr(self, name) < 1:
                raise SelfMTPError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_k is not None and self.max_k < 2:
            raise SelfMTPError(f"--max-k must be >= 2, got {self.max_k}")
        if not self.request_timeout > 0:
            raise SelfMTPError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if not 0 <= self.port < 65536:
            raise SelfMTPError(f"--port must be in 0..65535, got {self.port}")
