"""The OpenAI request bodies this server takes, and its OpenAI-style errors.

Fields the server cannot honour are refused with a 400 naming them when set to anything but their
neutral value (`logprobs`, `logit_bias`, penalties, tools, ...): a client that asks for them must
not believe it got them. Fields with no effect on a greedy answer (`user`, `seed`, `metadata`, ...)
and any other unknown field are ignored, as OpenAI-compatible servers do (docs/serving.md).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_STRATEGY_CHARS = 64
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An OpenAI-style error: `{"error": {"message", "type", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


# field -> its neutral values: any other value is refused (the server would silently not honour it)
REFUSED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "top_k": (None, 0, -1, 1), "min_p": (None, 0, 0.0),
}  # fmt: skip


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields are ignored (docs/serving.md), REFUSED ones checked
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    strategy: str | None = Field(default=None, max_length=MAX_STRATEGY_CHARS)  # selfmtp extension

    def refused_field(self) -> str | None:
        """The first field set that this server cannot honour, if any."""
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED and not any(value == neutral and type(value) is type(neutral) or value is neutral
                                           for neutral in REFUSED[name]):  # fmt: skip
                return name
        return None

    def stop_strings(self, max_chars: int) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > max_chars for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings of at most {max_chars} "
                                "characters each", "invalid_stop")  # fmt: skip
        return stops

    def check_greedy(self) -> None:
        if self.temperature not in (None, 0, 0.0):
            raise APIError(400, f"temperature {self.temperature:g}: this server decodes greedy only (temperature 0)",
                           "unsupported_sampling")  # fmt: skip
        if self.top_p not in (None, 1, 1.0):
            raise APIError(400, "top_p: this server decodes greedy only", "unsupported_sampling")
        if self.n not in (None, 1):
            raise APIError(400, "n: this server returns one choice per request", "unsupported_n")
        refused = self.refused_field()
        if refused is not None:
            raise APIError(400, f"{refused!r} is not supported by this server (greedy decoding, text only); "
                                "leave it out", "unsupported_parameter")  # fmt: skip


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def texts(self) -> list[str]:
        return [m.content for m in self.messages]


class CompletionRequest(Common):
    prompt: str | list[str]

    def texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
