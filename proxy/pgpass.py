"""The proxy's own upstream password from PGPASSWORD or a password file, as libpq.

libpq takes the password from the connection string first, then from the
PGPASSWORD environment variable, then from the password file: PGPASSFILE,
or ~/.pgpass by default. Each line of the file is
``hostname:port:database:username:password``. The first four fields may be
``*``, and a backslash escapes a colon or a backslash. Lines starting with
``#`` are comments. As in libpq, a file that group or others can read or
write is ignored with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["lookup_password", "passfile_path"]

log = logging.getLogger(__name__)


def lookup_password(host: str, port: int, database: str, user: str) -> str | None:
    """Return the password for a login from PGPASSWORD or the password file.

    Returns None when neither gives one.
    """
    from_env = os.environ.get("PGPASSWORD")
    if from_env:
        return from_env
    path = passfile_path()
    if path is None or not _usable(path):
        return None
    wanted = (host, str(port), database, user)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("password file %s cannot be read, so it is ignored: %s", path, exc)
        return None
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = _split_fields(line)
        if len(fields) < 5:
            continue
        if all(field in ("*", value) for field, value in zip(fields[:4], wanted)):
            return fields[4]
    return None


def passfile_path() -> Path | None:
    """Return the password file's path: PGPASSFILE, else ~/.pgpass."""
    configured = os.environ.get("PGPASSFILE")
    if configured:
        return Path(configured)
    try:
        return Path.home() / ".pgpass"
    except RuntimeError:
        # No home directory can be determined, so there is no default file.
        return None


def _usable(path: Path) -> bool:
    """Tell whether the file exists, is a regular file and has mode 0600 or less."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if not stat.S_ISREG(mode):
        log.warning("password file %s is not a plain file, so it is ignored", path)
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "password file %s has group or world access, so it is ignored; "
            "run chmod 600 %s",
            path,
            path,
        )
        return False
    return True


def _split_fields(line: str) -> list[str]:
    """Split a password file line at unescaped colons into at most five fields.

    The fifth field, the password, is the rest of the line, as in libpq.
    """
    fields: list[str] = []
    current: list[str] = []
    chars = iter(line)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields
