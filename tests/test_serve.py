"""`selfmtp serve` on a live loopback server, driven by the real `openai` client."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from selfmtp.serving import ServeConfig, start_server
from serve_client import CHAT, GOOD, KEY, MODEL, delta, raw, reference, wait_for


@pytest.fixture(scope="module")
def server(_peaked_session):
    """One live server for the module, on the session's sharpened tiny model (serving never changes weights;
    each test's `peaked` fixture checks that)."""
    peaked, _ = _peaked_session
    running = start_server(
        peaked, ServeConfig(model_name=MODEL, strategy="confadapt:0.6:4", port=0, api_key=KEY, max_batch=4,
                            max_tokens_limit=512)
    )  # fmt: skip
    yield running
    running.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("strategy", ["ntp", "confadapt:0.6:4", "auto:verify:4", "verify:4", "verify:4:tree:lookup"])
def test_chat_streamed_equals_whole_equals_generate(peaked, client, strategy):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                           extra_body={"strategy": strategy})  # fmt: skip
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, stream=True, stream_options={"include_usage": True},
        extra_body={"strategy": strategy},
    ))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    usage = whole.usage.model_extra["selfmtp"]
    if not strategy.startswith("auto"):  # auto's mask count follows the load, so its passes may differ
        ref = reference(peaked, CHAT, strategy, 24, chat=True)
        assert streamed == ref.text
        assert usage["forward_passes"] == ref.forward_passes and whole.usage.completion_tokens == ref.num_tokens
    if "verify" in strategy:  # exact: the same text as greedy k=1
        assert streamed == reference(peaked, CHAT, "static:1", 24, chat=True).text
    # one chunk per forward pass, each saying how many tokens that pass gave
    passes = [c for c in chunks if c.choices]
    assert len(passes) == chunks[-1].usage.model_extra["selfmtp"]["forward_passes"]
    assert sum(c.model_extra["selfmtp"]["tokens"] for c in passes) == chunks[-1].usage.completion_tokens
    assert passes[0].choices[0].delta.role == "assistant" and passes[-1].choices[0].finish_reason == "length"
    if strategy == "confadapt:0.6:4":
        assert max(c.model_extra["selfmtp"]["tokens"] for c in passes) > 1  # multi-token chunks are visible
        assert usage["tokens_per_pass"] > 1


def test_completion_streamed_equals_whole_equals_generate_with_stop(peaked, client):
    prompt = "The weather today is"
    ref = reference(peaked, prompt, "confadapt:0.6:4", 40, chat=False)
    assert len(ref.text) > 8
    stop = [ref.text[5:8]]  # a stop string inside the answer: the text is cut before it
    ref = peaked.generate(prompt, strategy="confadapt:0.6:4", max_new_tokens=40, chat=False, stop=stop)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, stop=stop, stream=True) if c.choices)  # fmt: skip
    assert whole.choices[0].text == streamed == ref.text
    assert whole.choices[0].finish_reason == "stop" and stop[0] not in streamed


def test_concurrent_requests_give_the_texts_of_one_at_a_time(peaked, server, client):
    prompts = ["One", "Two plus two is", "A longer prompt about the sea and the sky", "Count: 1, 2, 3,"]
    strategies = ["confadapt:0.6:4", "ntp", "static:2", "confadapt:0.6:4:adaptive"]
    before = server.engine.snapshot()
    barrier = threading.Barrier(len(prompts))

    def ask(i):
        barrier.wait()
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=30,
                                         extra_body={"strategy": strategies[i]}).choices[0].text  # fmt: skip

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(ask, range(len(prompts))))
    for prompt, strategy, text in zip(prompts, strategies, texts, strict=True):
        assert text == reference(peaked, prompt, strategy, 30, chat=False).text
    assert delta(server, before, "row_passes") > delta(server, before, "passes")  # rows shared passes


def test_request_arriving_mid_decode_joins_the_running_batch(peaked, server, client):
    before = server.engine.snapshot()
    long = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=300, stream=True,
                                     extra_body={"strategy": "ntp"})  # fmt: skip
    stream = iter(long)
    first = next(stream).choices[0].text
    late = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20)
    rest = "".join(c.choices[0].text for c in stream if c.choices)
    assert delta(server, before, "joined_running_batch") >= 1
    assert late.choices[0].message.content == reference(peaked, CHAT, "confadapt:0.6:4", 20, chat=True).text
    assert first + rest == reference(peaked, "Once upon a time", "ntp", 300, chat=False).text


