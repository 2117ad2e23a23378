"""The one exception type that means "the user gave us something wrong".

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SelfMTPError(Exception):
    """A user-facing error: bad path, bad flag value, unsupported model, malformed file."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) handled: the work so far is saved; the message says how to continue.
    The CLI prints it as one line and exits 130, the shell's status for SIGINT."""
