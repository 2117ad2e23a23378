"""Benchmark `selfmtp serve`: throughput and latency by concurrency and strategy, and memory over many requests.

Starts `selfmtp serve` as a subprocess on a free loopback port, then for each concurrency level runs
--rounds rounds; a round sends every strategy its --requests requests (at least the level) from that
many client threads with the `openai` client, the strategies one after another in an order that
rotates from round to round, so load drifts and the order hit them alike. Server throughput =
completion tokens / wall time. Each cell reports its throughput over all rounds and the paired ratio
to NTP: per round, the strategy's tokens/s over NTP's in the same round; the median over rounds and
its min-max (the spread says how far one cell can be trusted). Then sends --memory-requests more and
samples the server's RSS. Writes bench_serve.json, README.md (tables) and bench_serve.png into
--output. With several --model (each with its --prompts) the models run one after another and share
one table file and plot, led by a summary of each strategy's paired ratio to NTP.

The figures of record (ntp, ConfAdapt, verify and the two load-aware modes, three models, the
SmolLM2 servers with --prepack; SmolLM2 gets 8 prompts it continues for 48 tokens, one per row at
concurrency 8; about 17 minutes on a quiet 2-core machine at 1 thread):

    python benchmarks/bench_serve.py --prepack smollm2-135m --prepack smollm2-135m-mtp \
      --model runs/demo/train/final --prompts docs/measurements/bench-tiny-gsm-mtp-cpu/prompts.jsonl \
      --model smollm2-135m --prompts docs/measurements/serve-smollm2-cpu/prompts8.txt \
      --model smollm2-135m-mtp --prompts docs/measurements/serve-smollm2-cpu/prompts8.txt \
      --concurrency 1,2,4,8 --requests 1 --rounds 4 --max-tokens 48 --memory-requests 0 \
      --output docs/measurements/serve-all-modes-cpu

    python benchmarks/bench_serve.py --model runs/demo/train/final \
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

# NTP, the two fixed multi-token modes and their load-aware forms (lossy, exact)
DEFAULT_STRATEGIES = ("ntp", "confadapt:0.9:8", "verify:8", "auto:0.9:8", "auto:verify:8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="repeat: several models, one at a time")
    parser.add_argument("--prompts", action="append", default=[], help="one per --model, in the same order")
    parser.add_argument("--output", required=True)
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument(
        "--requests", type=int, default=8, help="per strategy, level and round (at least the level)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per level, the strategies' order rotating (paired ratios)"
    )
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--memory-requests", type=int, default=500, help="0: no memory run")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--prepack", action="append", default=[], metavar="MODEL",
                        help="serve this --model with --prepack (repeat; every mode of it runs on the curve probed "
                             "with it; it makes multi-token passes cheaper on SmolLM2, dearer on the tiny demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="the server's --dtype (default: auto, as selfmtp serve's)")
    parser.add_argument(
        "--replot", action="store_true", help="redraw --output's table and plot from its json"
    )
    args = parser.parse_args()
    if not args.replot and (not args.model or len(args.prompts) != len(args.model)):
        parser.error("give one --prompts per --model")
    out = Path(args.output)
    strategies, levels = args.strategies.split(","), [int(c) for c in args.concurrency.split(",")]
    if "ntp" not in strategies or args.rounds < 1:
        parser.error("the strategies must include ntp (the paired ratios' reference), and --rounds must be >= 1")
    if args.replot:
        return write_report(json.loads((out / "bench_serve.json").read_text()), strategies, levels, out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [
        bench_model(model, prompts, args, strategies, levels, out)
        for model, prompts in zip(args.model, args.prompts, strict=True)
    ]
    result = runs[0] if len(runs) == 1 else {"command": runs[0]["command"], "models": runs}
    write_json_atomic(out / "bench_serve.json", result)
    print(write_report(result, strategies, levels, out))


def bench_model(
    model: str, prompt_file: str, args, strategies: list[str], levels: list[int], out: Path
) -> dict:
    """Start a server for `model`, run every (level, strategy) cell, then the memory run; the result."""
    prompts = read_prompts(prompt_file)
    port = free_port()
    command = [sys.executable, "-m", "selfmtp", "serve", "--model", model, "--port", str(port), "--served-name",
               "bench", "--max-batch", str(max(levels)), "--max-queue", "256", "--threads", str(args.threads),
               "--seed", str(args.seed), "--strategy", "auto:0.9:8", "--dtype", args.dtype] + ["--prepack"] * (model in args.prepack)  # fmt: skip
    log_path = out / f"server-{Path(model).name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = wait_healthy(port, server)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
        )
        rows, rss = [], [("start", psutil.Process(server.pid).memory_info().rss)]
        for level in levels:
            rounds = {strategy: [] for strategy in strategies}  # per round: (wall seconds, answers)
            for r in range(args.rounds):  # the order rotates: no strategy always runs first or after another
                for strategy in strategies[r % len(strategies) :] + strategies[: r % len(strategies)]:
                    rounds[strategy].append(run_requests(client, prompts, strategy, level,
                                                         max(args.requests, level), args.max_tokens))  # fmt: skip
            for strategy in strategies:
                rows.append(cell(strategy, level, rounds[strategy]))
                print(json.dumps({"model": model, **{k: v for k, v in rows[-1].items() if k != "rounds"}}), flush=True)
            rss.append((f"after concurrency {level}", psutil.Process(server.pid).memory_info().rss))
        memory = memory_run(client, prompts, args.memory_requests, max(levels), server.pid, strategies)
        final_health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    return {
        "model": model, "command": " ".join(["python", *sys.argv]), "server_command": " ".join(command[1:]),
        "load_average_end": os.getloadavg(), "pass_cost_log": pass_cost_line(log_path),
        "rows": rows, "rss": rss, "memory": memory, "engine_start": health, "engine_end": final_health,
    }  # fmt: skip


def write_report(result: dict, strategies: list[str], levels: list[int], out: Path) -> str:
    """README.md (tables) and bench_serve.png (one row of panels per model) from a result; the table text."""
    runs = result.get("models", [result])
    text = "\n".join(report(run, strategies, levels) for run in runs)
    if len(runs) > 1:
        text = summary(runs, strategies, levels) + "\n" + text
    write_text_atomic(out / "README.md", text)
    plot(runs, strategies, levels, out / "bench_serve.png")
    return text


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


def run_requests(client, prompts, strategy: str, concurrency: int, requests: int, max_tokens: int):
    """(wall seconds, one dict per request) for `requests` requests from `concurrency` client threads."""

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
    return time.perf_counter() - start, done


def cell(strategy: str, concurrency: int, rounds: list[tuple[float, list[dict]]]) -> dict:
    """One table cell from every round's requests: server throughput = their tokens / the rounds' wall time;
    `rounds` keeps each round's (seconds, tokens) for the paired ratios."""
    done = [d for _, answers in rounds for d in answers]
    ok_rows = [d for d in done if "failed" not in d]
    tokens = sum(d["tokens"] for d in ok_rows)
    wall = sum(seconds for seconds, _ in rounds)
    latencies = sorted(d["seconds"] for d in ok_rows)
    per_round = [{"seconds": seconds, "tokens": sum(d.get("tokens", 0) for d in answers)} for seconds, answers in rounds]
    return {
        "strategy": strategy, "concurrency": concurrency, "requests": len(done), "failed": len(done) - len(ok_rows),
        "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall, "rounds": per_round,
        "latency_median": statistics.median(latencies) if latencies else None,
        "latency_max": latencies[-1] if latencies else None,
        "tokens_per_pass": tokens / sum(d["passes"] for d in ok_rows) if ok_rows else None,
    }  # fmt: skip


