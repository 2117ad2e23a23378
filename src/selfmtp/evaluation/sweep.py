"""Run decoding strategies over a task's items and keep every finished strategy on disk.

Resumable by construction: as soon as a strategy has run over all items its row and per-item outputs
go to `OUTPUT/runs/<strategy>.json` (atomically), and `results.json` / `results.md` are refreshed.
A rerun with the same settings skips strategies whose file is there; a crash loses at most the
strategy in progress. Settings that change the outputs (model, task, data, shots, ...) are stored
with each run, and a rerun with different ones into the same folder is refused rather than mixed.

The `teacher` pseudo-strategy is plain greedy NTP of a separate model (`--teacher SPEC`): the paper's
step-0 baseline, reported beside the trained model's rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfmtp.decoding.strategies import parse_strategy
from selfmtp.errors import Interrupted, SelfMTPError
from selfmtp.evaluation.report import STDERR_FORMULA, accuracy_with_stderr, write_report
from selfmtp.files import write_json_atomic
from selfmtp.progress import progress_bar

DEFAULT_STRATEGIES = (
    "static:1,static:2,static:3,static:4,static:5,"
    "confadapt:0.99,confadapt:0.95,confadapt:0.9,confadapt:0.8,confadapt:0.7,confadapt:0.6,verify"
)
TEACHER = "teacher"


@dataclass
class SweepConfig:
    model: str
    task: str
    strategies: list[str] = field(default_factory=lambda: DEFAULT_STRATEGIES.split(","))
    teacher: str | None = None
    data: str | None = None
    fewshot_data: str | None = None
    limit: int | None = None
    shots: int = 8
    chat: bool = False
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    prepack: bool | None = None  # CPU: oneDNN-packed linears (models/prepack.py; None: bf16 only); float noise only
    coherence: bool = False  # also score every strategy's text with the teacher (evaluation/reference.py)

    def validate(self) -> None:
        if self.coherence and not self.teacher:
            raise SelfMTPError("--coherence needs --teacher SPEC (the model that scores the generated text)")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise SelfMTPError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def fingerprint(self, model: str) -> dict:
        """What decides a run's outputs (batch size and device do not, up to float noise)."""
        keys = ("task", "limit", "shots", "chat", "max_new_tokens", "seed", "dtype")
        paths = {
            k: str(Path(v).resolve()) if v else None
            for k, v in (("data", self.data), ("fewshot_data", self.fewshot_data))
        }
        return {"model": model, **{k: getattr(self, k) for k in keys}, **paths}


@dataclass(frozen=True)
class PlannedRun:
    label: str  # the row's "strategy": canonical strategy name, or "teacher"
    spec: str  # as the user wrote it
    strategy: object  # a selfmtp.decoding.strategies.Strategy
    model: str  # which model decodes it

    @property
    def filename(self) -> str:
        return self.label.replace(":", "_") + ".json"


def plan_runs(config: SweepConfig) -> list[PlannedRun]:
    """Parse strategies up front (bad ones fail before any model loads); teacher first, no duplicates."""
    config.validate()
    specs = [s.strip() for s in config.strategies if s.strip()]
    if not specs and not config.teacher:
        raise SelfMTPError("no strategies given: e.g. --strategies static:1,confadapt:0.9")
    runs: dict[str, PlannedRun] = {}
    if config.teacher:
        runs[TEACHER] = PlannedRun(TEACHER, TEACHER, parse_strategy("ntp"), config.teacher)
    for spec in specs:
        if spec.lower() == TEACHER:
            if not config.teacher:
                raise SelfMTPError(
                    "strategy 'teacher' needs --teacher SPEC (the model whose NTP is the baseline)"
                )
            continue
        strategy = parse_strategy(spec)
        runs.setdefault(strategy.name, PlannedRun(strategy.name, spec, strategy, config.model))
    return list(runs.values())


