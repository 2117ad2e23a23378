"""`selfmtp serve` under a hostile client (loopback only, bounded, stops by itself).

About 200 requests from 12 threads, mixed: well-formed ones (streamed or not, five strategies, huge K),
oversized bodies (declared and streamed), deeply nested JSON, lone surrogates, refused fields, wrong keys,
a body that never finishes (the deadline), and clients hanging up mid-answer (streamed or not).
Afterwards: every well-formed answer equals its solo answer, every error is OpenAI-style JSON, no row
or queued request is left, the process RSS is back within 10% of where it was after a warm-up round,
and /health is ok. (The baseline is taken after a warm-up round of the same mix: the first round of
megabyte bodies grows the allocator's arenas by up to ~10%, which later rounds reuse.)
"""

from __future__ import annotations

import gc
import http.client
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from selfmtp.serving import ServeConfig, start_server

KEY = "hostile-test-key"
MODEL = "tiny-peaked"
PROMPTS = ["Tell me about the weather", "Count: 1, 2, 3,", "Once upon a time", "The sea and the sky"]
# (asked, solo reference): a huge K is served as the server's cap (16), whose verify text is greedy's
STRATEGIES = {"ntp": "ntp", "static:3": "static:3", "confadapt:0.6:4": "confadapt:0.6:4", "verify:4:tree:lookup": "ntp",
              "static:100000": "static:16", "verify:5000000:tree:lookup": "ntp"}  # fmt: skip
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(_peaked_session):
    peaked, _ = _peaked_session
    running = start_server(peaked, ServeConfig(model_name=MODEL, strategy="ntp", port=0, api_key=KEY, max_batch=4,
                                               max_queue=256, probe=False, request_timeout=8.0))  # fmt: skip
    yield running
    running.close()


def send(server, head: bytes, body: bytes = b"", *, read: bool = True, timeout: float = 60.0):
    """(status, headers text, body bytes) of one raw HTTP/1.1 exchange (the connection closes after it)."""
    with socket.create_connection((server.config.host, server.config.port), timeout=timeout) as connection:
        connection.sendall(head + body)
        if not read:
            return None
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), head_text.decode("latin-1"), payload


def post_head(length: int | None, key: str = KEY, path: str = "/v1/completions") -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\n{size}\r\n\r\n").encode()  # fmt: skip


