"""File-system helpers shared by the checkpoint and results writers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting and restoring it): temp files and dirs made by `tempfile`
    are private (0600/0700), so atomic writers apply the usual mode before renaming them into place."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: a crash leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(Path(path), text.encode("utf-8"))


def write_json_atomic(path: str | Path, data) -> None:
    """`data` as indented JSON, atomically (results, summaries: files that other programs read)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def backup_dir(target: Path) -> Path:
    """Where `atomic_dir_write` keeps the old `target` while the new one is renamed into place."""
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | Path) -> Path:
    """Undo a swap `atomic_dir_write` did not finish: if it stopped (crash, kill -9) after moving the
    old directory aside and before the new one took its place, put the old one back. Call before
    reading or writing `target`; returns it."""
    target = Path(target)
    backup = backup_dir(target)
    if backup.is_dir() and not target.exists():
        try:
            os.replace(backup, target)
        except OSError:
            if not target.exists():
                raise
    return target


def atomic_dir_write(target: Path, write, *, keep_existing: bool = False) -> None:
    """Call `write(tmp_dir)` on a sibling temp dir, then swap it in for `target` (all or nothing).

    An existing `target` is renamed to `backup_dir(target)` and deleted only once the new one is in
    place: at every moment one complete version exists, and `recover_dir` restores the old one if the
    process dies between the two renames. One writer per target at a time (rank 0 saves).

    `keep_existing`: a cache entry, the same content whoever writes it (e.g. every DDP process filling
    an empty cache at once): the first complete one stays and later writers drop theirs, so a process
    already reading it never sees it swapped out from under it."""
    target = recover_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    backup = backup_dir(target)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint should get the usual mode
        write(tmp)
        if keep_existing and target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        elif target.exists():
            shutil.rmtree(backup, ignore_errors=True)  # a backup left after a finished swap: stale
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                # Another process (e.g. a second DDP rank filling the cache) finished first.
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(target)
        raise