def run_sweep(config: SweepConfig, output_dir: str | Path, *, task=None, progress: bool = True) -> dict:
    """Run every planned strategy not already finished in `output_dir`; returns the results dict."""
    from selfmtp.evaluation.tasks import load_task

    output_dir = Path(output_dir)
    runs = plan_runs(config)
    if task is None:
        task = load_task(config.task, data=config.data, fewshot_data=config.fewshot_data, limit=config.limit,
                         shots=config.shots, chat=config.chat, seed=config.seed)  # fmt: skip
    models: dict[tuple[str, bool], object] = {}
    finished = {}
    for run in runs:
        finished[run.label] = load_finished(
            output_dir / "runs" / run.filename, config.fingerprint(run.model)
        )
    try:
        for run in runs:
            if finished[run.label] is not None:
                continue
            key = (run.model, run.label == TEACHER)
            if key not in models:
                models[key] = _load_model(run, config)
            mtp = models[key]
            record = run_strategy(mtp, task, run, config, progress=progress)
            write_json_atomic(output_dir / "runs" / run.filename, record)
            finished[run.label] = record
            write_report(_results(config, task, runs, finished), output_dir, plot=False)
    except KeyboardInterrupt:  # each finished strategy is already on disk, whole (atomic writes)
        done = sum(record is not None for record in finished.values())
        raise Interrupted(f"{done} of {len(runs)} strategies finished and are kept in {output_dir / 'runs'}; "
                          "run the same command again to continue with the rest") from None
    if config.coherence:
        _add_coherence(config, task, runs, finished, models, output_dir)
    results = _results(config, task, runs, finished)
    write_report(results, output_dir)
    return results


def _add_coherence(config, task, runs, finished, models, output_dir: Path) -> None:
    """Teacher NLL of each finished strategy's text, computed once and stored with its run."""
    from selfmtp.evaluation.reference import coherence

    pending = [run for run in runs if "teacher_nll_per_token" not in finished[run.label]["row"]]
    if not pending:
        return
    key = (config.teacher, True)
    if key not in models:
        models[key] = _load_model(PlannedRun(TEACHER, TEACHER, parse_strategy("ntp"), config.teacher), config)
    teacher = models[key]
    prompts = [task.prompt(item, teacher.tokenizer) for item in task.items]
    for run in pending:
        record = finished[run.label]
        record["row"].update(coherence(teacher, prompts, record["outputs"], chat=task.chat))
        write_json_atomic(output_dir / "runs" / run.filename, record)


def run_strategy(mtp, task, run: PlannedRun, config: SweepConfig, *, progress: bool = True) -> dict:
    """Decode all items with one strategy; returns {"row", "fingerprint", "outputs"}."""
    from selfmtp.decoding.results import summarize

    prompts = [task.prompt(item, mtp.tokenizer) for item in task.items]
    results = []
    start = time.perf_counter()
    with progress_bar(total=len(prompts), desc=run.label, unit="item", disable=not progress) as bar:
        for begin in range(0, len(prompts), config.batch_size):
            chunk = prompts[begin : begin + config.batch_size]
            results += mtp.generate(chunk, strategy=run.strategy, max_new_tokens=config.max_new_tokens,
                                    stop=list(task.stop) or None, chat=task.chat, batch_size=config.batch_size)  # fmt: skip
            bar.update(len(chunk))
    wall = time.perf_counter() - start
    scores = [task.score(r.text, item) for r, item in zip(results, task.items, strict=True)]
    metrics = {m: accuracy_with_stderr([s[m]["correct"] for s in scores]) for m in task.metrics}
    summary = summarize(results)
    primary = metrics[task.metrics[0]]
    row = {
        "strategy": run.label, "spec": run.spec, "kind": _kind(run), "k_max": run.strategy.k_max,
        "tau": getattr(run.strategy, "tau", None), "model": run.model,
        "accuracy": primary["accuracy"], "stderr": primary["stderr"], "metrics": metrics,
        "acceleration_mean": summary["acceleration_mean"], "acceleration_std": summary["acceleration_std"],
        "tokens_per_second": summary["tokens_per_second_mean"],
        "throughput_tokens_per_second": summary["total_tokens"] / wall if wall > 0 else 0.0,
        "tokens_per_pass_pooled": summary["tokens_per_pass_pooled"], "tokens_fed_per_pass": summary["tokens_fed_per_pass"],
        **({"draft_acceptance": summary["draft_acceptance"]} if "draft_acceptance" in summary else {}),
        "mean_new_tokens": summary["total_tokens"] / max(1, len(results)),
        "n": len(results), "wall_seconds": wall, "batch_size": config.batch_size, "device": config.device,
        "decode": dict(getattr(mtp.model, "selfmtp_decode", None) or {}),  # the dtype --dtype auto chose, and why
    }  # fmt: skip
    outputs = [_item_output(item, r, s) for item, r, s in zip(task.items, results, scores, strict=True)]
    return {"row": row, "fingerprint": config.fingerprint(run.model), "outputs": outputs}