def test_client_disconnecting_mid_stream_frees_its_row(server, client):
    before = server.engine.snapshot()
    stream = client.completions.create(model=MODEL, prompt="Never ending", max_tokens=500, stream=True,
                                       extra_body={"strategy": "ntp"})  # fmt: skip
    next(iter(stream))
    stream.close()
    wait_for(lambda: delta(server, before, "cancelled") == 1)
    wait_for(lambda: server.engine.snapshot()["active"] == 0)
    assert delta(server, before, "completed") == 0  # it was stopped, not run to the end
    answer = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=4)
    assert answer.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "code", "message"),
    [
        ("/completions", b"{not json", KEY, 400, "invalid_json", "not valid JSON"),
        ("/completions", {"model": MODEL}, KEY, 400, "invalid_request", "'prompt'"),
        ("/completions", GOOD | {"max_tokens": "many"}, KEY, 400, "invalid_request", "'max_tokens'"),
        ("/chat/completions", {"model": MODEL, "messages": []}, KEY, 400, "invalid_request", "'messages'"),
        ("/completions", GOOD | {"temperature": 0.7}, KEY, 400, "unsupported_sampling", "greedy only"),
        ("/completions", GOOD | {"prompt": "word " * 1100}, KEY, 400, "context_length_exceeded", "context is 1024"),
        ("/completions", GOOD | {"max_tokens": 10_000}, KEY, 400, "invalid_max_tokens", "at most 512"),
        ("/completions", GOOD | {"strategy": "bogus"}, KEY, 400, "invalid_strategy", "unknown strategy"),
        ("/completions", GOOD, "wrong", 401, "invalid_api_key", "API key"),
        ("/completions", GOOD, None, 401, "invalid_api_key", "API key"),
        ("/models", None, None, 401, "invalid_api_key", "API key"),
        ("/completions", GOOD | {"model": "gpt-4"}, KEY, 404, "model_not_found", "'gpt-4' does not exist"),
    ],
)
def test_errors_are_openai_style_and_the_server_keeps_serving(server, client, path, body, key, status, code, message):
    got_status, payload, _ = raw(server, path, body, key=key)
    assert got_status == status
    assert payload["error"]["code"] == code and message in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "code"}
    assert client.completions.create(**GOOD).usage.completion_tokens == 3


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(**(GOOD | {"model": "nope"}))
    with pytest.raises(openai.BadRequestError, match="greedy only"):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0)
    assert [m.id for m in client.models.list()] == [MODEL]


def record_passes(monkeypatch, server, explode=None):
    """Wrap the engine's `decoder.step`: every pass appends its rows' strategy names to the returned list;
    `explode(rows)` true makes the pass itself fail (before any row is touched)."""
    decoder, passes = server.engine.decoder, []
    real_step = decoder.step

    def step(*args, **kwargs):
        passes.append([row.strategy.name for row in decoder.active])
        if explode is not None and explode(decoder.active):
            raise RuntimeError("pass exploded at /secret/path")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", step)
    return passes


def test_internal_failure_in_one_row_fails_that_request_only(peaked, server, client, monkeypatch):
    import selfmtp.serving.app as app_module
    from selfmtp.decoding.strategies import ConfAdapt

    class Exploding(ConfAdapt):
        def accept(self, confidences):
            raise RuntimeError("strategy exploded at /secret/path")

    real = app_module.resolve_strategy
    monkeypatch.setattr(app_module, "resolve_strategy",
                        lambda name: (Exploding(0.5, 2), False) if name == "explode" else real(name))  # fmt: skip
    passes = record_passes(monkeypatch, server)
    long = client.completions.create(model=MODEL, prompt="Keep going", max_tokens=60, stream=True,
                                     extra_body={"strategy": "ntp"})  # fmt: skip
    stream = iter(long)
    first = next(stream).choices[0].text
    with pytest.raises(openai.InternalServerError) as failure:
        client.completions.create(model=MODEL, prompt="Boom", max_tokens=8, extra_body={"strategy": "explode"})
    assert failure.value.body["code"] == "internal_error" and "secret" not in str(failure.value.body)  # no internals
    rest = "".join(c.choices[0].text for c in stream if c.choices)
    assert first + rest == reference(peaked, "Keep going", "ntp", 60, chat=False).text
    assert any({"ntp", "confadapt:0.5:2"} <= set(rows) for rows in passes)  # the two rows shared the failing pass
    assert client.completions.create(**GOOD).usage.completion_tokens == 3


