"""tiny-gsm at equal CPU time: the demo recipe (plain full fine-tuning, offline, prefix loss 5) against the
gated recipe (deltas acting only at `<mtp>`, offline targets from the forward, no anchor), same teacher,
same training problems, same CPU budget; both evaluated on the same unseen test problems.

    PYTHONPATH=src python scripts/compare_gated_demo.py --cpu-budget 600 --output runs/gated-vs-demo \\
        --table docs/measurements/tiny-gsm-gated-vs-demo-cpu/results.md

Equal CPU, by steps scaled by measured cost: a cosine schedule must know its length up front, so a run
cannot simply be stopped when its CPU is spent. Each recipe first trains two short pilots (P and 2P steps)
in a child process; the child's CPU time (os.wait4: user + system, the whole process, set-up included:
model load, tokenising, and for the demo recipe its one teacher relabelling pass over the training rows)
gives its set-up cost and its cost per step. Each recipe then gets steps = (budget - set-up) / step cost
and trains to the end of its own schedule; the CPU each final run really used is measured the same way
and reported beside the budget. The two recipes run side by side, one process and one thread each (on
2 cores they do not compete), and so do their evaluations. Every child has its own SELFMTP_CACHE, so no
run reuses another's teacher targets.

Evaluation (as `selfmtp eval`): teacher greedy, static:1, verify:8, verify:8:tree, ConfAdapt 0.95 and 0.9
(k_max 8) on generated tiny-gsm test problems (never trained on). The table gives accuracy, the paired
difference to the teacher, how many generations are token for token the teacher's, and tokens per pass
(pooled: all tokens / all passes, the paper's effective k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from selfmtp.demo import DemoConfig, train_config, write_training_problems
from selfmtp.evaluation.report import pooled_tokens_per_pass, write_text_atomic

STRATEGIES = "teacher,static:1,verify:8,verify:8:tree,confadapt:0.95:8,confadapt:0.9:8"
RECIPES = ("demo", "gated")


def run_children(commands: dict[str, list[str]], env: dict[str, dict], logs: Path) -> dict[str, float]:
    """Run the commands side by side; {name: CPU seconds (user + system) of that child}. A failure stops all."""
    logs.mkdir(parents=True, exist_ok=True)
    children = {}
    for name, command in commands.items():
        with open(logs / f"{name}.log", "w") as log:
            children[name] = subprocess.Popen(command, env=env[name], stdout=log, stderr=subprocess.STDOUT)
    cpu, failed = {}, []
    for name, child in children.items():
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        cpu[name] = usage.ru_utime + usage.ru_stime
        if child.returncode:
            failed.append(f"{name} (exit {child.returncode}, log {logs / f'{name}.log'})")
    if failed:
        sys.exit(f"compare_gated_demo: failed: {', '.join(failed)}")
    return cpu


def child_env(args, cache: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "SELFMTP_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }


def train_command(recipe, path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    return [sys.executable, "-m", "selfmtp", "train", "--config", str(path)]


def recipes(args, data: Path, out: Path) -> dict:
    demo = DemoConfig(seed=args.seed, progress=False)
    gated = replace(demo, gated=True, lr=args.gated_lr)
    overrides = {"masks_per_row": args.masks_per_row} if args.masks_per_row else {}
    return {
        "demo": train_config(demo, data, out / "demo"),
        "gated": replace(
            train_config(gated, data, out / "gated"),
            output=str(out / "gated"),
            lora_rank=args.gated_rank,
            **overrides,
        ),
    }


def measure_costs(args, base: dict, out: Path) -> dict:
    """{recipe: (set-up CPU s, CPU s per step)} from pilots of P and 2P steps, side by side."""
    cpu = {}
    for steps in (args.pilot_steps, 2 * args.pilot_steps):
        commands, envs = {}, {}
        for name, recipe in base.items():
            key = f"{name}-{steps}"
            pilot = replace(recipe, output=str(out / "pilots" / key), steps=steps, save_every=0, warmup=0)
            commands[name] = train_command(pilot, out / "pilots" / f"{key}.json")
            envs[name] = child_env(args, out / "pilots" / f"cache-{key}")
        for name, seconds in run_children(commands, envs, out / "pilots" / f"logs-{steps}").items():
            cpu[(name, steps)] = seconds
    costs = {}
    for name in base:
        per_step = (cpu[(name, 2 * args.pilot_steps)] - cpu[(name, args.pilot_steps)]) / args.pilot_steps
        per_step = max(per_step, 1e-3)
        costs[name] = (max(cpu[(name, args.pilot_steps)] - args.pilot_steps * per_step, 0.0), per_step)
    return costs


def evaluate(args, finals: dict[str, Path], out: Path) -> None:
    commands, envs = {}, {}
    for name, final in finals.items():
        commands[name] = [
            sys.executable,
            "-m",
            "selfmtp",
            "eval",
            "--model",
            str(final),
            "--teacher",
            args.teacher,
            "--task",
            "tiny-gsm",
            "--limit",
            str(args.eval_problems),
            "--strategies",
            STRATEGIES,
            "--max-new-tokens",
            "120",
            "--batch-size",
            "16",
            "--seed",
            str(args.seed),
            "--output",
            str(out / f"eval-{name}"),
        ]
        envs[name] = child_env(args, out / f"cache-eval-{name}")
    run_children(commands, envs, out / "logs-eval")


def strategy_rows(folder: Path) -> dict[str, dict]:
    """{strategy: its results.json row + `same_as_teacher` (generations token for token the teacher's)}."""
    from selfmtp.evaluation.reference import identical_outputs

    rows = {row["strategy"]: row for row in json.loads((folder / "results.json").read_text())["rows"]}
    outputs = {}
    for path in (folder / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        outputs[record["row"]["strategy"]] = record["outputs"]
    for name, row in rows.items():
        row["same_as_teacher"] = identical_outputs(outputs[name], outputs["teacher"])
    return rows


def table(summary: dict) -> str:
    names = list(summary["results"]["gated"])
    lines = [
        f"# tiny-gsm at equal CPU time: demo recipe vs gated ({summary['cpu_budget_s']:.0f} CPU s each)",
        "",
        "| strategy | "
        + " | ".join(f"{r}: accuracy, vs teacher, same tokens as teacher, tokens/pass" for r in RECIPES)
        + " |",
        "|---|" + "---|" * len(RECIPES),
    ]
    for strategy in names:
        cells = []
        for recipe in RECIPES:
            row = summary["results"][recipe].get(strategy)
            if row is None:
                cells.append("-")
                continue
            same = row["same_as_teacher"]
            vs = row.get("vs_teacher")
            vs_text = "-" if vs is None or strategy == "teacher" else f"{100 * vs:+.1f}"
            cells.append(
                f"{100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f}, {vs_text}, "
                f"{same['identical']}/{same['of']}, {pooled_tokens_per_pass(row):.2f}"
            )
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| recipe | steps | set-up CPU s (pilot) | CPU s/step (pilot) | CPU s used (final run) |",
        "|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        t = summary["training"][recipe]
        lines.append(
            f"| {recipe} | {t['steps']} | {t['setup_cpu_s']:.1f} | {t['step_cpu_s']:.3f} | {t['cpu_s']:.1f} |"
        )
    lines += [
        "",
        "Targets (issue 15): gated verify:8 token for token the teacher's on every item at >= 3.0 tokens/pass; "
        "gated ConfAdapt 0.9 within 2 points of the teacher at >= 3.5 tokens/pass.",
        "",
        f"Command: `{summary['command']}`; wall {summary['wall_s']:.0f} s on {summary['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/gated-vs-demo")
    parser.add_argument("--table", help="also write the table here (e.g. docs/measurements/.../results.md)")
    parser.add_argument(
        "--cpu-budget", type=float, default=540.0, help="CPU seconds per recipe, set-up included"
    )
    parser.add_argument("--pilot-steps", type=int, default=20)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per child (two children run at once)"
    )
    parser.add_argument("--gated-lr", type=float, default=1e-3)
    parser.add_argument("--gated-rank", type=int, default=0, help="0: full deltas; R: gated LoRA of rank R")
    parser.add_argument(
        "--masks-per-row", type=int, help="gated only: the dense layout (default: the demo's regions)"
    )
    parser.add_argument("--train-problems", type=int, default=10000)
    parser.add_argument("--teacher", default="tiny-gsm-teacher")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start, out = time.perf_counter(), Path(args.output)
    data = write_training_problems(
        DemoConfig(train_problems=args.train_problems, seed=args.seed), out / "data"
    )
    base = recipes(args, data, out)
    costs = measure_costs(args, base, out)
    final_recipes, training = {}, {}
    for name, recipe in base.items():
        setup, per_step = costs[name]
        steps = max(1, int((args.cpu_budget - setup) / per_step))
        final_recipes[name] = replace(recipe, steps=steps, save_every=0)
        training[name] = {"steps": steps, "setup_cpu_s": setup, "step_cpu_s": per_step}
        print(f"{name}: set-up {setup:.1f} CPU s, {per_step:.3f} CPU s/step -> {steps} steps", flush=True)
    used = run_children(
        {n: train_command(r, out / f"{n}.json") for n, r in final_recipes.items()},
        {n: child_env(args, out / f"cache-{n}") for n in final_recipes},
        out / "logs-train",
    )
    for name, seconds in used.items():
        training[name]["cpu_s"] = seconds
        print(f"{name}: trained {training[name]['steps']} steps in {seconds:.1f} CPU s", flush=True)
    evaluate(args, {n: Path(r.output) / "final" for n, r in final_recipes.items()}, out)
    summary = {
        "cpu_budget_s": args.cpu_budget,
        "training": training,
        "machine": f"{os.cpu_count()} CPUs",
        "recipes": {n: asdict(r) for n, r in final_recipes.items()},
        "results": {n: strategy_rows(out / f"eval-{n}") for n in RECIPES},
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - start,
        "load_average_at_end": os.getloadavg(),
    }
    text = table(summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "results.md", text)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.table), text)
        write_text_atomic(Path(args.table).with_name("summary.json"), json.dumps(summary, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
