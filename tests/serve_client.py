"""Shared by the serving tests: the key, the model id, raw HTTP requests, waiting on the engine."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

KEY = "test-key"
MODEL = "tiny-peaked"
CHAT = [{"role": "user", "content": "Tell me about the weather"}]


def reference(peaked, prompt, strategy, max_tokens, *, chat):
    """What `MTPModel.generate` (the `selfmtp generate` path) gives for this prompt alone."""
    return peaked.generate(prompt, strategy=strategy, max_new_tokens=max_tokens, chat=chat)


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def delta(server, before, key):
    return server.engine.snapshot()[key] - before[key]


# Lossy `auto` is not here: its mask count follows the load and what earlier requests taught the rule, so
# two requests may decode differently by design; the exact `auto:verify` must give greedy text whatever it chose.


def raw(server, path, body=None, key=KEY, method=None, root=False):
    """(status, json, headers) of a raw HTTP request (bad JSON cannot go through the openai client);
    `path` is under /v1, or under / with `root`."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    base = server.base_url.removesuffix("/v1") if root else server.base_url
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


GOOD = {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
