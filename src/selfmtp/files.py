"""File-system helpers shared by the checkpoint and results writers."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask (read by setting and restoring it): temp files and dirs made by `tempfile`
    are private (0600/0700), so atomic writers apply the usual mode before renaming them into place."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
