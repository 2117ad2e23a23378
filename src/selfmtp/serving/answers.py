"""The OpenAI response objects of one request (chat or text completion), whole or as SSE chunks."""

from __future__ import annotations

import time
import uuid

from selfmtp.serving.engine import Event


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class Answer:
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