def memory_run(client, prompts, requests: int, concurrency: int, pid: int, strategies: list[str]) -> dict:
    process, samples, failed = psutil.Process(pid), [], 0

    def one(i: int) -> int:
        try:
            client.completions.create(model="bench", prompt=prompts[i % len(prompts)], max_tokens=24,
                                      extra_body={"strategy": strategies[i % len(strategies)]})  # fmt: skip
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


def paired_ratios(by: dict, strategy: str, level: int) -> list[float]:
    """Per round: the strategy's tokens/s over NTP's in the same round; a result without rounds: the pooled ratio."""
    mine, ntp = by[strategy, level], by["ntp", level]
    if "rounds" not in mine:  # recorded before rounds were kept
        return [mine["tokens_per_second"] / ntp["tokens_per_second"]]
    rate = [r["tokens"] / r["seconds"] for r in mine["rounds"]]
    return [a / (b["tokens"] / b["seconds"]) for a, b in zip(rate, ntp["rounds"], strict=True)]


def tokens_per_request(cell: dict) -> str:
    """Mean completion tokens of a cell's answered requests: well below --max-tokens, the prompts end early
    and the cell measures prefill more than decoding."""
    answered = cell["requests"] - cell["failed"]
    return f"{cell['tokens'] / answered:.1f}" if answered else "-"


