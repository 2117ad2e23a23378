"""Checkpoints survive a kill at any step of a save, and a power loss: the newest or the previous one loads.

A kill (SIGKILL) leaves the page cache, so it shows that every moment of a save leaves a readable folder
(kill_during_save.py kills a save before each file-system call it makes, for every call). A power loss
also drops what was not flushed; that cannot be caused in a test, so the order of the flushes is checked
instead: every new file and directory is fsynced before the rename that publishes it, the parent
directory after it, and only then is an old version deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from selfmtp.files import atomic_dir_write, backup_dir, write_bytes_atomic
from selfmtp.training.recovery import prepare_output
from selfmtp.training.state import save_training_state

KILL_DURING_SAVE = Path(__file__).with_name("kill_during_save.py")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kill_during_save.py forks a child per kill point")
@pytest.mark.parametrize("scenario", [
    "checkpoint", "training", "fsdp-overwrite",
    pytest.param("fsdp", marks=pytest.mark.slow),  # training's pruning through the sharded writer: 20-40 s more
])
def test_a_kill_at_any_step_of_a_save_leaves_the_previous_or_the_new_checkpoint(scenario, tmp_path):
    """checkpoint: save_checkpoint over an older one; training: save_training_state with keep=1 (the
    previous step is deleted); fsdp: the same for a sharded checkpoint; fsdp-overwrite: a sharded
    checkpoint written over one of the same step (it used to be deleted before the rename)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(KILL_DURING_SAVE), scenario, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"kill"')]
    assert len(outcomes) >= 10 and all(o["killed"] for o in outcomes[:-1]) and not outcomes[-1]["killed"]
    found = [o.get("version", o.get("error")) for o in outcomes]
    assert all(version in (1, 2) for version in found), found  # each kill point left a loadable checkpoint
    # the previous one up to the moment the new one is published, the new one from then on
    assert found[0] == 1 and found[-1] == 2 and found == sorted(found), found


# ---------------------------------------------------------------------------------------------
# Power loss: the order of flushes, renames and deletions


@pytest.fixture
def file_events(monkeypatch) -> list[tuple[str, ...]]:
    """Records ("fsync", path), ("replace", src, dst) and ("rmtree", path), with resolved paths, in order."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name the file behind an fsync")
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        real_replace(src, dst, **kwargs)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(Path(path).resolve())))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


def index(events, event) -> int:
    assert event in events, f"{event} not in {events}"
    return events.index(event)


def publish_of(events, target: Path) -> tuple[int, str]:
    """(position of the rename that put a new directory at `target`, the temp directory it came from)."""
    for i, event in enumerate(events):
        if event[0] == "replace" and event[2] == str(target.resolve()) and ".tmp" in event[1]:
            return i, event[1]
    raise AssertionError(f"no rename onto {target}: {events}")


def assert_published_durably(events, target: Path, files: list[str]) -> int:
    """The temp dir's files and itself fsynced before its rename onto `target`, the parent after it;
    returns the position of the parent's fsync (nothing old may be deleted before it)."""
    published, tmp = publish_of(events, target)
    flushed = {event[1] for event in events[:published] if event[0] == "fsync"}
    assert {str(Path(tmp) / name) for name in files} | {tmp} <= flushed, (tmp, flushed)
    return index(events[published:], ("fsync", str(target.parent.resolve()))) + published


def test_an_overwritten_directory_is_on_the_disk_before_its_old_version_is_deleted(tmp_path, file_events):
    target = tmp_path / "ckpt"
    atomic_dir_write(target, lambda d: (d / "a").write_text("1"))
    file_events.clear()
    atomic_dir_write(target, lambda d: ((d / "a").write_text("2"), (d / "sub").mkdir(), (d / "sub" / "b").write_text("2")))
    parent_flushed = assert_published_durably(file_events, target, ["a", "sub/b", "sub"])
    backup = str(backup_dir(target).resolve())
    aside = index(file_events, ("replace", str(target.resolve()), backup))  # the old version moved aside
    assert parent_flushed < aside + 1 + index(file_events[aside + 1:], ("rmtree", backup))  # then deleted


def test_the_folders_a_first_checkpoint_creates_are_on_the_disk_too(tmp_path, file_events):
    """`run/checkpoints/` made for the first checkpoint: each new folder's name is flushed (its parent fsynced)."""
    target = tmp_path / "run" / "checkpoints" / "step-0000001"
    atomic_dir_write(target, lambda d: (d / "a").write_text("1"))
    published, _ = publish_of(file_events, target)
    flushed = [event[1] for event in file_events[:published] if event[0] == "fsync"]
    assert str(tmp_path.resolve()) in flushed and str((tmp_path / "run").resolve()) in flushed
    assert_published_durably(file_events, target, ["a"])


def test_an_atomic_file_is_flushed_then_renamed_then_its_folder_flushed(tmp_path, file_events):
    path = tmp_path / "results.json"
    write_bytes_atomic(path, b"{}")
    (kind, tmp), renamed = file_events[0], file_events[1]
    assert kind == "fsync" and renamed == ("replace", tmp, str(path.resolve()))
    assert file_events[2] == ("fsync", str(tmp_path.resolve())) and path.read_bytes() == b"{}"


def test_keep_1_deletes_the_previous_checkpoint_only_once_the_new_one_is_on_the_disk(tmp_path, file_events):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    save_training_state(root, 1, model, optimizer, scheduler, keep=1)
    file_events.clear()
    save_training_state(root, 2, model, optimizer, scheduler, keep=1)
    parent_flushed = assert_published_durably(file_events, root / "step-0000002", ["trainable.safetensors", "state.pt"])
    pruned = next(i for i, e in enumerate(file_events) if e[:2] == ("replace", str((root / "step-0000001").resolve())))
    assert parent_flushed < pruned and sorted(p.name for p in root.iterdir()) == ["step-0000002"]


# ---------------------------------------------------------------------------------------------
# --resume after a kill


def test_resume_puts_back_a_checkpoint_whose_overwrite_was_cut_short_before_clearing_partial_writes(tmp_path):
    """A kill between the two renames of an overwrite leaves step N only as `.step-N.old`; --resume used to
    delete it with the temp folders and continue from an older step."""
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        (root / f"step-{step:07d}").mkdir(parents=True)
        (root / f"step-{step:07d}" / "state.pt").write_text(str(step))
    os.replace(root / "step-0000002", backup_dir(root / "step-0000002"))  # the kill: moved aside, no new one yet
    partial = root / ".step-0000002.tmp-x1y2"
    partial.mkdir()
    stale_prune = root / ".step-0000000.pruned"
    stale_prune.mkdir()
    _, resuming, newest = prepare_output(SimpleNamespace(output=str(out), resume=True), rank=0)
    assert resuming and newest == root / "step-0000002" and (newest / "state.pt").read_text() == "2"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]
