"""Start the server: probe the pass cost, start the engine thread, run uvicorn on the app."""

from __future__ import annotations

import socket
import threading
import time

from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost, pass_clock
from selfmtp.serving.app import create_app
from selfmtp.serving.auth import check_exposure
from selfmtp.serving.config import ServeConfig, resolve_strategy
from selfmtp.serving.engine import Engine
from selfmtp.serving.metrics import Metrics


def build(mtp, config: ServeConfig, log=print):
    """(engine, app) for a loaded `MTPModel`; the engine thread is started."""
    config.check()
    check_exposure(config.host, config.api_key, config.allow_no_key, log)
    pass_cost = None
    if config.probe:
        probe = PassCost.measure(mtp.model, max_rows=config.max_batch)
        log("pass cost by tokens fed: " + probe.describe())
        pass_cost = LearnedPassCost(probe, clock=pass_clock(mtp.model.device))  # corrected by the served passes
    strategy, _ = resolve_strategy(config.strategy)
    metrics = Metrics()
    engine = Engine(mtp, max_batch=config.max_batch, max_queue=config.max_queue, pass_cost=pass_cost,
                    auto_k_max=strategy.k_max, max_k=config.max_k, metrics=metrics).start()  # fmt: skip
    return engine, create_app(engine, config, metrics)


def uvicorn_config(app, config: ServeConfig):
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                          limit_concurrency=config.limit_concurrency, timeout_keep_alive=5)  # fmt: skip


def serve(mtp, config: ServeConfig, log=print) -> None:
    """Run the server in this thread until interrupted."""
    import uvicorn

    engine, app = build(mtp, config, log)
    log(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 (strategy {config.strategy}, "
        f"at most {engine.max_k} proposals per pass)")
    try:
        uvicorn.Server(uvicorn_config(app, config)).run()
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
        self.server = uvicorn.Server(uvicorn_config(self.app, config))
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
