"""Limits checked before any work: the body's size while it is read, its JSON, its text's encoding and length.

Order, cheapest first: the Content-Length header, then the bytes as they arrive (a body without a
length, or one longer than it said, stops at the limit: nothing past it is read into memory), the
JSON (nesting deeper than Python's recursion limit is a 400, not a RecursionError), then every
string in it (a lone surrogate such as "\\ud800" cannot be tokenized: a 400), and the prompt's length
in characters against the context times the longest token (`max_token_chars`), so a prompt that
cannot fit is refused before the tokenizer sees it. Tokenizing the rest runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import ClientDisconnect, Request

from selfmtp.serving.protocol import APIError

DRAIN_SECONDS = 1.0


async def read_body(http: Request, max_bytes: int) -> bytes:
    """The request body, or a 413 as soon as it is known to pass `max_bytes`.

    Before the 413 the rest of the body is read and dropped, up to `max_bytes` more within
    DRAIN_SECONDS (a "lingering close"): closing on unread bytes resets the connection, and the
    client would see a reset instead of the 413. A body larger still is cut off unread."""
    declared = http.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise APIError(400, "the Content-Length header is not a number", "invalid_request")
    chunks, size = [], 0
    try:
        if declared is not None and int(declared) > max_bytes:
            if int(declared) <= 2 * max_bytes:
                await _drain(http.stream(), max_bytes)
            raise _too_large(max_bytes)
        stream = http.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                await _drain(stream, max_bytes)
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection while sending the body", "client_disconnected") from None
    return b"".join(chunks)


async def _drain(stream, max_bytes: int) -> None:
    """Read and drop what is left of a body, up to `max_bytes` and DRAIN_SECONDS."""
    dropped = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in stream:
                dropped += len(chunk)
                if dropped > max_bytes:
                    return
    except TimeoutError:
        return


def parse_json(body: bytes):
    """The JSON value of `body`; a 400 for anything that is not JSON text in UTF-8, however deep."""
    try:
        value = json.loads(body)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of more digits than Python parses
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None
    bad = _first_unencodable(value)
    if bad is not None:
        raise APIError(400, f"the request holds a string that is not valid Unicode (a lone surrogate) at {bad}",
                       "invalid_encoding")  # fmt: skip
    return value


def _first_unencodable(value) -> str | None:
    """Where a string (or key) in `value` cannot be encoded as UTF-8, e.g. "\\ud800"; None if nowhere.

    Iterative: json.loads already bounded the depth, and a walk must not recurse either."""
    stack = [(value, "body")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, where))
                stack.append((child, f"{where}.{key}" if isinstance(key, str) and key.isidentifier() else where))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for (a prompt of N characters has at least
    N / this many tokens). Byte-level vocabularies spell each byte as one character, so a token's
    string is at least as long as the text it decodes to."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def check_prompt_chars(texts: list[str], context: int | None, longest_token: int) -> None:
    """A 400 when `texts` hold more characters than `context` tokens can spell (before tokenizing)."""
    if context is None:
        return
    chars = sum(len(text) for text in texts)
    if chars > context * longest_token:
        raise APIError(400, f"the prompt has {chars} characters, more than the model's context of {context} "
                            "tokens can hold", "context_length_exceeded")  # fmt: skip


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                    "request_too_large")  # fmt: skip
