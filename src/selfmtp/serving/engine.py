"""The serving engine: one thread steps a `BatchDecoder`; requests join and leave between passes.

HTTP handlers (asyncio) `submit` a request and read its events; the engine thread admits waiting
requests into the running batch before every pass (up to `max_batch` rows), drops rows whose client
went away, runs one pass, and hands each row's new tokens to its request as one event.

Work per request is bounded here, whatever the client asks: every strategy proposes at most `max_k`
tokens per pass (`strategies.capped`; default the model's trained k_max, else 16), and the decoder
feeds no masks or drafts past a row's budget or the context.

An error in one row fails that request only. An error in the pass itself (shared by every row) may
come from any of its rows: the engine starts from an empty cache and reruns each of those requests
alone, one after the other, from its prompt (greedy decoding gives the same tokens again, and the
text already sent is not sent twice), so only a request that fails alone fails.
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
from selfmtp.decoding.strategies import Strategy, capped, trained_k_max, with_model_defaults
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
    finished: bool = False  # set by the HTTP side once the answer is complete (or failed)
    delivered: int = 0  # tokens handed out so far (a rerun after a failed pass sends only what is new)
    isolated: bool = False  # rerun alone after a failed pass it shared
    cancelled_at_pass: int = 0

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# the passes' seconds by three clocks (`GET /health`): what the engine thread computed, what every
# thread of the process did meanwhile (HTTP, torch workers), and the wall clock (pass_cost.pass_clock)
PASS_CLOCKS = {"engine_thread_cpu": time.thread_time, "process_cpu": time.process_time, "wall": time.perf_counter}
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context": "length"}
DEFAULT_MAX_K = 16  # the proposal cap where the model does not record its trained k_max


def default_max_k(model) -> int:
    """The server's default proposal cap: the model's trained k_max if recorded (at least 2), else 16."""
    trained = trained_k_max(model)
    return max(trained, 2) if trained is not None else DEFAULT_MAX_K


class Engine:
    def __init__(
        self,
        mtp,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        pass_cost: PassCost | LearnedPassCost | None = None,
        auto_k_max: int = 16,
        max_k: int | None = None,
        metrics=None,
    ):
        self.mtp = mtp
        self.max_k = max_k if max_k is not None else default_max_k(mtp.model)
        self.metrics = metrics  # a metrics.Metrics, or None
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
        self.suspects: deque[Request] = deque()  # rows of a failed pass, each to be rerun alone
        self.requests: dict[BatchRow, Request] = {}  # the request of every row in the batch
        self.lock = threading.Condition()
        self.stats = {
            "passes": 0, "row_passes": 0, "completed": 0, "failed": 0, "cancelled": 0, "joined_running_batch": 0,
            "largest_batch": 0, "pass_failures": 0, "rerun_alone": 0, "most_passes_after_cancel": 0,
            "proposals_chosen": {}, "exact_proposals_chosen": {}, "exploration_passes": 0,
            "pass_seconds": dict.fromkeys(PASS_CLOCKS, 0.0),
        }  # fmt: skip
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="selfmtp-engine", daemon=True)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (False before `start`, after `stop`, or if it died)."""
        return self._thread.is_alive()

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
        """Queue `request` (SelfMTPError if the decoder would refuse it, QueueFull if the queue is full).

        Its strategy is capped at `max_k` proposals per pass first (`usage` names the capped one)."""
        request.strategy = capped(with_model_defaults(request.strategy, self.mtp.model), self.max_k)
        self.decoder.check(request.prompt_ids, request.strategy, request.max_tokens)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.lock.notify_all()

    def cancel(self, request: Request) -> None:
        """The client went away: the engine frees its row before the next pass."""
        if not request.cancelled.is_set():
            request.cancelled_at_pass = self.stats["passes"]
        request.cancelled.set()
        with self.lock:
            self.lock.notify_all()

    def snapshot(self) -> dict:
        with self.lock:
            snapshot = {**self.stats, "pass_seconds": dict(self.stats["pass_seconds"]), "active": len(self.decoder.active),
                        "waiting": len(self.waiting) + len(self.suspects), "max_k": self.max_k}  # fmt: skip
        if self.pass_cost is not None:
            snapshot["pass_cost"] = self.pass_cost.report()
        return snapshot

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stopping and not self.waiting and not self.suspects and not self.decoder.active:
                    self.lock.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit()
            if self.decoder.active:
                self._step()

    def _drop_cancelled(self) -> None:
        for queue in (self.waiting, self.suspects):
            for request in [r for r in queue if r.cancelled.is_set()]:
                queue.remove(request)
                self.stats["cancelled"] += 1
        for row in list(self.decoder.active):
            request = self.requests[row]
            if request.cancelled.is_set():
                self.decoder.remove(row)
                del self.requests[row]
                self.stats["cancelled"] += 1
                lag = self.stats["passes"] - request.cancelled_at_pass  # passes run after the cancel
                self.stats["most_passes_after_cancel"] = max(self.stats["most_passes_after_cancel"], lag)

    def _admit(self) -> None:
        """Fill the batch from the queue; after a failed pass, one suspect at a time, alone to its end."""
        if any(self.requests[row].isolated for row in self.decoder.active):
            return
        if self.suspects:
            if not self.decoder.active:
                self._add(self.suspects.popleft())
            return
        while self.waiting and len(self.decoder.active) < self.max_batch:
            self._add(self.waiting.popleft())
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.decoder.active))

    def _add(self, request: Request) -> None:
        running = bool(self.decoder.active)
        try:
            request.row = self.decoder.add(
                request.prompt_ids, request.strategy, max_new_tokens=request.max_tokens,
                stop_token_ids=self.mtp.stop_token_ids, stop_strings=request.stop_strings,
                load_aware=request.load_aware,
            )  # fmt: skip
        except Exception as error:  # checked at submit; anything left is this request's alone
            self._fail(request, error)
            return
        if request.text is None:  # a rerun keeps what it sent
            request.text = TextDeltas(self.mtp.tokenizer, request.stop_strings)
        self.requests[request.row] = request
        self.stats["joined_running_batch"] += running

    def _step(self) -> None:
        before = [clock() for clock in PASS_CLOCKS.values()]
        try:
            events = self.decoder.step()
        except Exception as error:  # the pass itself failed: rerun its rows alone, so only the culprit fails
            traceback.print_exc()
            with self.lock:
                self.stats["pass_failures"] += 1
                requests = [self.requests.pop(row) for row in self.decoder.clear()]
                if len(requests) == 1:
                    self._fail(requests[0], error)
                    return
                for request in requests:
                    request.row, request.isolated = None, True
                    self.suspects.append(request)
                self.stats["rerun_alone"] += len(requests)
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
        if self.metrics is not None:
            self.metrics.pass_done(spent[2], [len(event.token_ids) for event in events])

    def _deliver(self, event: StepEvent) -> None:
        row = event.row
        request = self.requests[row]
        if row.error is not None:
            traceback.print_exception(row.error)
            del self.requests[row]
            self._fail(request, row.error)
            return
        try:
            new = len(row.token_ids) - request.delivered  # a rerun first decodes again what it sent
            request.delivered = max(request.delivered, len(row.token_ids))
            if not event.finished:
                if new > 0:
                    request.send(Event(text=request.text.delta(row.token_ids), tokens=new))
                return
            result = row.result(self.mtp.tokenizer)
            del self.requests[row]
            self.stats["completed"] += 1
            request.send(Event(
                text=request.text.final(result.text), tokens=max(new, 0), finished=True,
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
