"""`GET /metrics`: counters, gauges and histograms in the Prometheus text exposition format (0.0.4).

Written here rather than with `prometheus_client` (not in the pinned set): the format is a few lines
of text per metric. Names follow Prometheus conventions (`_total` counters, `_seconds` units, one
`le` bucket series per histogram, cumulative, ending at `+Inf`), as vLLM and llama-server expose.
Thread-safe: the engine thread and the HTTP handlers update it; `render()` reads a consistent copy.
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKENS_PER_PASS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        for bound, count in zip([*self.buckets, math.inf], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {self.sum:.6g}", f"{name}_count{braces} {running}"]


class Metrics:
    """What `/metrics` shows; the gauges (queue depth, active rows, engine alive) are read at render time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.passes = 0
        self.row_passes = 0
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.first_token_seconds = Histogram(LATENCY_BUCKETS)
        self.pass_seconds = Histogram(PASS_BUCKETS)
        self.tokens_per_row_pass = Histogram(TOKENS_PER_PASS_BUCKETS)

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def latency(self, seconds: float) -> None:
        """A completion answered in full, `seconds` after its request arrived."""
        with self.lock:
            self.request_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.first_token_seconds.observe(seconds)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def pass_done(self, seconds: float, tokens_per_row: list[int]) -> None:
        with self.lock:
            self.passes += 1
            self.row_passes += len(tokens_per_row)
            self.pass_seconds.observe(seconds)
            for tokens in tokens_per_row:
                self.tokens_per_row_pass.observe(tokens)

    def render(self, *, waiting: int, active: int, engine_alive: bool) -> str:
        with self.lock:
            out = _family("selfmtp_requests_total", "counter", "HTTP requests answered, by endpoint and status")
            out += [f'selfmtp_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            for name, kind, text, value in [
                ("selfmtp_prompt_tokens_total", "counter", "prompt tokens of completed requests", self.prompt_tokens),
                ("selfmtp_completion_tokens_total", "counter", "tokens generated for completed requests",
                 self.completion_tokens),
                ("selfmtp_forward_passes_total", "counter", "forward passes of the engine", self.passes),
                ("selfmtp_row_passes_total", "counter", "rows stepped, summed over passes", self.row_passes),
                ("selfmtp_queue_depth", "gauge", "requests waiting for a row", waiting),
                ("selfmtp_active_rows", "gauge", "requests being decoded", active),
                ("selfmtp_engine_alive", "gauge", "1 while the engine thread runs", int(engine_alive)),
            ]:  # fmt: skip
                out += [*_family(name, kind, text), f"{name} {value}"]
            for name, text, histogram in [
                ("selfmtp_request_seconds", "time from a completion request to its last token", self.request_seconds),
                ("selfmtp_first_token_seconds", "time from a completion request to its first tokens", self.first_token_seconds),
                ("selfmtp_pass_seconds", "wall time of one forward pass of the batch", self.pass_seconds),
                ("selfmtp_tokens_per_row_pass", "tokens one row kept from one pass", self.tokens_per_row_pass),
            ]:
                out += [*_family(name, "histogram", text), *histogram.lines(name)]
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