def test_failed_pass_reruns_its_rows_alone_and_fails_only_the_culprit(peaked, server, client, monkeypatch):
    """A pass that fails whenever the static:3 row holds 3 tokens: the shared pass fails, each row is rerun
    alone, the innocent stream goes on with exactly its solo text and the culprit alone gets a JSON 500."""
    before = server.engine.snapshot()
    passes = record_passes(monkeypatch, server, explode=lambda rows: any(
        row.strategy.name == "static:3" and len(row.token_ids) >= 3 for row in rows))  # fmt: skip
    innocent = iter(client.completions.create(model=MODEL, prompt="Keep going", max_tokens=80, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"strategy": "ntp"}))
    chunks = [next(innocent)]
    with pytest.raises(openai.InternalServerError) as failure:
        client.completions.create(model=MODEL, prompt="Boom", max_tokens=20, extra_body={"strategy": "static:3"})
    assert failure.value.body["code"] == "internal_error" and "secret" not in str(failure.value.body)
    chunks += list(innocent)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = reference(peaked, "Keep going", "ntp", 80, chat=False)
    assert text == ref.text and chunks[-1].usage.completion_tokens == ref.num_tokens
    assert sum(c.model_extra["selfmtp"]["tokens"] for c in chunks if c.choices) == ref.num_tokens  # nothing twice
    failed = [rows for rows in passes if "static:3" in rows]
    assert any(set(rows) == {"ntp", "static:3"} for rows in failed)  # they shared a pass, which failed
    assert delta(server, before, "pass_failures") == 2  # shared, then the culprit alone
    assert delta(server, before, "rerun_alone") == 2 and delta(server, before, "failed") == 1
    assert delta(server, before, "completed") == 1
    assert client.completions.create(**GOOD).usage.completion_tokens == 3


def test_queue_full_is_429_with_retry_after(peaked):
    small = start_server(peaked, ServeConfig(model_name=MODEL, strategy="ntp", port=0, max_batch=1, max_queue=1,
                                             probe=False))  # fmt: skip
    try:
        client = openai.OpenAI(base_url=small.base_url, api_key="none", max_retries=0, timeout=120)
        busy = iter(client.completions.create(model=MODEL, prompt="Busy", max_tokens=500, stream=True))
        next(busy)  # the one row of the batch is taken
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.completions.create, model=MODEL, prompt="Queued", max_tokens=3)
            wait_for(lambda: small.engine.snapshot()["waiting"] == 1)
            status, payload, headers = raw(small, "/completions", GOOD, key=None)
            assert status == 429 and payload["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
            busy.close()  # frees the row: the queued request runs
            assert queued.result(timeout=120).usage.completion_tokens == 3
        assert raw(small, "/completions", GOOD, key=None)[0] == 200
    finally:
        small.close()


def replay_confadapt(peaked, prompt, tau, k_max, max_tokens, tokens_per_pass, tokens_fed):
    """The text ConfAdapt(tau, k_max) decodes for `prompt` alone when each pass proposes what the server's pass
    did: its masks are what it fed beyond its pending tokens (the prompt, then the previous pass's tokens)."""
    from selfmtp.decoding.batch import BatchDecoder
    from selfmtp.decoding.strategies import ConfAdapt

    ids = peaked.encode(prompt, chat=False)
    decoder = BatchDecoder(peaked.model, tokenizer=peaked.tokenizer, pad_token_id=peaked.tokenizer.pad_token_id or 0)
    row = decoder.add(ids, ConfAdapt(tau, k_max), max_new_tokens=max_tokens, stop_token_ids=peaked.stop_token_ids,
                      load_aware=True)  # fmt: skip
    pending = len(ids)
    for kept, fed in zip(tokens_per_pass, tokens_fed, strict=True):
        decoder.step(max_proposals=fed - pending + 1)
        assert len(row.state.chunks[-1][0]) == kept
        pending = kept
    assert not decoder.active
    return row.result(peaked.tokenizer).text


def test_bounded_load(peaked, server, client):
    """48 requests from 8 threads, mixed strategies and streaming: every one answers, all correct."""
    prompts = [f"Request {i} asks about" for i in range(6)]
    strategies = ["ntp", "confadapt:0.6:4", "auto:0.6:4"]
    refs = {(p, s): reference(peaked, p, s, 12, chat=False).text for p in prompts for s in strategies[:2]}
    before = server.engine.snapshot()

    def ask(i):
        prompt, strategy = prompts[i % len(prompts)], strategies[i % len(strategies)]
        if i % 2 or strategy.startswith("auto"):  # auto is checked by its passes, which only a stream shows
            chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"strategy": strategy}))  # fmt: skip
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            passes = [c.model_extra["selfmtp"]["tokens"] for c in chunks if c.choices]
            return prompt, strategy, text, (passes, chunks[-1].usage.model_extra["selfmtp"]["tokens_fed"])
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                         extra_body={"strategy": strategy}).choices[0].text  # fmt: skip
        return prompt, strategy, text, None

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(48)))
    autos = 0
    for prompt, strategy, text, passes in answers:
        if strategy.startswith("auto"):  # its mask count followed the load: replay the counts it chose
            assert text == replay_confadapt(peaked, prompt, 0.6, 4, 12, *passes)
            autos += 1
        else:
            assert text == refs[prompt, strategy]
    assert autos == 16
    assert delta(server, before, "completed") == 48 and delta(server, before, "failed") == 0
    assert server.engine.snapshot()["active"] == 0
    status, health, _ = raw(server, "/health", root=True)
    assert status == 200 and health["status"] == "ok"
    engine = health["engine"]
    # every pass was timed into the curve the load-aware rule reads, and /health shows it
    assert engine["pass_cost"]["passes_timed"] - before["pass_cost"]["passes_timed"] == engine["passes"] - before["passes"]
    assert engine["pass_cost"]["learned"] != engine["pass_cost"]["probe"]
    assert engine["pass_seconds"]["engine_thread_cpu"] > before["pass_seconds"]["engine_thread_cpu"]


