"""The audit log of key operations: one JSON object per line, append-only.

Every operation on data keys (creation, rotation, rewrapping, retirement, and
the start and end of a re-encryption) writes one line, whether it succeeds or
fails. A line names the keys by name, id and version, the keyrings involved
and the actor, and never contains key material. Example, wrapped here::

    {"time": "2025-01-31T09:12:44.125006+00:00", "action": "rotate",
     "outcome": "ok", "keys": [{"name": "public.users.email", "key_id": 3,
     "version": 2}], "keyrings": ["sodium:3f9c2a7d1e0b4c65"],
     "actor": {"os_user": "alice", "db_user": "pgseal", "pid": 4711},
     "details": {"reason": "operator"}}

The file is opened with O_APPEND, so several processes can share it and each
line is written with a single write() call. It is created with mode 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

__all__ = ["AuditLog", "AuditRecord", "KeyVersionRef"]

log = logging.getLogger(__name__)

_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class KeyVersionRef:
    """One data key version as the audit log names it."""

    name: str
    key_id: int
    version: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "key_id": self.key_id, "version": self.version}


@dataclass(slots=True)
class AuditRecord:
    """A line in progress: an operation fills in keys and details as it learns them."""

    action: str
    keys: list[KeyVersionRef] = field(default_factory=list)
    key_names: list[str] = field(default_factory=list)
    keyrings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """An append-only file of JSON lines, one per key operation.

    Safe to call from several threads. Each line is fsync'ed, because key
    operations are rare and an audit line that a crash loses is worse than a
    few milliseconds per operation.
    """

    def __init__(self, path: Path, *, db_user: str) -> None:
        self.path = Path(path)
        self._actor = {
            "os_user": _os_user(),
            "db_user": db_user,
            "pid": os.getpid(),
        }
        self._lock = threading.Lock()
        self._fd = _open_append(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def write(
        self,
        record: AuditRecord,
        *,
        error: BaseException | None = None,
    ) -> None:
        """Append one line for record; error makes its outcome "error"."""
        line: dict[str, Any] = {
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "action": record.action,
            "outcome": "ok" if error is None else "error",
        }
        if error is not None:
            line["error"] = type(error).__name__
        if record.keys:
            line["keys"] = [key.as_json() for key in record.keys]
        if record.key_names:
            line["key_names"] = sorted(set(record.key_names))
        line["keyrings"] = list(record.keyrings)
        line["actor"] = dict(self._actor)
        if record.details:
            line["details"] = record.details
        self._append(json.dumps(line, sort_keys=False, default=str) + "\n")

    @contextlib.contextmanager
    def operation(
        self,
        action: str,
        *,
        keyrings: Iterable[str] = (),
        key_names: Iterable[str] = (),
        details: Mapping[str, Any] | None = None,
    ) -> Iterator[AuditRecord]:
        """Write one line when the block ends, with outcome ok or error.

        The block may add keys and details to the yielded record. An
        exception is recorded by class name and then re-raised.
        """
        record = AuditRecord(
            action,
            key_names=list(key_names),
            keyrings=list(keyrings),
            details=dict(details or {}),
        )
        try:
            yield record
        except BaseException as exc:
            self.write(record, error=exc)
            raise
        self.write(record)

    def _append(self, text: str) -> None:
        data = text.encode("utf-8")
        with self._lock:
            if self._fd < 0:
                raise ConfigError(f"audit log {self.path} is closed")
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError as exc:
                raise ConfigError(
                    f"cannot write to audit log {self.path}: {exc}"
                ) from exc


def audit_operation(
    audit: AuditLog | None,
    action: str,
    *,
    keyrings: Iterable[str] = (),
    key_names: Iterable[str] = (),
    details: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[AuditRecord]:
    """Return audit.operation(...), or a block that records nothing if audit is None."""
    if audit is None:
        return contextlib.nullcontext(AuditRecord(action))
    return audit.operation(
        action, keyrings=keyrings, key_names=key_names, details=details
    )


def _open_append(path: Path) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, _FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot open audit log {path}: {exc}") from exc
    mode = os.fstat(fd).st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "audit log %s has mode %04o, which lets group or others read it; "
            "restrict it with: chmod 600 %s",
            path,
            mode,
            path,
        )
    return fd


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # No name for the uid in the password database, as in some containers.
        return f"uid:{os.getuid()}"