def ratio_text(ratios: list[float]) -> str:
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def report(result: dict, strategies: list[str], levels: list[int]) -> str:
    by = {(r["strategy"], r["concurrency"]): r for r in result["rows"]}
    lines = [
        f"# `selfmtp serve` on {result.get('model', 'the model')}: throughput and latency by concurrency (CPU)", "",
        f"    {result['command']}", f"    # server: {result['server_command']}", "",
        f"Start-up probe ({result['pass_cost_log']}).", "",
        "tokens/s: all rounds pooled; vs ntp: per round over NTP's in the same round, median [min-max] over rounds.", "",
        "| concurrency | strategy | tokens/s | vs ntp | median latency s | max latency s | tokens/pass | tokens/request "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for level in levels:
        for strategy in strategies:
            r = by[(strategy, level)]
            ratio = ratio_text(paired_ratios(by, strategy, level))
            lines.append(f"| {level} | {strategy} | {r['tokens_per_second']:.3g} | {ratio} | {r['latency_median']:.2f} | "
                         f"{r['latency_max']:.2f} | {r['tokens_per_pass']:.2f} | {tokens_per_request(r)} | "
                         f"{r['failed']} |")  # fmt: skip
    mem = result["memory"]
    rss = [f"{n}: {b / 2**20:.0f} MiB" for n, b in mem["rss_by_requests"]]
    if mem["requests"]:
        lines += ["", f"Memory over {mem['requests']} more requests (24 tokens each, strategies mixed, "
                  f"{mem['failed']} failed), server RSS: " + ", ".join(rss) + "."]  # fmt: skip
    lines += ["", f"Engine at the end: {json.dumps(result['engine_end']['engine'])}.",
              f"Load average at the end: {', '.join(f'{x:.2f}' for x in result['load_average_end'])}.", ""]  # fmt: skip
    return "\n".join(lines)


def summary(runs: list[dict], strategies: list[str], levels: list[int]) -> str:
    """One line per model and strategy: its throughput over NTP's at every level, paired by round."""
    others = [s for s in strategies if s != "ntp"]
    lines = ["# `selfmtp serve`: server throughput over NTP's by concurrency (CPU)", "",
             f"    {runs[0]['command']}", "",
             "Per round, tokens/s over NTP's in the same round: median over rounds [min-max].", "",
             "| model | strategy | " + " | ".join(f"concurrency {c}" for c in levels) + " |",
             "|---|---|" + "---|" * len(levels)]  # fmt: skip
    for run in runs:
        by = {(r["strategy"], r["concurrency"]): r for r in run["rows"]}
        for strategy in others:
            ratios = [ratio_text(paired_ratios(by, strategy, c)) for c in levels]
            lines.append(f"| {run['model']} | {strategy} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], strategies: list[str], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 4 * len(runs)), squeeze=False)
    for run, (left, middle, right) in zip(runs, axes, strict=True):
        by = {(r["strategy"], r["concurrency"]): r for r in run["rows"]}
        for strategy in strategies:
            left.plot(
                levels, [by[(strategy, c)]["tokens_per_second"] for c in levels], marker="o", label=strategy
            )
            middle.plot(
                levels, [by[(strategy, c)]["latency_median"] for c in levels], marker="o", label=strategy
            )
            ratios = [paired_ratios(by, strategy, c) for c in levels]
            median = [statistics.median(r) for r in ratios]
            spread = [[m - min(r) for m, r in zip(median, ratios, strict=True)],
                      [max(r) - m for m, r in zip(median, ratios, strict=True)]]  # fmt: skip
            right.errorbar(levels, median, yerr=spread, marker="o", capsize=3, label=strategy)
        name = "/".join(Path(run.get("model", "")).parts[-3:])  # a run's folder: the last parts say which
        left.set(xlabel="concurrent requests", ylabel="server tokens/s", title=name)
        middle.set(xlabel="concurrent requests", ylabel="median request latency (s)", title=name)
        right.set(xlabel="concurrent requests", ylabel="tokens/s over NTP's, paired by round (min-max)", title=name)
        right.axhline(1.0, color="grey", linewidth=0.8)
        for axis in (left, middle, right):
            axis.set(xscale="log", xticks=levels, xticklabels=levels)
            axis.minorticks_off()
        left.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_bytes_atomic(path, png.getvalue())


if __name__ == "__main__":
    main()
