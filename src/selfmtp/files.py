"""File-system helpers shared by the checkpoint and results writers.

Durability (a power loss, not only a crash): a rename is atomic but only durable once the directory
holding the name is fsynced, and a renamed file's bytes only once the file itself is. So every writer
here fsyncs what it wrote, renames, then fsyncs the parent directory; nothing old is deleted before
that last fsync (ext4, xfs and btrfs keep a fsynced rename across a power loss; POSIX needs the
directory fsync for it).
"""

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


def fsync_path(path: str | Path) -> None:
    """Flush a file's bytes, or a directory's entries (the names created, renamed or deleted in it),
    to the disk. Windows cannot open a directory to flush it (and has no need: NTFS journals names)."""
    is_dir = os.path.isdir(path)
    if is_dir and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory, innermost first (`root` last)."""
    for folder, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(folder)


def make_dirs(path: str | Path) -> None:
    """`mkdir -p path`, durably: the parent of each directory it creates is fsynced (a new name is on the
    disk only once the directory holding it is)."""
    missing, path = [], Path(path)
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename, fsync the folder: a crash or a power
    loss leaves the old file or the new one, never a part."""
    make_dirs(path.parent)
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
    fsync_path(path.parent)


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
        fsync_path(target.parent)
    return target


def swap_into_place(tmp: Path, target: Path) -> None:
    """Make the complete directory `tmp` (a sibling of `target`) the new `target`, durably.

    Order: fsync everything in `tmp`; move an existing `target` aside to `backup_dir(target)`; rename
    `tmp` onto `target`; fsync the parent; only then delete the old version. A crash or a power loss
    at any point leaves the old version (at `target`, or at its backup, which `recover_dir` puts back)
    or the new one, whole. One writer per target at a time."""
    fsync_tree(tmp)
    backup = backup_dir(target)
    if target.exists():
        shutil.rmtree(backup, ignore_errors=True)  # a backup left after a finished swap: stale
        os.replace(target, backup)
        os.replace(tmp, target)
        fsync_path(target.parent)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)
        fsync_path(target.parent)


def atomic_dir_write(target: Path, write, *, keep_existing: bool = False) -> None:
    """Call `write(tmp_dir)` on a sibling temp dir, then swap it in for `target` (all or nothing,
    `swap_into_place`): at every moment one complete version exists, on disk too.

    `keep_existing`: a cache entry, the same content whoever writes it (e.g. every DDP process filling
    an empty cache at once): the first complete one stays and later writers drop theirs, so a process
    already reading it never sees it swapped out from under it."""
    target = recover_dir(target)
    make_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint should get the usual mode
        write(tmp)
        _usual_file_modes(tmp)
        if keep_existing and target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        existed = target.exists()
        try:
            swap_into_place(tmp, target)
        except OSError:
            if existed or not target.exists():
                raise
            # Another process (e.g. a second DDP rank filling the cache) finished first.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(target)
        raise


def _usual_file_modes(directory: Path) -> None:
    """Files a writer made private get the usual mode: safetensors' `save_file` writes 0600 (measured:
    an exported gated_model.safetensors was unreadable to the group that shares the checkpoint)."""
    mode = 0o666 & ~current_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


def cache_dir() -> Path:
    """Where converted models, tokenizers and fingerprints are kept between runs (SELFMTP_CACHE overrides)."""
    root = os.environ.get("SELFMTP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "selfmtp")
    return Path(root)
