"""The OpenAI-compatible HTTP layer (FastAPI): limits, auth, request checks, SSE streaming, OpenAI-style errors.

Endpoints: GET /health/live (bare liveness, never guarded), GET /health (engine liveness and
statistics; 503 when the engine thread is dead), GET /metrics (Prometheus text), GET /v1/models,
POST /v1/chat/completions, POST /v1/completions. Greedy only (temperature 0 or absent). Extra body
field `strategy` picks the decoding per request; every response carries `selfmtp: {strategy,
forward_passes, tokens_per_pass, tokens_fed}` in `usage`. A stream sends one chunk per forward pass.

Nothing a client sends can hold the event loop: the body is read up to `max_body_bytes`, then parsed,
checked and tokenized in one worker thread (the tokenizer releases the GIL; a prompt longer in
characters than the context can spell is refused before it). Every request has a deadline
(`request_timeout`): 408 if its body is not in by then, 504 (or an error event in a stream) if its
answer is not, and its row is freed. A client that hangs up frees its row before the next pass.
Every error is an OpenAI-style JSON body; an internal one names no internals (the log has them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfmtp.errors import SelfMTPError
from selfmtp.serving.answers import Answer, sse
from selfmtp.serving.auth import LIVENESS_PATH, authorized
from selfmtp.serving.config import ServeConfig, resolve_strategy
from selfmtp.serving.engine import Engine, Event, QueueFull
from selfmtp.serving.engine import Request as EngineRequest
from selfmtp.serving.limits import check_prompt_chars, max_token_chars, parse_json, read_body
from selfmtp.serving.metrics import Metrics
from selfmtp.serving.protocol import APIError, ChatRequest, Common, CompletionRequest

log = logging.getLogger("selfmtp.serve")
GONE = Event(finished=True, error="the client went away")  # put in a request's events by its disconnect watcher


class _ClientGone(Exception):
    """The client closed its connection before the answer was complete."""
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", LIVENESS_PATH, "/metrics"}


def create_app(engine: Engine, config: ServeConfig, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) under the model id `config.model_name`."""
    metrics = metrics or Metrics()
    app = FastAPI(title="selfmtp", docs_url=None, redoc_url=None, openapi_url=None)
    completions = _Completions(engine, config, metrics)
    app.add_middleware(_Guard, api_key=config.api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return APIError(error.status_code, str(error.detail), code).response()

    @app.exception_handler(Exception)
    async def _internal(_, error: Exception):  # log the details, show none
        log.error("internal error", exc_info=error)
        return APIError(500, "internal server error (the server log has the details)", "internal_error",
                        kind="server_error").response()  # fmt: skip

    @app.get(LIVENESS_PATH)
    async def live():
        return {"status": "ok"}

    @app.get("/health")
    async def health():
        if not engine.alive:
            body = APIError(503, "the engine thread is not running", "engine_dead", kind="server_error")
            return JSONResponse({"status": "error", "error": json.loads(body.response().body)["error"]}, 503)
        return {"status": "ok", "model": config.model_name, "engine": engine.snapshot()}

    @app.get("/metrics")
    async def prometheus():
        snapshot = engine.snapshot()
        text = metrics.render(waiting=snapshot["waiting"], active=snapshot["active"], engine_alive=engine.alive)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "selfmtp"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        return await completions.handle(http, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def text(http: Request):
        return await completions.handle(http, CompletionRequest, chat=False)

    return app


class _Guard:
    """ASGI middleware: the API key on every route but the liveness probe; requests counted by endpoint and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            header = dict(scope["headers"]).get(b"authorization")
            if self.api_key is not None and scope["path"] != LIVENESS_PATH and not authorized(header, self.api_key):
                error = APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                                 "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await error.response()(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count(endpoint, status)


class _Completions:
    """Both completion endpoints: read and check the request, queue it on the engine, answer it whole or
    as a stream, and cancel its row whenever the client is gone or the deadline passed."""

    def __init__(self, engine: Engine, config: ServeConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.longest_token = max_token_chars(engine.mtp.tokenizer)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="selfmtp-parse")  # parsing and tokenizing

    async def handle(self, http: Request, kind: type[Common], *, chat: bool):
        started = time.monotonic()
        deadline = started + self.config.request_timeout
        try:
            async with asyncio.timeout(self.config.request_timeout):
                raw = await read_body(http, self.config.max_body_bytes)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.request_timeout:g} s",
                           "request_timeout") from None  # fmt: skip
        loop = asyncio.get_running_loop()
        try:  # the worker may be busy with other bodies: the deadline holds meanwhile
            body, prompt_ids = await asyncio.wait_for(loop.run_in_executor(self.worker, self._read, raw, kind, chat),
                                                      timeout=max(deadline - time.monotonic(), 0))  # fmt: skip
        except TimeoutError:
            raise self._timeout() from None
        request = self._engine_request(body, prompt_ids, loop)
        if not self.engine.alive:
            raise APIError(503, "the engine thread is not running", "engine_dead", kind="server_error")
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry shortly", "queue_full",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None  # fmt: skip
        except SelfMTPError as error:
            raise APIError(400, str(error), "invalid_request") from None
        watcher = asyncio.create_task(self._watch(http, request))
        answer = Answer(chat, self.config.model_name)
        try:
            first = await self._next(request, deadline)
            self.metrics.first_token(time.monotonic() - started)
            if body.stream:
                usage = bool((body.stream_options or {}).get("include_usage"))
                stream = self._stream(request, answer, first, usage, deadline, watcher, started)
                watcher = None  # the stream owns it now
                return StreamingResponse(stream, media_type="text/event-stream")
            text, event = first.text, first
            while not event.finished:
                event = await self._next(request, deadline)
                text += event.text
            self._done(request, event, started)
            return answer.whole(text, event)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening
        finally:
            if watcher is not None:
                self._release(request, watcher)

    def _read(self, raw: bytes, kind: type[Common], chat: bool):
        """(body, prompt ids) of a request: runs in the worker thread, so nothing here holds the event loop."""
        value = parse_json(raw)
        try:
            body = kind.model_validate(value)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise APIError(400, f"invalid field {where!r}: {first['msg']}", "invalid_request") from None
        if body.model != self.config.model_name:
            raise APIError(404, f"The model {body.model!r} does not exist: this server serves {self.config.model_name!r}",
                           "model_not_found")  # fmt: skip
        body.check_greedy()
        texts = body.texts()
        if chat and len(texts) > self.config.max_messages:
            raise APIError(400, f"{len(texts)} messages; this server takes at most {self.config.max_messages}",
                           "too_many_messages")  # fmt: skip
        if not chat and len(texts) != 1:
            raise APIError(400, "give exactly one prompt per request", "invalid_prompt")
        check_prompt_chars(texts, self.engine.decoder.context, self.longest_token)
        prompt = [m.model_dump() for m in body.messages] if chat else texts[0]
        try:
            prompt_ids = self.engine.mtp.encode(prompt, chat=chat)
        except SelfMTPError as error:
            raise APIError(400, str(error), "invalid_prompt") from None
        return body, prompt_ids

    def _engine_request(self, body: Common, prompt_ids: list[int], loop) -> EngineRequest:
        """The engine's request for `body`, or the APIError that says what is wrong with it."""
        context = self.engine.decoder.context
        if context is not None and len(prompt_ids) >= context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens",
                           "context_length_exceeded")  # fmt: skip
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        limit = self.config.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", "invalid_max_tokens")
        stops = body.stop_strings(self.config.max_stop_chars)
        try:
            strategy, load_aware = resolve_strategy(body.strategy or self.config.strategy)
        except SelfMTPError as error:
            raise APIError(400, str(error), "invalid_strategy") from None
        if load_aware and self.engine.pass_cost is None:
            raise APIError(400, "this server was started without a pass-cost probe: 'auto' is off", "invalid_strategy")
        return EngineRequest(prompt_ids, strategy, load_aware, max_tokens or limit, stops, loop)

    async def _stream(self, request, answer: Answer, event: Event, usage: bool, deadline, watcher, started):
        try:
            passes = 0
            while True:
                yield sse(json.dumps(answer.chunk(event, first=passes == 0)))
                passes += 1
                if event.finished:
                    self._done(request, event, started)
                    if usage:
                        yield sse(json.dumps(answer.usage_chunk(event)))
                    break
                try:
                    event = await self._next(request, deadline)
                except APIError as error:  # the deadline passed, or the decoding failed: say so in the stream
                    yield sse(error.response().body.decode())
                    break
                except _ClientGone:
                    return
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the answer is complete
            self._release(request, watcher)

    async def _next(self, request: EngineRequest, deadline: float) -> Event:
        """The request's next event; an APIError (504) at the deadline, (500) if its decoding failed."""
        try:
            event = await asyncio.wait_for(request.events.get(), timeout=max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise self._timeout() from None
        if event is GONE:
            raise _ClientGone
        if event.error is not None:
            request.finished = True
            raise self._error(request, event)
        return event

    def _timeout(self) -> APIError:
        return APIError(504, f"the answer took longer than this server's --request-timeout of "
                             f"{self.config.request_timeout:g} s", "timeout", kind="server_error")  # fmt: skip

    @staticmethod
    def _error(request: EngineRequest, event: Event) -> APIError:
        log.error("a request failed in the engine: %s", event.error)
        return APIError(500, "internal error while decoding this request (the server log has the details)",
                        "internal_error", kind="server_error")  # fmt: skip

    async def _watch(self, http: Request, request: EngineRequest) -> None:
        """Wait for the client to hang up; then free its row (before the next pass) and wake its handler."""
        while True:
            message = await http.receive()
            if message["type"] == "http.disconnect":
                self.engine.cancel(request)
                request.events.put_nowait(GONE)
                return

    def _release(self, request: EngineRequest, watcher: asyncio.Task) -> None:
        watcher.cancel()
        if not request.finished:
            self.engine.cancel(request)

    def _done(self, request: EngineRequest, event: Event, started: float) -> None:
        request.finished = True
        self.metrics.usage(event.usage["prompt_tokens"], event.usage["completion_tokens"])
        self.metrics.latency(time.monotonic() - started)