def json_post(server, body: dict | bytes, key: str = KEY, head: bytes | None = None):
    """(status, error code) of a request that must fail; its answer must be an OpenAI-style JSON error."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, payload = send(server, head if head is not None else post_head(len(data), key), data)
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "code"}
    return status, error["code"]


def well_formed(server, prompt: str, strategy: str, stream: bool) -> tuple[int, str]:
    """(status, text) of a completion, streamed (SSE, one chunk per pass) or whole."""
    connection = http.client.HTTPConnection(server.config.host, server.config.port, timeout=120)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "strategy": strategy, "stream": stream}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.status != 200:
        json.loads(payload)  # an error must be JSON
        return response.status, ""
    if not stream:
        return 200, json.loads(payload)["choices"][0]["text"]
    events = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks
    return 200, "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])


def hang_up(server, stream: bool) -> None:
    """Ask for a long answer and hang up once it is under way (streamed: after the first chunk)."""
    body = json.dumps({"model": MODEL, "prompt": "Never ending", "max_tokens": 400, "stream": stream}).encode()
    with socket.create_connection((server.config.host, server.config.port), timeout=60) as connection:
        connection.sendall(post_head(len(body)) + body)
        if stream:
            connection.recv(1)
        else:
            time.sleep(0.05)


SENT_TOO_LARGE = b"{" + b" " * 1_000_001 + b"}"
STREAMED_TOO_LARGE = b"%x\r\n%s\r\n0\r\n\r\n" % (1_000_001, b" " * 1_000_001)
NESTED = b'{"model": "tiny-peaked", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
HUGE_PROMPT = {"model": MODEL, "prompt": "word " * 190_000}
HOSTILE = {  # name -> (a request that returns (status, error code), the status and code it must get)
    # refused before a byte of it is read; then one that says its length, and one that does not
    "declared_too_large": (lambda s: json_post(s, b"", head=post_head(5_000_000)), (413, "request_too_large")),
    "sent_too_large": (lambda s: json_post(s, SENT_TOO_LARGE), (413, "request_too_large")),
    "streamed_too_large": (lambda s: json_post(s, STREAMED_TOO_LARGE, head=post_head(None)), (413, "request_too_large")),  # fmt: skip
    "nested": (lambda s: json_post(s, NESTED), (400, "invalid_json")),
    "surrogate": (lambda s: json_post(s, b'{"model": "tiny-peaked", "prompt": "a\\udfff b"}'), (400, "invalid_encoding")),
    "logprobs": (lambda s: json_post(s, {"model": MODEL, "prompt": "x", "logprobs": 5}), (400, "unsupported_parameter")),
    "penalty": (lambda s: json_post(s, {"model": MODEL, "prompt": "x", "frequency_penalty": 1}),
                (400, "unsupported_parameter")),  # fmt: skip
    "wrong_key": (lambda s: json_post(s, {"model": MODEL, "prompt": "x"}, key="guess"), (401, "invalid_api_key")),
    "huge_prompt": (lambda s: json_post(s, HUGE_PROMPT), (400, "context_length_exceeded")),
    "bad_json": (lambda s: json_post(s, b"{'model': 1"), (400, "invalid_json")),
    "long_integer": (lambda s: json_post(s, b'{"model": "tiny-peaked", "max_tokens": ' + b"9" * 5000 + b"}"),
                     (400, "invalid_json")),  # fmt: skip
    "slow_body": (lambda s: json_post(s, b'{"model": ', head=post_head(100)), (408, "request_timeout")),  # never ends
}


def run_one(server, item):
    kind, *args = item
    if kind == "good":
        return item, well_formed(server, *args)
    if kind == "hang_up":
        hang_up(server, *args)
        return item, None
    request, _ = HOSTILE[args[0]]
    return item, request(server)


def test_hostile_clients_leave_the_server_as_it_was(peaked, server):
    rng = random.Random(0)
    goods = [("good", p, s, rng.random() < 0.5) for p in PROMPTS for s in STRATEGIES for _ in range(4)]  # 96
    hostile = [("hostile", name) for name in HOSTILE for _ in range(2 if name == "slow_body" else 8)]
    items = goods + hostile + [("hang_up", i % 2 == 0) for i in range(32)]
    references = {(p, s): peaked.generate(p, strategy=STRATEGIES[s], max_new_tokens=MAX_TOKENS, chat=False).text
                  for p in PROMPTS for s in STRATEGIES}  # fmt: skip
    warm_up = [item for item in items if item[-1] != "slow_body"]
    with ThreadPoolExecutor(12) as pool:  # a warm-up round of the same mix: the RSS baseline has seen its peaks
        list(pool.map(lambda item: run_one(server, item), rng.sample(warm_up, len(warm_up))))
    wait_for_idle(server)
    gc.collect()
    process = psutil.Process()
    rss_start = process.memory_info().rss
    before = server.engine.snapshot()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda item: run_one(server, item), rng.sample(items, len(items))))

    assert len(items) == 96 + len(hostile) + 32 >= 200
    for item, got in results:
        if item[0] == "good":
            assert got == (200, references[item[1], item[2]]), item
        elif item[0] == "hostile":
            assert got == HOSTILE[item[1]][1], item
    wait_for_idle(server)  # no stuck rows: every row finished or was freed
    stats = server.engine.snapshot()
    assert stats["completed"] - before["completed"] == 96 and stats["failed"] == before["failed"]
    assert stats["cancelled"] - before["cancelled"] == 32 and stats["most_passes_after_cancel"] <= 1
    gc.collect()
    rss_end = process.memory_info().rss
    print(f"hostile round: RSS {rss_start / 2**20:.1f} MB -> {rss_end / 2**20:.1f} MB, {len(items)} requests")
    assert rss_end <= 1.10 * rss_start, f"RSS {rss_start / 2**20:.0f} MB -> {rss_end / 2**20:.0f} MB"
    status, _, payload = send(server, f"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                      f"Authorization: Bearer {KEY}\r\n\r\n".encode())  # fmt: skip
    assert status == 200 and json.loads(payload)["status"] == "ok"


def wait_for_idle(server, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while (snapshot := server.engine.snapshot())["active"] or snapshot["waiting"]:
        assert time.monotonic() < deadline, f"rows stuck: {snapshot['active']} active, {snapshot['waiting']} waiting"
        time.sleep(0.05)
