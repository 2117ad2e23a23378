"""The serving engine: one thread steps a `BatchDecoder`; requests join and leave between passes.

HTTP handlers (asyncio) `submit` a request and read its events; the engine thread admits waiting
requests into the running batch before every pass (up to `max_batch` rows), drops rows whose client
went away, runs one pass, and hands each row's new tokens to its request as one event. An error in
one row fails that request only; an error in the pass itself fails the rows of that batch, and the
engine starts the next batch from an empty cache.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from selfmtp.decoding.batch import BatchDecoder, BatchRow, StepEvent
from selfmtp.decoding.load_aware import LoadAware
from selfmtp.decoding.pass_cost import LearnedPassCost, PassCost
from selfmtp.decoding.strategies import Strategy
from selfmtp.serving.text import TextDeltas


class QueueFull(Exception):
    """More requests wait than the engine's queue holds."""


@dataclass
class Event:
    """One pass's output for one request (or its end, or its failure)."""

    text: str = ""
    tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: dict | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    strategy: Strategy
    load_aware: bool
    max_tokens: int
    stop_strings: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: BatchRow | None = None
    text: TextDeltas | None = None

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# the passes' seconds by three clocks (`GET /health`): what the engine thread computed, what every
# thread of the process did meanwhile (HTTP, torch workers), and the wall clock (pass_cost.pass_clock)
PASS_CLOCKS = {"engine_thread_cpu": time.thread_time, "process_cpu": time.process_time, "wall": time.perf_counter}
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context": "length"}


class Engine:
    def __init__(
        self,
        mtp,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        pass_cost: PassCost | LearnedPassCost | None = None,
        auto_k_max: int = 16,
    ):
        self.mtp = mtp
        pad_id = mtp.tokenizer.pad_token_id if mtp.tokenizer.pad_token_id is not None else 0
        self.load_aware = LoadAware(pass_cost, max(auto_k_max, 16)) if pass_cost is not None else None
        self.decoder = BatchDecoder(
            mtp.model, tokenizer=mtp.tokenizer, pad_token_id=pad_id, compact_cache=True, catch_row_errors=True,
            load_aware=self.load_aware,
        )  # fmt: skip
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.pass_cost = pass_cost
        self.waiting: deque[Request] = deque()
        self.requests: dict[BatchRow, Request] = {}  # the request of every row in the batch
        self.lock = threading.Condition()
        self.stats = {
            "passes": 0, "row_passes": 0, "completed": 0, "failed": 0, "cancelled": 0, "joined_running_batch": 0,
            "largest_batch": 0, "proposals_chosen": {}, "exact_proposals_chosen": {}, "exploration_passes": 0,
            "pass_seconds": dict.fromkeys(PASS_CLOCKS, 0.0),
        }  # fmt: skip
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="selfmtp-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        self._thread.join(timeout=30)

    # --- called from the HTTP side -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request` (SelfMTPError if the decoder would refuse it, QueueFull if the queue is full)."""
        self.decoder.check(request.prompt_ids, request.strategy, request.max_tokens)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.lock.notify_all()

    def cancel(self, request: Request) -> None:
        """The client went away: the engine frees its row before the next pass."""
        request.cancelled.set()
        with self.lock:
            self.lock.notify_all()

    def snapshot(self) -> dict:
        with self.lock:
            snapshot = {**self.stats, "pass_seconds": dict(self.stats["pass_seconds"]),
                        "active": len(self.decoder.active), "waiting": len(self.waiting)}  # fmt: skip
        if self.pass_cost is not None:
            snapshot["pass_cost"] = self.pass_cost.report()
        return snapshot

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stopping and not self.waiting and not self.decoder.active:
                    self.lock.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit()
            if self.decoder.active:
                self._step()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(request)
            self.stats["cancelled"] += 1
        for row in list(self.decoder.active):
            if self.requests[row].cancelled.is_set():
                self.decoder.remove(row)
                del self.requests[row]
                self.stats["cancelled"] += 1

    def _admit(self) -> None:
        while self.waiting and len(self.decoder.active) < self.max_batch:
            request = self.waiting.popleft()
            running = bool(self.decoder.active)
            try:
                request.row = self.decoder.add(
                    request.prompt_ids, request.strategy, max_new_tokens=request.max_tokens,
                    stop_token_ids=self.mtp.stop_token_ids, stop_strings=request.stop_strings,
                    load_aware=request.load_aware,
                )  # fmt: skip
            except Exception as error:  # checked at submit; anything left is this request's alone
                self._fail(request, error)
                continue
            request.text = TextDeltas(self.mtp.tokenizer, request.stop_strings)
            self.requests[request.row] = request
            self.stats["joined_running_batch"] += running
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.decoder.active))

    def _step(self) -> None:
        before = [clock() for clock in PASS_CLOCKS.values()]
        try:
            events = self.decoder.step()
        except Exception as error:  # the pass itself failed: every row in it fails, the server goes on
            traceback.print_exc()
            with self.lock:
                for row in self.decoder.clear():
                    self._fail(self.requests.pop(row), error)
            return
        spent = [clock() - start for clock, start in zip(PASS_CLOCKS.values(), before, strict=True)]
        with self.lock:
            for name, seconds in zip(PASS_CLOCKS, spent, strict=True):
                self.stats["pass_seconds"][name] += seconds
            self.stats["passes"] += 1
            self.stats["row_passes"] += len(events)  # > passes exactly when rows shared passes
            if self.load_aware is not None:  # the load-aware caps chosen so far, by row kind
                self.stats["proposals_chosen"] = dict(self.load_aware.chosen["lossy"])
                self.stats["exact_proposals_chosen"] = dict(self.load_aware.chosen["exact"])
                self.stats["exploration_passes"] = self.load_aware.explorations
            for event in events:
                self._deliver(event)

    def _deliver(self, event: StepEvent) -> None:
        row = event.row
        request = self.requests[row]
        if row.error is not None:
            traceback.print_exception(row.error)
            del self.requests[row]
            self._fail(request, row.error)
            return
        try:
            if not event.finished:
                request.send(Event(text=request.text.delta(row.token_ids), tokens=len(event.token_ids)))
                return
            result = row.result(self.mtp.tokenizer)
            del self.requests[row]
            self.stats["completed"] += 1
            request.send(Event(
                text=request.text.final(result.text), tokens=len(event.token_ids), finished=True,
                finish_reason=FINISH_REASONS[result.stop_reason], usage=_usage(result),
            ))  # fmt: skip
        except Exception as error:  # e.g. the tokenizer failed on this row's tokens
            traceback.print_exc()
            if row in self.decoder.active:
                self.decoder.remove(row)
            self.requests.pop(row, None)
            self._fail(request, error)

    def _fail(self, request: Request, error: Exception) -> None:
        self.stats["failed"] += 1
        request.send(Event(finished=True, error=f"{type(error).__name__}: {error}"))


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.num_tokens,
        "total_tokens": result.prompt_tokens + result.num_tokens,
        "selfmtp": {
            "strategy": result.strategy,
            "forward_passes": result.forward_passes,
            "tokens_per_pass": round(result.acceleration, 4),
            "tokens_fed": result.tokens_fed,
        },
    }
