"""Stopping and starting again without losing work: the output folder's state, the metrics log, signals.

What a run folder can look like after a crash, and what `--resume` does with it:
    checkpoints/step-N/ present         continue from the newest; metrics rows after step N are dropped
                                        (they are recomputed), and so is a line torn by `kill -9`
    run_config.json, no checkpoint      killed before the first checkpoint: start over from step 0 under
                                        the recorded settings. Data and region plans depend only on
                                        (seed, step) and the weights on the starting checkpoint, so the
                                        rerun is the run that was lost, at the cost of the steps since the
                                        start, the same loss as any crash between two checkpoints. (A
                                        checkpoint at step 0 would instead write every trainable weight at
                                        the start of every run: 16 GB of disk for an 8B model.)
    nothing                             nothing to resume: an error

Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) asks the loop to stop after the step in flight; it
then writes a checkpoint of that step and raises `Interrupted`, exit status 130. A second signal stops at
once; the newest checkpoint is then the last periodic one.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from selfmtp.errors import Interrupted, SelfMTPError
from selfmtp.files import recover_dir, write_bytes_atomic
from selfmtp.training.state import RUN_SETTINGS, list_checkpoints


def prepare_output(cfg, rank: int) -> tuple[Path, bool, Path | None]:
    """(output folder, whether this run resumes, the checkpoint it continues from or None = step 0)."""
    out = Path(cfg.output)
    root = out / "checkpoints"
    # Every process recovers (recover_dir tolerates the race), so all list the same checkpoints.
    checkpoints = recover_checkpoints(root, clean=rank == 0) if cfg.resume else list_checkpoints(root)
    recorded = (out / RUN_SETTINGS).is_file()
    if cfg.resume and not checkpoints and not recorded:
        raise SelfMTPError(f"--resume: no checkpoint to resume in {out / 'checkpoints'}")
    if cfg.resume and not checkpoints and (out / "summary.json").is_file():
        raise SelfMTPError(f"--resume: {out} holds a finished run that kept no checkpoint (--save-every 0): "
                           "nothing to continue; train into a new --output")
    if not cfg.resume and (checkpoints or recorded or (out / "metrics.jsonl").exists()):
        raise SelfMTPError(f"{out} already holds a training run: pass --resume or choose another --output")
    if cfg.resume and not checkpoints and rank == 0:
        print(f"selfmtp: no checkpoint in {out} yet: starting the run over from step 0 with its recorded settings",
              file=sys.stderr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out, cfg.resume, (checkpoints[-1] if checkpoints else None)


def recover_checkpoints(root: Path, *, clean: bool) -> list[Path]:
    """The checkpoints in `root` (list_checkpoints) once what a kill cut short is repaired, in this order:

    1. put back every checkpoint whose overwrite was cut short: `.step-N.old` without `step-N` is the only
       copy of step N (files.swap_into_place moved it aside and died before the new one took its place);
    2. with `clean` (one process), delete the rest: temp folders (`.step-N.tmp*`), backups of finished
       overwrites (`.step-N.old` beside its `step-N`), checkpoints cut short while being pruned
       (`.step-N.pruned`). None is ever read, and each can be as large as a whole checkpoint."""
    for backup in root.glob(".step-*.old") if root.is_dir() else []:
        recover_dir(root / backup.name.removeprefix(".").removesuffix(".old"))
    for path in root.glob(".step-*") if clean and root.is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    return list_checkpoints(root)


def truncate_metrics(path: Path, upto: int) -> int:
    """Keep the rows of steps <= `upto` (-1: none). A last line torn by a kill is dropped; a malformed
    line elsewhere is a damaged log, not a crash's trace, and an error. Returns the rows dropped."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    kept, dropped = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # a write cut short: the step is recomputed after the checkpoint
                dropped += 1
                continue
            raise SelfMTPError(f"{path}:{number}: not a metrics row ({exc}): repair or delete that line") from None
        if step <= upto:
            kept.append(line)
        else:
            dropped += 1
    write_bytes_atomic(path, "".join(f"{line}\n" for line in kept).encode())
    return dropped


def how_to_continue(out: Path) -> str:
    """What the folder holds after an interruption and the command that carries on from it."""
    checkpoints = list_checkpoints(Path(out) / "checkpoints")
    if checkpoints:
        return f"saved {checkpoints[-1]}; run the same command with --resume to continue"
    if (Path(out) / RUN_SETTINGS).is_file():
        return f"no step of {out} was saved; the same command with --resume starts it over"
    return "nothing was saved; run the same command again"


class StopRequest:
    """While active, SIGINT/SIGTERM set `requested` instead of raising; a second one raises at once.
    Signal handlers can only be set in the main thread: elsewhere this leaves signals as they are."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nselfmtp: {signal.Signals(signum).name}: stopping after this step (again to stop now)",
              file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, world: int, device) -> bool:
        """Whether any process was asked to stop: all of them stop at the same step (collectives)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def interrupted(out: Path, step: int) -> Interrupted:
    return Interrupted(f"stopped after step {step}: {how_to_continue(out)}")