@pytest.mark.parametrize(("strategy", "served"), [("verify", "verify:8"), ("verify:3:tree:lookup", "verify:3:tree:lookup")])
def test_exact_strategies_are_served(peaked, client, strategy, served):
    """`verify` without K takes the model's default (8: the tiny model records no trained k_max)."""
    answer = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20,
                                       extra_body={"strategy": strategy})  # fmt: skip
    assert answer.choices[0].text == reference(peaked, "Count: 1, 2, 3,", "ntp", 20, chat=False).text
    assert answer.usage.model_extra["selfmtp"]["strategy"] == served


def test_every_strategy_is_capped_at_max_k_and_by_the_budget(peaked, server, client):
    """static:100000 and verify:5000000:tree:lookup run as K = the server's cap (16 here: the tiny model records
    no trained k_max); no pass feeds masks past the budget."""
    max_k = server.engine.max_k
    assert max_k == 16
    prompt = "Count: 1, 2, 3,"
    prompt_tokens = len(peaked.encode(prompt, chat=False))
    huge = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, extra_body={"strategy": "static:100000"})
    usage = huge.usage.model_extra["selfmtp"]
    assert usage["strategy"] == f"static:{max_k}" and huge.choices[0].text == reference(
        peaked, prompt, f"static:{max_k}", 40, chat=False).text  # fmt: skip
    # the prompt and K - 1 masks; the K tokens kept and K - 1 masks; the 16 kept and 7 masks (8 tokens left)
    assert usage["tokens_fed"] == [prompt_tokens + max_k - 1, 2 * max_k - 1, max_k + 7]
    exact = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                      extra_body={"strategy": "verify:5000000:tree:lookup"})  # fmt: skip
    assert exact.usage.model_extra["selfmtp"]["strategy"] == f"verify:{max_k}:tree:lookup"
    assert exact.choices[0].text == reference(peaked, prompt, "ntp", 40, chat=False).text
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"strategy": "static:16"})
    assert short.usage.model_extra["selfmtp"]["tokens_fed"] == [prompt_tokens + 1]  # 2 tokens: one mask, not 15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--strategy", "bogus"], "unknown strategy 'bogus'"),
        (["--strategy", "auto:2"], "confadapt tau must be in (0, 1]"),
        (["--max-k", "1"], "--max-k must be >= 2"),
        (["--request-timeout", "0"], "--request-timeout must be > 0"),
        (["--host", "0.0.0.0"], "without an API key"),
        (["--api-key", "a", "--api-key-file", "/nonexistent/key"], "cannot read --api-key-file"),
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(capsys, argv, message):
    from selfmtp.cli import main

    assert main(["serve", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfmtp: error: ") and message in err
