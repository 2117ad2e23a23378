"""Benchmark `selfmtp serve`: throughput and latency by concurrency and strategy, and memory over many requests.

Starts `selfmtp serve` as a subprocess on a free loopback port, then for each concurrency level runs
a fixed number of requests per strategy (strategies interleaved, so machine load hits them alike)
from that many client threads with the `openai` client. Server throughput = completion tokens of
the level / its wall time. Then sends --memory-requests more and samples the server's RSS.
Writes bench_serve.json, README.md (table) and bench_serve.png into --output.

    python scripts/bench_serve.py --model runs/demo/train/final \
      --prompts docs/measurements/bench-tiny-gsm-mtp-cpu/prompts.jsonl --output docs/measurements/serve-tiny-gsm-cpu
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil

from selfmtp.api import read_prompts
from selfmtp.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from selfmtp.serving.server import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--strategies", default="ntp,confadapt:0.9:8,auto:0.9:8")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=16, help="per strategy and concurrency level")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--memory-requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="redraw --output's table and plot from its json")
    args = parser.parse_args()
    out = Path(args.output)
    strategies, levels = args.strategies.split(","), [int(c) for c in args.concurrency.split(",")]
    if args.replot:
        result = json.loads((out / "bench_serve.json").read_text())
        write_text_atomic(out / "README.md", report(result, strategies, levels))
        return plot(result, strategies, levels, out / "bench_serve.png")
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(args.prompts)
    strategies = args.strategies.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    command = [sys.executable, "-m", "selfmtp", "serve", "--model", args.model, "--port", str(port), "--served-name",
               "bench", "--max-batch", str(max(levels)), "--max-queue", "256", "--threads", str(args.threads),
               "--seed", str(args.seed), "--strategy", "auto:0.9:8"]  # fmt: skip
    log = open(out / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = wait_healthy(port, server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        rows, rss = [], [("start", psutil.Process(server.pid).memory_info().rss)]
        for level in levels:
            for strategy in strategies:
                rows.append(run_level(client, prompts, strategy, level, args.requests, args.max_tokens))
                print(json.dumps(rows[-1]), flush=True)
            rss.append((f"after concurrency {level}", psutil.Process(server.pid).memory_info().rss))
        memory = memory_run(client, prompts, args.memory_requests, max(levels), server.pid)
        final_health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    result = {
        "command": " ".join(["python", *sys.argv]), "server_command": " ".join(command[1:]),
        "load_average_end": os.getloadavg(), "pass_cost_log": pass_cost_line(out / "server.log"),
        "rows": rows, "rss": rss, "memory": memory, "engine_start": health, "engine_end": final_health,
    }  # fmt: skip
    write_json_atomic(out / "bench_serve.json", result)
    write_text_atomic(out / "README.md", report(result, strategies, levels))
    plot(result, strategies, levels, out / "bench_serve.png")
    print(report(result, strategies, levels))


def wait_healthy(port: int, server: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def run_level(client, prompts, strategy: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    def one(i: int) -> dict:
        start = time.perf_counter()
        try:
            answer = client.completions.create(model="bench", prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                               extra_body={"strategy": strategy})  # fmt: skip
        except openai.OpenAIError as error:
            return {"failed": repr(error)}
        return {"seconds": time.perf_counter() - start, "tokens": answer.usage.completion_tokens,
                "passes": answer.usage.model_extra["selfmtp"]["forward_passes"]}  # fmt: skip

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok_rows = [d for d in done if "failed" not in d]
    tokens = sum(d["tokens"] for d in ok_rows)
    latencies = sorted(d["seconds"] for d in ok_rows)
    return {
        "strategy": strategy, "concurrency": concurrency, "requests": requests, "failed": requests - len(ok_rows),
        "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
        "latency_median": statistics.median(latencies) if latencies else None,
        "latency_max": latencies[-1] if latencies else None,
        "tokens_per_pass": tokens / sum(d["passes"] for d in ok_rows) if ok_rows else None,
    }  # fmt: skip


def memory_run(client, prompts, requests: int, concurrency: int, pid: int) -> dict:
    process, samples, failed = psutil.Process(pid), [], 0

    def one(i: int) -> int:
        try:
            client.completions.create(model="bench", prompt=prompts[i % len(prompts)], max_tokens=24,
                                      extra_body={"strategy": ["ntp", "confadapt:0.9:8", "auto:0.9:8"][i % 3]})  # fmt: skip
            return 0
        except openai.OpenAIError:
            return 1

    step = max(1, requests // 10)
    with ThreadPoolExecutor(concurrency) as pool:
        for start in range(0, requests, step):
            failed += sum(pool.map(one, range(start, min(requests, start + step))))
            samples.append((min(requests, start + step), process.memory_info().rss))
    return {"requests": requests, "failed": failed, "rss_by_requests": samples}


def pass_cost_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("pass cost")]
    return lines[0] if lines else ""


def report(result: dict, strategies: list[str], levels: list[int]) -> str:
    by = {(r["strategy"], r["concurrency"]): r for r in result["rows"]}
    lines = [
        "# `selfmtp serve`: throughput and latency by concurrency (CPU)", "",
        f"    {result['command']}", f"    # server: {result['server_command']}", "",
        f"Start-up probe ({result['pass_cost_log']}).", "",
        "| concurrency | strategy | tokens/s | vs ntp | median latency s | max latency s | tokens/pass | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for level in levels:
        ntp = by.get(("ntp", level))
        for strategy in strategies:
            r = by[(strategy, level)]
            ratio = f"{r['tokens_per_second'] / ntp['tokens_per_second']:.2f}x" if ntp else "-"
            lines.append(f"| {level} | {strategy} | {r['tokens_per_second']:.3g} | {ratio} | {r['latency_median']:.2f} | "
                         f"{r['latency_max']:.2f} | {r['tokens_per_pass']:.2f} | {r['failed']} |")  # fmt: skip
    mem = result["memory"]
    rss = [f"{n}: {b / 2**20:.0f} MiB" for n, b in mem["rss_by_requests"]]
    lines += ["", f"Memory over {mem['requests']} more requests (24 tokens each, strategies mixed, "
              f"{mem['failed']} failed), server RSS: " + ", ".join(rss) + ".",
              f"Engine at the end: {json.dumps(result['engine_end']['engine'])}.",
              f"Load average at the end: {', '.join(f'{x:.2f}' for x in result['load_average_end'])}.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, strategies: list[str], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["strategy"], r["concurrency"]): r for r in result["rows"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in strategies:
        left.plot(levels, [by[(strategy, c)]["tokens_per_second"] for c in levels], marker="o", label=strategy)
        right.plot(levels, [by[(strategy, c)]["latency_median"] for c in levels], marker="o", label=strategy)
    left.set(xlabel="concurrent requests", ylabel="server tokens/s", xscale="log", xticks=levels, xticklabels=levels)
    right.set(xlabel="concurrent requests", ylabel="median request latency (s)", xscale="log", xticks=levels,
              xticklabels=levels)  # fmt: skip
    for axis in (left, right):
        axis.minorticks_off()
    left.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_bytes_atomic(path, png.getvalue())


if __name__ == "__main__":
    main()
