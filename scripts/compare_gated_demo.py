"""tiny-gsm at equal CPU time: the demo recipe (plain full fine-tuning, offline, prefix loss 5) against the
gated recipe (deltas acting only at `<mtp>`, offline targets from the forward, no anchor), same teacher,
the same training problems (the gated recipe may take more: --gated-train-problems), same CPU budget;
both evaluated on the same unseen test problems.

    PYTHONPATH=src python scripts/compare_gated_demo.py --cpu-budget 540 --output runs/gated-vs-demo-budget \\
        --table docs/measurements/tiny-gsm-gated-vs-demo-cpu/results.md

Equal CPU by construction: both recipes train with `--cpu-budget` (training/budget.py), which stops
each run at the step boundary before its CPU seconds (user + system of the whole process, set-up
included: model load, tokenising, and for the demo recipe its teacher relabelling pass) would pass the
budget, and draws each run's cosine decay over that budget. The CPU each run really used (os.wait4 of
the child, which adds the final export) is reported beside the budget. The two recipes run side by
side, one process and one thread each (on 2 cores they do not compete), and so do their evaluations.
Every child has its own SELFMTP_CACHE, so no run reuses another's teacher targets.

`--recipes` picks what trains (default demo,gated), --at-once at a time: the gated variants `gated-head`
(final norm and output head gated too), `gated-soft` (KL to the original model's distribution instead of
its argmax, from the same forward) and `gated-head-soft` are the levers of the ConfAdapt pilots
(docs/measurements/tiny-gsm-gated-vs-demo-cpu/pilots.md), e.g.

    PYTHONPATH=src python scripts/compare_gated_demo.py --recipes gated-head,gated-soft --cpu-budget 540 \
        --strategies teacher,verify:8,confadapt:0.95:8,confadapt:0.9:8 --output runs/gated-levers

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
# The gated recipe and its variants (the levers of pilots.md): TrainConfig overrides of the gated recipe.
GATED_VARIANTS = {
    "gated": {},
    "gated-head": {"gated_head": True},  # the final norm and the output head gated too
    "gated-soft": {"teacher_mode": "soft"},  # KL to the original model's distribution, from the same forward
    "gated-head-soft": {"gated_head": True, "teacher_mode": "soft"},
}
RECIPES = ("demo", *GATED_VARIANTS)
CURVE_STRATEGIES = ("verify:8", "confadapt:0.95:8", "confadapt:0.9:8")


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


def recipes(args, data: dict[str, Path], out: Path) -> dict:
    """Every recipe by name: the demo's and the gated variants (the gated ones train on data["gated"])."""
    demo = DemoConfig(seed=args.seed, progress=False)
    gated = replace(demo, gated=True, lr=args.gated_lr)
    overrides = {"masks_per_row": args.masks_per_row} if args.masks_per_row else {}
    gated_recipe = replace(train_config(gated, data["gated"], out / "gated"), lora_rank=args.gated_rank,
                           supervision=args.gated_supervision, **overrides)  # fmt: skip
    every = {"demo": train_config(demo, data["demo"], out / "demo")}
    for name, variant in GATED_VARIANTS.items():
        every[name] = replace(gated_recipe, output=str(out / name), **variant)
    return every


def train_side_by_side(args, runs: dict, out: Path) -> dict[str, dict]:
    """Train `runs` ({name: TrainConfig}) at once; {name: steps, stop reason, budget-counted and process CPU}."""
    used = run_children(
        {n: train_command(r, out / f"{n}.json") for n, r in runs.items()},
        {n: child_env(args, out / f"cache-{n}") for n in runs},
        out / "logs-train",
    )
    training = {}
    for name, recipe in runs.items():
        run = json.loads((Path(recipe.output) / "summary.json").read_text())
        training[name] = {"steps": run["steps"], "stopped_by": run["stopped_by"], "budget_cpu_s": run["cpu_s"],
                          "cpu_s": used[name]}  # fmt: skip
        print(f"{name}: trained {run['steps']} steps, {run['cpu_s']:.1f} CPU s by the budget, "
              f"{used[name]:.1f} for the whole process", flush=True)  # fmt: skip
    return training


