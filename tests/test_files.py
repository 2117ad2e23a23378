"""Atomic writers: a crash at any moment leaves one complete version of a file or directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from selfmtp.files import atomic_dir_write, backup_dir, recover_dir, write_bytes_atomic


def version(n: int):
    """A writer for a directory at version n (two files; version 2 drops one, so leftovers show)."""

    def write(d):
        (d / "a").write_text(str(n))
        if n != 2:
            (d / "b").write_text(str(n))

    return write


def contents(d) -> dict:
    return {p.name: p.read_text() for p in d.iterdir()}


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_replaces_the_whole_directory_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir_write(target, version(1))
    atomic_dir_write(target, version(2))
    assert contents(target) == {"a": "2"} and hidden(tmp_path) == []


def test_a_cache_entry_finished_by_another_writer_first_is_kept_not_swapped(tmp_path):
    """Two DDP processes filling an empty cache at once: the one that finishes second must not swap the
    directory out while the first already reads from it (it once made the two load different files)."""
    target = tmp_path / "entry"
    first_files = []

    def second_writer(d):  # while it writes, the other process finishes and starts reading
        atomic_dir_write(target, version(1), keep_existing=True)
        first_files.append((target / "b").stat().st_ino)
        version(2)(d)

    atomic_dir_write(target, second_writer, keep_existing=True)
    assert contents(target) == {"a": "1", "b": "1"} and hidden(tmp_path) == []
    assert (target / "b").stat().st_ino == first_files[0]  # the very files the reader opened
    atomic_dir_write(target, version(2))  # a checkpoint (the default) still replaces
    assert contents(target) == {"a": "2"}


def test_failure_between_the_renames_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    atomic_dir_write(target, version(1))
    real_replace = os.replace

    def fail_on_swap_in(src, dst):
        if os.path.basename(src).startswith(".ckpt.tmp-"):  # the new directory's rename onto the target
            assert not target.exists()  # the moment a crash used to lose the checkpoint
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_swap_in)
    with pytest.raises(OSError, match="disk gone"):
        atomic_dir_write(target, version(2))
    assert contents(target) == {"a": "1", "b": "1"} and hidden(tmp_path) == []


KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from selfmtp.files import atomic_dir_write
real = os.replace
def replace(src, dst):
    if os.path.basename(src).startswith(".ckpt.tmp-"):
        os._exit(9)  # like kill -9: no except, no finally
    real(src, dst)
os.replace = replace
atomic_dir_write(Path(sys.argv[1]), lambda d: (d / "a").write_text("2"))
"""


def test_kill_between_the_renames_is_recovered_by_the_next_read_or_write(tmp_path):
    target = tmp_path / "ckpt"
    for recover in (recover_dir, lambda t: atomic_dir_write(t, version(3))):
        atomic_dir_write(target, version(1))
        killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(target)], env=os.environ)
        assert killed.returncode == 9
        assert not target.exists() and contents(backup_dir(target)) == {"a": "1", "b": "1"}
        recover(target)
        assert contents(target) in ({"a": "1", "b": "1"}, {"a": "3", "b": "3"})
        assert not backup_dir(target).exists()
    assert contents(target) == {"a": "3", "b": "3"}


def test_write_bytes_failing_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_bytes_atomic(path, b"old")

    def fail(_fd):
        raise OSError("no space left")

    monkeypatch.setattr(os, "fsync", fail)  # after the bytes went into the temp file, before the rename
    with pytest.raises(OSError, match="no space"):
        write_bytes_atomic(path, b"new and longer")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["r.json"]
