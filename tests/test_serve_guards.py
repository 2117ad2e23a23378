"""`selfmtp serve`'s guards on a live loopback server: limits before work, auth, metrics, deadlines,
hang-ups and errors that name no internals (docs/serving.md)."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from selfmtp.serving import ServeConfig, start_server
from serve_client import CHAT, GOOD, KEY, MODEL, delta, raw, reference, wait_for


@pytest.fixture(scope="module")
def server(_peaked_session):
    peaked, _ = _peaked_session
    running = start_server(peaked, ServeConfig(model_name=MODEL, strategy="confadapt:0.6:4", port=0, api_key=KEY,
                                               max_batch=4, probe=False))  # fmt: skip
    yield running
    running.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "message"),
    [
        ("/completions", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400, "invalid_json", "nested too deeply"),
        ("/completions", b'{"model": "tiny-peaked", "prompt": "hi \\ud800"}', 400, "invalid_encoding", "body.prompt"),
        ("/completions", GOOD | {"prompt": "a" * 900_000}, 400, "context_length_exceeded", "900000 characters"),
        ("/completions", GOOD | {"logprobs": 2}, 400, "unsupported_parameter", "'logprobs'"),
        ("/completions", GOOD | {"logit_bias": {"50": 10}}, 400, "unsupported_parameter", "'logit_bias'"),
        ("/completions", GOOD | {"presence_penalty": 0.5}, 400, "unsupported_parameter", "'presence_penalty'"),
        ("/completions", GOOD | {"stop": ["x" * 257]}, 400, "invalid_stop", "at most 256 characters"),
        ("/completions", GOOD | {"strategy": "static:" + "9" * 80}, 400, "invalid_request", "'strategy'"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT * 257}, 400, "too_many_messages", "at most 256"),
        ("/nowhere", None, 404, "not_found", "Not Found"),
        ("/completions", b'{"model": "tiny-peaked", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json",
         "not valid JSON"),  # an integer longer than Python parses
    ],
)
def test_client_mistakes_are_openai_style_4xx(server, client, path, body, status, code, message):
    got_status, payload, _ = raw(server, path, body)
    assert got_status == status
    assert payload["error"]["code"] == code and message in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "code"}
    assert client.completions.create(**GOOD).usage.completion_tokens == 3


def test_ignored_fields_are_ignored(peaked, client):
    """Fields with no effect on a greedy answer (user, seed, neutral penalties) change nothing."""
    answer = client.completions.create(model=MODEL, prompt="One", max_tokens=6, user="me", seed=3,
                                       presence_penalty=0, logprobs=None, extra_body={"metadata": {"a": 1}})  # fmt: skip
    assert answer.choices[0].text == reference(peaked, "One", "confadapt:0.6:4", 6, chat=False).text


def test_the_key_guards_every_route_but_the_liveness_probe(server):
    assert raw(server, "/health/live", key=None, root=True)[:2] == (200, {"status": "ok"})
    for path in ("/health", "/metrics", "/health/live/", "/nowhere"):
        status, payload, headers = raw(server, path, key=None, root=True)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
    assert raw(server, "/health", key="test-ke", root=True)[0] == 401  # a prefix of the key is not the key
    assert raw(server, "/health", root=True)[0] == 200


def test_metrics_are_prometheus_text(server, client):
    def scrape():
        request = urllib.request.Request(server.base_url.removesuffix("/v1") + "/metrics",
                                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            lines = response.read().decode().splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}

    before = scrape()
    answer = client.completions.create(model=MODEL, prompt="Metrics", max_tokens=7, extra_body={"strategy": "static:2"})
    after = scrape()

    def grew(name):
        return after[name] - before.get(name, 0)

    assert grew('selfmtp_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert grew("selfmtp_completion_tokens_total") == answer.usage.completion_tokens == 7
    assert grew("selfmtp_prompt_tokens_total") == answer.usage.prompt_tokens
    assert grew("selfmtp_forward_passes_total") == answer.usage.model_extra["selfmtp"]["forward_passes"] == 4
    assert grew('selfmtp_tokens_per_row_pass_bucket{le="1"}') == 1 and grew('selfmtp_tokens_per_row_pass_bucket{le="2"}') == 4
    assert grew("selfmtp_request_seconds_count") == grew("selfmtp_first_token_seconds_count") == 1
    assert after['selfmtp_pass_seconds_bucket{le="+Inf"}'] == after["selfmtp_pass_seconds_count"] == after[
        "selfmtp_forward_passes_total"]  # fmt: skip
    assert after["selfmtp_queue_depth"] == 0 and after["selfmtp_engine_alive"] == 1


def test_a_client_hanging_up_on_a_whole_answer_frees_its_row_within_one_pass(server):
    """Not streamed: the server learns of the hang-up only from the connection, not from a failed write."""
    import socket

    before = server.engine.snapshot()
    body = json.dumps({"model": MODEL, "prompt": "Never ending", "max_tokens": 500, "strategy": "ntp"}).encode()
    connection = socket.create_connection((server.config.host, server.config.port))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: server.engine.snapshot()["active"] == 1)
    connection.close()
    wait_for(lambda: delta(server, before, "cancelled") == 1, seconds=5)
    assert delta(server, before, "completed") == 0
    assert server.engine.snapshot()["most_passes_after_cancel"] <= 1  # the row left before the next pass


def test_internal_errors_are_json_without_internals(server, monkeypatch):
    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.engine, "snapshot", broken)
    status, payload, _ = raw(server, "/health", root=True)
    assert status == 500 and payload["error"]["code"] == "internal_error" and "secret" not in json.dumps(payload)


def test_the_key_comes_from_one_source(tmp_path, monkeypatch):
    from selfmtp.errors import SelfMTPError
    from selfmtp.serving.auth import check_exposure, resolve_key

    monkeypatch.delenv("SELFMTP_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line ignored\n")
    assert resolve_key(None, str(key_file)) == "from-file" and resolve_key(None, None) is None
    monkeypatch.setenv("SELFMTP_API_KEY", "from-env")
    assert resolve_key(None, None) == "from-env"
    with pytest.raises(SelfMTPError, match="--api-key-file and SELFMTP_API_KEY: give it once"):
        resolve_key(None, str(key_file))
    warnings = []
    check_exposure("0.0.0.0", None, allow_no_key=True, log=warnings.append)
    assert "WITHOUT an API key" in warnings[0]
    check_exposure("::1", None, allow_no_key=False, log=warnings.append)  # loopback: no key needed, no warning
    assert len(warnings) == 1


def test_deadlines_free_rows_and_a_dead_engine_is_reported(peaked, monkeypatch):
    """--request-timeout 1 with passes slowed to 50 ms: a whole answer gets a JSON 504, a stream an error event,
    and both rows are freed; once the engine thread is gone /health says 503 and completions are refused."""
    small = start_server(peaked, ServeConfig(model_name=MODEL, strategy="ntp", port=0, probe=False,
                                             request_timeout=1.0))  # fmt: skip
    try:
        real_step = small.engine.decoder.step
        monkeypatch.setattr(small.engine.decoder, "step", lambda *a, **k: (time.sleep(0.05), real_step(*a, **k))[1])
        status, payload, _ = raw(small, "/completions", GOOD | {"max_tokens": 400}, key=None)
        assert status == 504 and payload["error"]["code"] == "timeout"
        client = openai.OpenAI(base_url=small.base_url, api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError, match="request-timeout"):
            list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=400, stream=True))
        wait_for(lambda: small.engine.snapshot()["active"] == 0, seconds=5)
        assert small.engine.snapshot()["cancelled"] == 2 and small.engine.snapshot()["completed"] == 0
        small.engine.stop()
        status, payload, _ = raw(small, "/health", key=None, root=True)
        assert status == 503 and payload["error"]["code"] == "engine_dead"
        assert raw(small, "/health/live", key=None, root=True)[0] == 200  # the process itself is alive
        status, payload, _ = raw(small, "/completions", GOOD, key=None)
        assert status == 503 and payload["error"]["code"] == "engine_dead"
    finally:
        small.close()