def gated_curve(args, gated, out: Path) -> list[dict]:
    """The gated recipe again at each budget of --curve (two runs at a time), each evaluated like the
    main pair: how ConfAdapt against the teacher moves with CPU."""
    points = []
    budgets = [float(b) for b in args.curve.split(",")]
    for pair in (budgets[i : i + 2] for i in range(0, len(budgets), 2)):
        runs = {
            f"gated-{b:g}": replace(gated, output=str(out / f"gated-{b:g}"), steps=args.max_steps, cpu_budget=b,
                                    save_every=0)
            for b in pair
        }  # fmt: skip
        training = train_side_by_side(args, runs, out)
        evaluate(args, {n: Path(r.output) / "final" for n, r in runs.items()}, out)
        for name in runs:
            points.append({"name": name, "training": training[name], "results": strategy_rows(out / f"eval-{name}")})
    return points


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
            args.strategies,
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
    shown = list(summary["results"])
    names = list(summary["results"][shown[-1]])
    lines = [
        f"# tiny-gsm at equal CPU time: demo recipe vs gated ({summary['cpu_budget_s']:.0f} CPU s each)",
        "",
        "| strategy | "
        + " | ".join(f"{r}: accuracy, vs teacher, same tokens as teacher, tokens/pass" for r in shown)
        + " |",
        "|---|" + "---|" * len(shown),
    ]
    for strategy in names:
        cells = []
        for recipe in shown:
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
        "| recipe | steps trained | stopped by | CPU s counted by the budget | CPU s of the process (wait4) |",
        "|---|---|---|---|---|",
    ]
    for recipe in shown:
        t = summary["training"][recipe]
        lines.append(
            f"| {recipe} | {t['steps']} | {t['stopped_by']} | {t['budget_cpu_s']:.1f} | {t['cpu_s']:.1f} |"
        )
    if summary.get("curve"):
        lines += ["", "Gated recipe by CPU budget (--curve): accuracy vs teacher, tokens/pass", "",
                  "| CPU budget | steps | " + " | ".join(CURVE_STRATEGIES) + " |",
                  "|---|---|" + "---|" * len(CURVE_STRATEGIES)]  # fmt: skip
        for point in summary["curve"]:
            rows, t = point["results"], point["training"]
            cells = [f"{100 * rows[s]['vs_teacher']:+.1f}, {pooled_tokens_per_pass(rows[s]):.2f}" for s in CURVE_STRATEGIES]
            lines.append(f"| {t['budget_cpu_s']:.0f} | {t['steps']} | " + " | ".join(cells) + " |")
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
    parser.add_argument(
        "--curve", metavar="S1,S2,...", help="also train the gated recipe at these CPU budgets and tabulate them"
    )
    parser.add_argument("--max-steps", type=int, default=100_000, help="a cap; the budget stops runs first")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per child (two children run at once)"
    )
    parser.add_argument("--recipes", type=lambda s: s.split(","), default=["demo", "gated"],
                        help=f"comma-separated, of {','.join(RECIPES)} (default demo,gated); trained and "
                        "evaluated --at-once at a time")
    parser.add_argument("--at-once", type=int, default=2, help="children side by side (one per core)")
    parser.add_argument("--strategies", default=STRATEGIES, help="for `selfmtp eval` (teacher first)")
    parser.add_argument("--gated-lr", type=float, default=1e-3)
    parser.add_argument("--gated-supervision", default="offline", choices=("offline", "online"),
                        help="gated only: offline targets from the forward, or online rollout targets")

    parser.add_argument("--gated-rank", type=int, default=0, help="0: full deltas; R: gated LoRA of rank R")
    parser.add_argument(
        "--masks-per-row", type=int, help="gated only: the dense layout (default: the demo's regions)"
    )
    parser.add_argument("--train-problems", type=int, default=10000)
    parser.add_argument(
        "--gated-train-problems", type=int,
        help="gated only (its offline targets cost no relabelling pass, so more problems cost it nothing "
        "up front): default --train-problems",
    )
    parser.add_argument("--teacher", default="tiny-gsm-teacher")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if set(args.recipes) - set(RECIPES) or args.at_once < 1:
        parser.error(f"--recipes takes names of {', '.join(RECIPES)}; --at-once must be >= 1")
    start, out = time.perf_counter(), Path(args.output)
    data = {
        name: write_training_problems(DemoConfig(train_problems=problems, seed=args.seed), out / "data")
        for name, problems in (("demo", args.train_problems), ("gated", args.gated_train_problems or args.train_problems))
    }  # the same generator and seed: the smaller set is the start of the larger one
    every = recipes(args, data, out)
    final_recipes = {
        name: replace(every[name], steps=args.max_steps, cpu_budget=args.cpu_budget, save_every=0)
        for name in args.recipes
    }
    training = {}
    for names in (args.recipes[i : i + args.at_once] for i in range(0, len(args.recipes), args.at_once)):
        training |= train_side_by_side(args, {n: final_recipes[n] for n in names}, out)
        evaluate(args, {n: Path(final_recipes[n].output) / "final" for n in names}, out)
    curve = gated_curve(args, every["gated"], out) if args.curve else None
    summary = {
        "cpu_budget_s": args.cpu_budget,
        "training": training,
        "machine": f"{os.cpu_count()} CPUs",
        "recipes": {n: asdict(r) for n, r in final_recipes.items()},
        "results": {n: strategy_rows(out / f"eval-{n}") for n in final_recipes},
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - start,
        "load_average_at_end": os.getloadavg(),
        "curve": curve,
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
