"""Start the server: probe the pass cost, start the engine thread, run uvicorn on the app."""

from __future__ import annotations

import socket
import threading
import time

from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost, pass_clock
from selfmtp.serving.app import create_app
from selfmtp.serving.config import ServeConfig, resolve_strategy
from selfmtp.serving.engine import Engine


def build(mtp, config: ServeConfig, log=print):
    """(engine, app) for a loaded `MTPModel`; the engine thread is started."""
    config.check()
    pass_cost = None
    if config.probe:
        probe = PassCost.measure(mtp.model, max_rows=config.max_batch)
        log("pass cost by tokens fed: " + probe.describe())
        pass_cost = LearnedPassCost(probe, clock=pass_clock(mtp.model.device))  # corrected by the served passes
    strategy, _ = resolve_strategy(config.strategy)
    engine = Engine(mtp, max_batch=config.max_batch, max_queue=config.max_queue, pass_cost=pass_cost,
                    auto_k_max=strategy.k_max).start()  # fmt: skip
    app = create_app(engine, model_name=config.model_name, default_strategy=config.strategy,
                     max_tokens_limit=config.max_tokens_limit, api_key=config.api_key)  # fmt: skip
    return engine, app


def serve(mtp, config: ServeConfig, log=print) -> None:
    """Run the server in this thread until interrupted."""
    import uvicorn

    engine, app = build(mtp, config, log)
    log(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 (strategy {config.strategy})")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()


class RunningServer:
    """A server on a loopback port in a background thread; `close()` stops it."""

    def __init__(self, mtp, config: ServeConfig):
        import uvicorn

        if config.port == 0:
            config.port = free_port(config.host)
        self.config = config
        self.engine, self.app = build(mtp, config, log=lambda *_: None)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
