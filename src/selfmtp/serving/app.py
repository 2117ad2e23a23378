"""The OpenAI-compatible HTTP layer (FastAPI): request checks, SSE streaming, OpenAI-style errors.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Greedy
only (temperature 0 or absent). Extra body field `strategy` picks the decoding per request; every
response carries `selfmtp: {strategy, forward_passes, tokens_per_pass, tokens_fed}` in `usage`.
A stream sends one chunk per forward pass, so a client sees the multi-token chunks arrive.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfmtp.errors import SelfMTPError
from selfmtp.serving.config import resolve_strategy
from selfmtp.serving.engine import Engine, Event, QueueFull
from selfmtp.serving.engine import Request as EngineRequest


class _ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, seed, ...)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    strategy: str | None = None  # selfmtp extension: ntp, static:K, confadapt:..., auto[:TAU[:KMAX]]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str]


def create_app(engine: Engine, *, model_name: str, default_strategy: str, max_tokens_limit: int, api_key: str | None):
    """The FastAPI app serving `engine` (already started) under the model id `model_name`."""
    app = FastAPI(title="selfmtp", docs_url=None, redoc_url=None)
    completions = _Completions(engine, model_name, default_strategy, max_tokens_limit)

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return error.response()

    @app.middleware("http")
    async def _check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                                "invalid_api_key").response()  # fmt: skip
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.snapshot()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "selfmtp"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        body = await _parse(http, ChatRequest)
        messages = [m.model_dump() for m in body.messages]
        prompt_ids = _encode(lambda: engine.mtp.encode(messages, chat=True))
        return await completions.answer(http, body, prompt_ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def text(http: Request):
        body = await _parse(http, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "give exactly one prompt per request", "invalid_prompt")
        prompt_ids = _encode(lambda: engine.mtp.encode(prompts[0], chat=False))
        return await completions.answer(http, body, prompt_ids, body.max_tokens, chat=False)

    return app


class _Completions:
    """Both completion endpoints past parsing: check the request, queue it on the engine, answer it
    whole or as a stream, and cancel its row whenever the client is gone before the answer is complete."""

    def __init__(self, engine: Engine, model_name: str, default_strategy: str, max_tokens_limit: int):
        self.engine, self.model_name = engine, model_name
        self.default_strategy, self.max_tokens_limit = default_strategy, max_tokens_limit

    async def answer(self, http: Request, body: _Common, prompt_ids: list[int], max_tokens: int | None, *, chat: bool):
        request = self._engine_request(body, prompt_ids, max_tokens)
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry shortly", "queue_full",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None  # fmt: skip
        except SelfMTPError as error:
            raise APIError(400, str(error), "invalid_request") from None
        answer = _Answer(chat, self.model_name)
        try:
            first = await _next_event(http, request)
        except BaseException as error:
            self.engine.cancel(request)
            if isinstance(error, _ClientGone):
                return Response(status_code=499)  # nobody is listening
            raise
        if first.error is not None:
            return _internal_error(first).response()
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(http, request, answer, first, usage), media_type="text/event-stream")
        text, event = first.text, first
        try:
            while not event.finished:
                event = await _next_event(http, request)
                text += event.text
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not event.finished:
                self.engine.cancel(request)
        if event.error is not None:
            return _internal_error(event).response()
        return answer.whole(text, event)

    def _engine_request(self, body: _Common, prompt_ids: list[int], max_tokens: int | None) -> EngineRequest:
        """The engine's request for `body`, or the APIError that says what is wrong with it."""
        if body.model != self.model_name:
            raise APIError(404, f"The model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           "model_not_found")  # fmt: skip
        _check_greedy(body)
        context = self.engine.decoder.context
        if context is not None and len(prompt_ids) >= context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens",
                           "context_length_exceeded")  # fmt: skip
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                           "invalid_max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", "invalid_stop")
        try:
            strategy, load_aware = resolve_strategy(body.strategy or self.default_strategy)
        except SelfMTPError as error:
            raise APIError(400, str(error), "invalid_strategy") from None
        if load_aware and self.engine.pass_cost is None:
            raise APIError(400, "this server was started without a pass-cost probe: 'auto' is off", "invalid_strategy")
        budget = max_tokens or self.max_tokens_limit
        return EngineRequest(prompt_ids, strategy, load_aware, budget, stops, asyncio.get_running_loop())

    async def _stream(self, http: Request, request: EngineRequest, answer: _Answer, event: Event, usage: bool):
        try:
            passes = 0
            while True:
                if event.error is not None:
                    yield _sse(_internal_error(event).response().body.decode())
                    break
                yield _sse(json.dumps(answer.chunk(event, first=passes == 0)))
                passes += 1
                if event.finished:
                    if usage:
                        yield _sse(json.dumps(answer.usage_chunk(event)))
                    break
                event = await _next_event(http, request)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the answer is complete
            if not event.finished:
                self.engine.cancel(request)


async def _next_event(http: Request, request: EngineRequest) -> Event:
    while True:  # wake up now and then to notice a client that hung up
        try:
            return await asyncio.wait_for(request.events.get(), timeout=0.5)
        except TimeoutError:
            if await http.is_disconnected():
                raise _ClientGone from None


async def _parse(http: Request, model: type[BaseModel]):
    try:
        raw = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise APIError(400, f"invalid field {where!r}: {first['msg']}", "invalid_request") from None


def _encode(encode) -> list[int]:
    try:
        return encode()
    except SelfMTPError as error:
        raise APIError(400, str(error), "invalid_prompt") from None


def _check_greedy(body: _Common) -> None:
    if body.temperature not in (None, 0, 0.0):
        raise APIError(400, f"temperature {body.temperature:g}: this server decodes greedy only (temperature 0)",
                       "unsupported_sampling")  # fmt: skip
    if body.top_p not in (None, 1, 1.0):
        raise APIError(400, "top_p: this server decodes greedy only", "unsupported_sampling")
    if body.n not in (None, 1):
        raise APIError(400, "n: this server returns one choice per request", "unsupported_n")


def _internal_error(event: Event) -> APIError:
    return APIError(500, f"internal error in this request: {event.error}", "internal_error", kind="server_error")


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


class _Answer:
    """The OpenAI response objects of one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, streamed: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        kind += ".chunk" if streamed and self.chat else ""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, event: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return self._head(False) | {"choices": [choice | {"finish_reason": event.finish_reason}], "usage": event.usage}

    def chunk(self, event: Event, *, first: bool) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": None}
        body = self._head(True) | {"choices": [choice | {"finish_reason": event.finish_reason}]}
        body["selfmtp"] = {"tokens": event.tokens}  # this pass's tokens: the multi-token chunk
        if event.finished:
            body["selfmtp"] |= event.usage["selfmtp"]
        return body

    def usage_chunk(self, event: Event) -> dict:
        return self._head(True) | {"choices": [], "usage": event.usage}
