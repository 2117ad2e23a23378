"""What one hostile request costs a loopback `selfmtp serve` on the tiny model: the longest forward pass
it causes and the longest the event loop stops answering while it is handled (issue #27's targets).

In-process server (no key, probe off, max batch 4). Per case, one request alone; meanwhile a thread
pings GET /v1/models over a keep-alive connection and records the slowest answer (the event loop's
hold, plus ~1 ms of HTTP), and the engine's `decoder.step` is timed. The reference pass is static:16
(K = the server's cap). Runs against any checkout: `PYTHONPATH=<checkout>/src`.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/measure_serve_limits.py --json after.json
    OMP_NUM_THREADS=1 PYTHONPATH=/work/main/src python benchmarks/measure_serve_limits.py --before --json before.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

PROMPT = "Tell me about the weather"


def request(port: int, body: dict) -> tuple[int, float]:
    """(status, seconds) of one completion."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, time.perf_counter() - start


def measure(server, body: dict) -> dict:
    """The request's status and time, its slowest pass, and the slowest ping while it ran."""
    decoder, passes = server.engine.decoder, []
    real_step = decoder.step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_step(*args, **kwargs)
        finally:
            passes.append(time.perf_counter() - start)

    decoder.step = timed_step
    pings, done = [], threading.Event()

    def ping():
        connection = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=600)
        while not done.is_set():
            start = time.perf_counter()
            connection.request("GET", "/v1/models")
            connection.getresponse().read()
            pings.append(time.perf_counter() - start)
            time.sleep(0.002)
        connection.close()

    pinger = threading.Thread(target=ping)
    pinger.start()
    time.sleep(0.2)  # a few idle pings first
    status, seconds = request(server.config.port, body)
    time.sleep(0.1)
    done.set()
    pinger.join()
    del decoder.step
    return {"status": status, "seconds": round(seconds, 4), "passes": len(passes),
            "slowest_pass_s": round(max(passes, default=0.0), 4), "slowest_ping_s": round(max(pings), 4),
            "median_ping_s": round(sorted(pings)[len(pings) // 2], 4)}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", action="store_true", help="the code before #27: static:2000, not static:100000 "
                        "(an uncapped static:100000 would need tens of GB)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from selfmtp.api import MTPModel
    from selfmtp.serving import ServeConfig, start_server

    mtp = MTPModel.from_pretrained("tiny", seed=0)
    server = start_server(mtp, ServeConfig(model_name="tiny", strategy="ntp", port=0, max_batch=4, probe=False))
    huge_k = 2000 if args.before else 100_000
    base = {"model": "tiny", "prompt": PROMPT, "max_tokens": 64}
    cases = {
        "static:16 (reference)": base | {"strategy": "static:16"},
        f"static:{huge_k}": base | {"strategy": f"static:{huge_k}"},
        "verify:16:tree:lookup (reference)": base | {"strategy": "verify:16:tree:lookup"},
        "verify:5000000:tree:lookup": base | {"strategy": "verify:5000000:tree:lookup"},
        "prompt of 995 kB": base | {"prompt": "word " * 199_000, "max_tokens": 1},
        "prompt of 100 kB": base | {"prompt": "word " * 20_000, "max_tokens": 1},
    }
    # the longest prompt the character check lets through to the tokenizer (context x the longest token)
    longest = max(len(token) for token in mtp.tokenizer.get_vocab())
    at_limit = ("word " * (1024 * longest // 5 + 1))[: 1024 * longest]
    cases[f"prompt of {len(at_limit)} chars (the character limit)"] = base | {"prompt": at_limit, "max_tokens": 1}
    if args.before:  # five million drafts: the issue saw 6.4 CPU s of one pass; keep the run short
        cases.pop("verify:5000000:tree:lookup")
    try:
        results = {name: measure(server, body) for name, body in cases.items()}
    finally:
        server.close()
    for name, result in results.items():
        print(f"{name:36s} {json.dumps(result)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
