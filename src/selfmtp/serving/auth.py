"""The API key: where it comes from, how it is checked, and when the server refuses to run without one.

The key comes from `--api-key-file` (first line), the SELFMTP_API_KEY variable, or `--api-key` (seen
by anyone who can list processes: the other two are preferred). It guards every route but the bare
liveness probe `LIVENESS_PATH`, and is compared in constant time (`hmac.compare_digest`). A server
bound beyond loopback without a key refuses to start unless told `--allow-no-key`, and then warns.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from selfmtp.errors import SelfMTPError

KEY_VARIABLE = "SELFMTP_API_KEY"
LIVENESS_PATH = "/health/live"


def resolve_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from the flag, the file or the variable (exactly one source may give it); None if none does."""
    sources = {"--api-key": api_key, "--api-key-file": None, KEY_VARIABLE: os.environ.get(KEY_VARIABLE) or None}
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise SelfMTPError(f"cannot read --api-key-file {api_key_file}: {error}") from None
        sources["--api-key-file"] = lines[0].strip() if lines and lines[0].strip() else ""
        if not sources["--api-key-file"]:
            raise SelfMTPError(f"--api-key-file {api_key_file}: its first line is empty")
    given = {name: key for name, key in sources.items() if key is not None}
    if len(given) > 1:
        raise SelfMTPError(f"the API key is given by {' and '.join(given)}: give it once")
    key = next(iter(given.values()), None)
    if key is not None and (not key.isprintable() or not key.strip()):
        raise SelfMTPError("the API key must be printable, non-blank text")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(host: str, api_key: str | None, allow_no_key: bool, log=print) -> None:
    """Refuse (or, with `allow_no_key`, warn loudly about) serving beyond loopback without a key."""
    if api_key is not None or is_loopback(host):
        return
    if not allow_no_key:
        raise SelfMTPError(f"--host {host} serves beyond this machine without an API key: set {KEY_VARIABLE}, "
                           "--api-key-file or --api-key, or pass --allow-no-key to serve openly")  # fmt: skip
    log(f"WARNING: serving on {host} WITHOUT an API key (--allow-no-key): anyone who can reach this port can "
        "use the model and read /health and /metrics")  # fmt: skip


def authorized(header: bytes | None, api_key: str) -> bool:
    """Whether an Authorization header (raw bytes) carries `Bearer <api_key>` (constant-time comparison)."""
    return hmac.compare_digest(header or b"", f"Bearer {api_key}".encode())