def _kind(run: PlannedRun) -> str:
    if run.label == TEACHER:
        return TEACHER
    return run.strategy.name.split(":")[0]  # "ntp" | "static" | "confadapt" | "verify"


def _item_output(item, result, score: dict) -> dict:
    return {
        "index": item.index, "question": item.question, "target": item.target, "output": result.text,
        "scores": score, "num_tokens": result.num_tokens, "forward_passes": result.forward_passes,
        "acceleration": result.acceleration, "stop_reason": result.stop_reason,
        "chunks": [chunk.text for chunk in result.chunks], "token_ids": result.token_ids,
    }  # fmt: skip


def _load_model(run: PlannedRun, config: SweepConfig):
    from selfmtp.api import MTPModel

    # The teacher only ever decodes token by token: it needs no <mtp> surgery.
    extra = {"add_mtp": False} if run.label == TEACHER else {}
    return MTPModel.from_pretrained(
        run.model, seed=config.seed, dtype=config.dtype, device=config.device, prepack=config.prepack, **extra
    )


def load_finished(path: Path, fingerprint: dict) -> dict | None:
    """A finished run's record (None if absent or unreadable); refused if made with other settings."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        stored = record["fingerprint"]
        record["row"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable leftovers are simply run again
    if stored != fingerprint:
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise SelfMTPError(
            f"{path.parent.parent} holds results of a different run ({', '.join(changed)} differ): "
            "use another --output or delete that folder"
        )
    return record


# Rows every other row is compared with, item by item: (results key, strategy label).
PAIRED_REFERENCES = (("vs_static_1", "static:1"), ("vs_teacher", TEACHER))


def _results(config: SweepConfig, task, runs: list[PlannedRun], finished: dict) -> dict:
    from selfmtp.evaluation.reference import answer_agreement, identical_outputs, paired_difference

    teacher, metric = finished.get(TEACHER), task.metrics[0]
    rows = []
    for run in runs:
        record = finished.get(run.label)
        if record is None:
            continue
        row = dict(record["row"])
        if teacher is not None:
            agreement = answer_agreement(record["outputs"], teacher["outputs"], metric)
            row["answer_agreement"], row["answer_agreement_stderr"] = agreement["accuracy"], agreement["stderr"]
        for key, label in PAIRED_REFERENCES:
            if finished.get(label) is not None and label != run.label:
                diff = paired_difference(record["outputs"], finished[label]["outputs"], metric)
                row[key], row[f"{key}_stderr"] = diff["difference"], diff["stderr"]
        if finished.get("static:1") is not None and run.label != "static:1":
            same = identical_outputs(record["outputs"], finished["static:1"]["outputs"])
            row["identical_to_static_1"], row["identical_of"] = same["identical"], same["of"]
            agreement = answer_agreement(record["outputs"], finished["static:1"]["outputs"], metric)
            row["answer_agreement_static_1"] = agreement["accuracy"]  # same extracted answer as k=1
        rows.append(row)
    return {
        "model": config.model,
        "teacher": config.teacher,
        "task": task.name,
        "metrics": list(task.metrics),
        "n_items": len(task.items),
        "config": asdict(config),
        "stderr_formula": STDERR_FORMULA,
        "rows": rows,
    }
