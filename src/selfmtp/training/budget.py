"""A training stop on measured CPU seconds (`--cpu-budget S`): runs compared "at equal CPU" obey the
same rule by construction, instead of a step count sized beforehand from a pilot's step cost (which a
run's real steps need not keep: compare_gated_demo.py's gated run once spent 671 CPU s of a 540 budget).

What counts: this process's CPU seconds (user + system, every thread; time.process_time) since it
started, so set-up (model load, tokenising, an offline run's teacher relabelling) is part of the
budget, plus the CPU seconds earlier processes of the same run had used up to the checkpoint a
--resume continues from (read back from that step's metrics row, which records `cpu_s`).

The rule, checked at step boundaries: stop before a step that would overrun, i.e. when
spent + the last step's CPU > budget. Under a cosine schedule the decay is drawn over the budget (the
lr multiplier reads `fraction()`), so each run ends its schedule when its budget ends. With several
processes and a budget every measure is the maximum over them, so all processes agree on the lr and on the stop.
A budgeted run's lr curve follows measured time: it is reproducible in its data and plan per step
(seed, step), not bit for bit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist


class CpuBudget:
    def __init__(self, seconds: float | None):
        self.seconds = seconds  # None: no budget (the run stops at --steps)
        self.before = 0.0  # CPU seconds of earlier processes of this run, up to the resumed checkpoint
        self.spent = 0.0  # agreed over processes at the last step boundary (`measure`)
        self.last_step = 0.0  # CPU seconds of the last step (agreed)

    def start(self, world: int, device) -> None:
        """Collective with several processes: measure before the first step (set-up is spent)."""
        self.spent, self.last_step = self._measure(world, device), 0.0

    def step_done(self, world: int, device) -> None:
        """Collective with several processes: measure at a step boundary."""
        spent = self._measure(world, device)
        self.last_step, self.spent = spent - self.spent, spent

    def _measure(self, world: int, device) -> float:
        """The run's CPU seconds so far: the maximum over processes under a budget (they must agree on the lr and the
        stop), else this process's own (a collective per step would buy nothing)."""
        value = torch.tensor([self.before + process_cpu_seconds()], dtype=torch.float64, device=device)
        if world > 1 and self.seconds is not None:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())

    def fraction(self) -> float:
        """Share of the budget spent at the last boundary (0 without a budget)."""
        return min(1.0, self.spent / self.seconds) if self.seconds else 0.0

    def exhausted(self) -> bool:
        """Whether another step like the last one would overrun the budget."""
        return self.seconds is not None and self.spent + self.last_step > self.seconds

    def resume_from(self, metrics_path: Path, step: int) -> None:
        """Count what the run used up to `step`: that step's metrics row's `cpu_s` (0 if absent: a run
        started before budgets were recorded)."""
        self.before = cpu_seconds_at(metrics_path, step)


def process_cpu_seconds() -> float:
    return time.process_time()


def cpu_seconds_at(metrics_path: Path, step: int) -> float:
    if not metrics_path.is_file():
        return 0.0
    for line in reversed(metrics_path.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == step:
            return float(row.get("cpu_s", 0.0))
    return 0.0
