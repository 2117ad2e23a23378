"""Progress bars that read well on a terminal and in a log file: every tqdm in selfmtp comes from here.

On a terminal: a normal tqdm bar. When stderr is not a terminal (`selfmtp demo > log 2>&1`, a batch job),
tqdm's carriage-return frames would pile up as one endless line, thousands of frames a minute; there the
bar prints one plain line at most every `LOG_INTERVAL_S` seconds instead (and its final state on close).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # a log line per bar this often at most: a 30-minute demo writes ~200 short lines


class _LineWriter:
    """A file for tqdm that turns each carriage-return frame into one newline-terminated line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:  # tqdm clears a bar with blank frames: those are not lines
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for a log: a new postfix or description waits for the next periodic line (tqdm would print
    one at once, which with a postfix set every step is a line every step again)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=True):
        super().set_description_str(desc, refresh=False)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; periodic plain lines on stderr otherwise."""
    stream, bar = kwargs.pop("file", None) or sys.stderr, tqdm
    if not _is_terminal(stream):
        bar = _LogBar
        stream = _LineWriter(stream)
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.0), LOG_INTERVAL_S)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval", 0.0), LOG_INTERVAL_S)
        kwargs["leave"] = True  # a line that is cleared is still in the log: say where the bar ended
        kwargs.setdefault("ncols", 100)  # tqdm cannot ask a file for its width
    return bar(iterable, disable=disable, file=stream, **kwargs)


def progress_write(message: str) -> None:
    """Print a line without breaking a bar in progress (tqdm.write)."""
    tqdm.write(message, file=sys.stderr)
