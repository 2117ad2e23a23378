"""Kill a checkpoint save at every file-system step, then check what a reader finds (test_durable_checkpoints).

    python tests/kill_during_save.py SCENARIO WORKDIR

SCENARIO is `checkpoint` (models.loading.save_checkpoint over an existing checkpoint), `training`
(training.state.save_training_state of step 2 with keep=1 beside step 1) or `fsdp` (the same through
training.sharded_state on a one-process FSDP2 group, plus an overwrite of the same step).

The old version is written once into WORKDIR/pristine. Then for i = 1, 2, ...: copy it to WORKDIR/kill-i,
fork, and let the child save the new version into kill-i with every file-system call that changes or
flushes something (os.replace, rename, mkdir, unlink, rmdir, fsync) counted, SIGKILLing itself just before
call number i; until a child finishes without reaching i. Each kill-i is then read the way its reader
would (recover, list, load) in a fresh forked process, and one JSON line per kill point is printed:
{"kill": i, "killed": bool, "version": 1 or 2 (the weights found equal that version), or "error": ...}.

Forking (after one import of torch) instead of starting a process per kill point keeps ~30 kill points
to seconds. POSIX only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers.utils import logging as transformers_logging

from selfmtp.models.loading import load_model, save_checkpoint
from selfmtp.training.recovery import recover_checkpoints
from selfmtp.training.sharded_state import load_sharded_state, save_sharded_state
from selfmtp.training.state import load_training_state, save_training_state, trainable_state

COUNTED = ("replace", "rename", "mkdir", "unlink", "rmdir", "fsync")


def die_at_call(number: int) -> None:
    """Wrap the counted `os` functions so that call `number` (over all of them) SIGKILLs the process first."""
    calls = [0]

    def wrap(real):
        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return counted

    for name in COUNTED:
        setattr(os, name, wrap(getattr(os, name)))


def in_child(work, *args) -> int:
    """Run `work(*args)` in a forked process; its exit status, or -signal."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work(*args)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent through the status
            print(json.dumps({"child_error": f"{type(exc).__name__}: {exc}"}), flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ---------------------------------------------------------------------------------------------
# Scenarios: write(version, folder) and read(folder) -> the version whose weights it holds


def tiny_model(version: int):
    model, tokenizer = load_model("tiny", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(version)  # every tensor differs between versions: a mix of the two cannot pass
    return model, tokenizer


def which_version(state: dict[str, torch.Tensor], references: dict[int, dict[str, torch.Tensor]]) -> int:
    for version, reference in references.items():
        if state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference):
            return version
    raise AssertionError("the weights found are neither version")


class Checkpoint:
    """save_checkpoint of version 2 over version 1 (every tensor different)."""

    def __init__(self):
        self.models = {v: tiny_model(v) for v in (1, 2)}

    def write(self, version: int, folder: Path) -> None:
        save_checkpoint(*self.models[version], folder / "ckpt")

    def read(self, folder: Path) -> int:
        model, _ = load_model(str(folder / "ckpt"), seed=0, add_mtp=False)  # recovers a cut-short swap itself
        return which_version(model.state_dict(), {v: m.state_dict() for v, (m, _) in self.models.items()})


def trained(model, steps: int):
    """`model` after `steps` AdamW steps on a fixed loss, with its optimizer and scheduler."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p.float() ** 2).sum() for p in model.parameters()).backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def recovered_newest(root: Path) -> Path:
    """What `selfmtp train --resume` does to a checkpoint folder before loading its newest checkpoint."""
    return recover_checkpoints(root, clean=True)[-1]


class Training:
    """save_training_state of step 2 with keep=1 over a folder holding step 1."""

    def __init__(self):
        self.runs = {}
        for version in (1, 2):  # (model, optimizer, scheduler) after `version` steps
            model = load_model("tiny", seed=0)[0].train()
            self.runs[version] = (model, *trained(model, version))
        self.weights = {version: trainable_state(run[0]) for version, run in self.runs.items()}

    def write(self, version: int, folder: Path) -> None:
        save_training_state(folder / "checkpoints", version, *self.runs[version], keep=1)

    def read(self, folder: Path) -> int:
        model = load_model("tiny", seed=0)[0].train()
        optimizer, scheduler = trained(model, 0)
        step = load_training_state(recovered_newest(folder / "checkpoints"), model, optimizer, scheduler)
        version = which_version(trainable_state(model), self.weights)
        assert step == version, f"checkpoint of step {step} holds the weights of step {version}"
        assert scheduler.last_epoch == version and optimizer.state_dict()["state"][0]["step"] == version
        return version


class Fsdp:
    """save_sharded_state of step 2 with keep=1 over step 1 (`fsdp`), and of step 1 over step 1 (`overwrite`)."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite

    @staticmethod
    def sharded(version: int):
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        for layer in head:
            fully_shard(layer)
        fully_shard(head)
        optimizer, scheduler = trained(head, version)
        return head, optimizer, scheduler

    def step_of(self, version: int) -> int:
        return 1 if self.overwrite else version

    def write(self, version: int, folder: Path) -> None:
        head, optimizer, scheduler = self.sharded(version)
        save_sharded_state(folder / "checkpoints", self.step_of(version), head, optimizer, scheduler, rank=0, keep=1)

    def read(self, folder: Path) -> int:
        head, optimizer, scheduler = self.sharded(0)
        newest = recovered_newest(folder / "checkpoints")
        load_sharded_state(newest, head, optimizer, scheduler)
        found = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in head.state_dict().items()}
        references = {}
        for version in (1, 2):
            reference, _, _ = self.sharded(version)
            references[version] = {k: v.full_tensor() for k, v in reference.state_dict().items()}
        version = which_version(found, references)
        assert int(newest.name.split("-")[1]) == self.step_of(version)
        return version


def write_dying_at_call(number: int, scenario, folder: Path) -> None:
    die_at_call(number)
    scenario.write(2, folder)


def read_into(scenario, folder: Path, result: Path) -> None:
    try:
        outcome = {"version": scenario.read(folder)}
    except Exception as exc:  # noqa: BLE001 - what a reader would meet, reported to the test
        outcome = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result.write_text(json.dumps(outcome))


def main(scenario_name: str, workdir: Path) -> None:
    transformers_logging.disable_progress_bar()
    scenario = {"checkpoint": Checkpoint, "training": Training, "fsdp": Fsdp,
                "fsdp-overwrite": lambda: Fsdp(overwrite=True)}[scenario_name]()
    pristine = workdir / "pristine"
    pristine.mkdir()
    assert in_child(scenario.write, 1, pristine) == 0, "writing the old version failed"
    number = 0
    while True:
        number += 1
        folder = shutil.copytree(pristine, workdir / f"kill-{number}")
        status = in_child(write_dying_at_call, number, scenario, folder)
        assert status in (0, -signal.SIGKILL), f"the save failed on its own (status {status})"
        read = workdir / f"kill-{number}.json"
        in_child(read_into, scenario, folder, read)
        outcome = json.loads(read.read_text()) if read.exists() else {"error": "the reader died"}
        print(json.dumps({"kill": number, "killed": status != 0, **outcome}), flush=True)
        if status == 0:
            break


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
