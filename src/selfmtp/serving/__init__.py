"""`selfmtp serve`: an OpenAI-compatible server with multi-token streaming and continuous batching.

`serve(...)` loads a model, probes its pass cost (for the load-aware `auto` strategy; the engine then
corrects that curve by its own timed passes, `LearnedPassCost`), starts the
engine thread (`engine.Engine`, stepping a `decoding.batch.BatchDecoder`) and runs uvicorn on the
FastAPI app (`app.create_app`). `start_server` does the same in a background thread (tests, benchmarks).
"""

from __future__ import annotations

from selfmtp.decoding.load_aware import AcceptanceStats, ProposalRule
from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost
from selfmtp.serving.config import AUTO_HELP, ServeConfig, resolve_strategy


def serve(mtp, config: ServeConfig, log=print) -> None:
    """Run the server in this thread until interrupted (imports the web stack only now)."""
    from selfmtp.serving.server import serve as run

    run(mtp, config, log)


def start_server(mtp, config: ServeConfig):
    """A `server.RunningServer` on `config.port` (0: a free one) in a background thread; `.close()` stops it."""
    from selfmtp.serving.server import RunningServer

    return RunningServer(mtp, config)


__all__ = [
    "AUTO_HELP", "AcceptanceStats", "LearnedPassCost", "PassCost", "ProposalRule", "ServeConfig", "resolve_strategy",
    "serve", "start_server",
]  # fmt: skip
