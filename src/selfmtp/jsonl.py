"""Reading user-given text/jsonl files with one-line errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from selfmtp.errors import SelfMTPError


def numbered_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of `path` with their 1-based numbers; `what` names the file in errors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SelfMTPError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip()]


def parse_json_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise SelfMTPError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
