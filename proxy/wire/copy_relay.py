"""The COPY state of one session: which stream is being rewritten, and how.

A client may send its CopyData right behind the COPY statement, before the
server's CopyInResponse arrives (asyncpg does), so a COPY FROM STDIN stream
starts when the statement is sent, not when the server answers. COPY TO
STDOUT starts at the server's CopyOutResponse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.crypto.subjects import KeysNeeded, SubjectValue
from proxy.errors import PgsealError
from proxy.wire.copy import CopyStream
from proxy.wire.frames import Frame, build

if TYPE_CHECKING:
    from proxy.sql.analyze import CopyPlan

log = logging.getLogger(__name__)


class CopyFailure(PgsealError):
    """A COPY TO STDOUT row that could not be opened."""


class CopyRelay:
    def __init__(self, planner: Any, conn_id: str) -> None:
        self._planner = planner
        self._conn_id = conn_id
        self._stream: CopyStream | None = None
        self._direction = ""
        self._failed = False

    def reset(self) -> None:
        self._stream = None
        self._direction = ""
        self._failed = False

    def statement_sent(self, copy: CopyPlan | None) -> None:
        """Start sealing when a COPY FROM STDIN statement goes to the server."""
        if copy is not None and copy.direction == "in":
            self._start(copy)

    def server_started(self, frame: Frame, copy: CopyPlan | None) -> None:
        """Follow a CopyInResponse or CopyOutResponse for the statement's plan."""
        direction = "in" if frame.type == ord("G") else "out"
        if direction == "in" and self._direction == "in":
            return
        self.reset()
        if copy is not None and copy.direction == direction:
            self._start(copy)

    def _start(self, copy: CopyPlan) -> None:
        planner = self._planner
        fields = copy.fields
        associated = copy.associated
        subjects = copy.subjects

        def seal(
            index: int, value: bytes, fmt: int, row: Mapping[int, bytes | None]
        ) -> bytes | None:
            column = fields[index][0]
            bound = tuple(
                other.canonical(row.get(i), fmt)
                for other, i in zip(column.associated, associated.get(index, ()))
            )
            subject = None
            if index in subjects:
                assert self._stream is not None
                raw = self._stream.row_value(subjects[index])
                subject = None if raw is None else SubjectValue(raw, fmt)
            return planner.seal_param(  # type: ignore[no-any-return]
                column, value, fmt, associated=bound, subject=subject
            )

        def open_(
            index: int, value: bytes, fmt: int, row: Mapping[int, bytes | None]
        ) -> bytes | None:
            indexes = associated.get(index)
            bound = None if indexes is None else tuple((row.get(i), fmt) for i in indexes)
            return planner.open_value(fields[index], value, fmt, bound)  # type: ignore[no-any-return]

        self._failed = False
        self._direction = copy.direction
        transform = seal if copy.direction == "in" else open_
        context = frozenset(i for indexes in associated.values() for i in indexes)
        self._stream = CopyStream(copy.options, set(fields), transform, context)

    def client_data(self, frame: Frame) -> list[bytes]:
        """Return what to send the server for a client's CopyData."""
        if self._stream is None or self._direction != "in":
            return [frame.raw]
        if self._failed:
            return []
        try:
            data = self._stream.feed(bytes(frame.payload))
        except KeysNeeded:
            raise
        except (PgsealError, ValueError) as exc:
            return self._fail(exc)
        return [build(b"d", data)] if data else []

    def client_end(self, frame: Frame) -> list[bytes]:
        """Return what to send the server for a client's CopyDone or CopyFail."""
        stream = self._stream if self._direction == "in" else None
        if self._failed:
            self.reset()
            return []
        out = []
        if stream is not None and frame.type == ord("c"):
            try:
                data = stream.finish()
            except KeysNeeded:
                raise
            except (PgsealError, ValueError) as exc:
                self.reset()
                return self._fail(exc)
            if data:
                out.append(build(b"d", data))
        self.reset()
        out.append(frame.raw)
        return out

    def _fail(self, exc: Exception) -> list[bytes]:
        # CopyFail makes the server end the COPY with an ErrorResponse that
        # carries this message, so nothing of the stream is stored.
        message = f"pgseal could not seal the COPY data: {exc}"
        log.info("[%s] COPY stopped: %s", self._conn_id, exc)
        self._failed = True
        return [build(b"f", message.encode() + b"\0")]

    def server_data(self, frame: Frame) -> list[bytes]:
        """Return what to send the client for a server's CopyData.

        Raises CopyFailure when a value does not open.
        """
        if self._stream is None or self._direction != "out":
            return [frame.raw]
        try:
            data = self._stream.feed(bytes(frame.payload))
        except KeysNeeded:
            raise
        except (PgsealError, ValueError) as exc:
            raise CopyFailure(str(exc)) from exc
        return [build(b"d", data)] if data else []

    def server_done(self, frame: Frame) -> list[bytes]:
        stream = self._stream if self._direction == "out" else None
        out = []
        if stream is not None:
            data = stream.finish()
            if data:
                out.append(build(b"d", data))
        if self._direction == "out":
            self.reset()
        out.append(frame.raw)
        return out
