"""Framing of the PostgreSQL v3 protocol: split a byte stream into messages.

Every regular message is a type byte followed by a big-endian int32 length
that counts itself and the payload, but not the type byte. The startup
packets a client sends first have no type byte; `read_startup` handles them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.errors import MessageTooLarge, ProtocolError

_LENGTH = struct.Struct("!I")

# The largest message the proxy buffers unless configured otherwise.
# PostgreSQL allows a field value of up to 1 GB, so this is a limit of the
# proxy's memory, not of the protocol. 256 MiB fits a 100 MiB bytea value
# read back in hex text format, or a 100 MiB text value sealed and armoured.
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message: its type byte and its whole original bytes."""

    type: int
    raw: bytes

    @property
    def payload(self) -> memoryview:
        return memoryview(self.raw)[5:]


class FrameReader:
    """Collect bytes from one side of a connection and return whole messages.

    A partial message is kept until the rest arrives. Its pieces are kept in a
    list and joined once, so a large message arriving in many small reads
    costs linear time. A message longer than `max_message` raises
    MessageTooLarge as soon as its header arrives, before its body is read.
    `source` names the sending side in that error.
    """

    def __init__(
        self, max_message: int = DEFAULT_MAX_MESSAGE, source: str = "peer"
    ) -> None:
        self._max_message = max_message
        self._source = source
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._expected = 0
        # For scan(): the start of a header cut off at the end of the last
        # read, and the bytes of the current message still to come.
        self._header_start = b""
        self._to_skip = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete message held until the rest arrives."""
        return self._pending_size

    def feed(self, data: bytes) -> list[Frame]:
        if self._pending:
            if self._pending_size + len(data) < max(self._expected, 5):
                self._pending.append(data)
                self._pending_size += len(data)
                return []
            data = b"".join(self._pending) + data
            self._pending.clear()
            self._pending_size = 0
        return self._split(data)

    def scan(self, data: bytes) -> None:
        """Check the lengths of the messages in data without splitting it out.

        For a stream whose bytes pass on unchanged. Start scanning at a
        message boundary (pending_bytes is 0) and do not feed() afterwards.
        Raises as feed() does for an invalid or too long message.
        """
        end = len(data)
        offset = self._to_skip
        if self._header_start:
            missing = 5 - len(self._header_start)
            if end < missing:
                self._header_start += data
                return
            header = self._header_start + data[:missing]
            (length,) = _LENGTH.unpack_from(header, 1)
            self._check_length(header[0], length)
            offset = length + 1 - len(self._header_start)
            self._header_start = b""
        while end - offset >= 5:
            (length,) = _LENGTH.unpack_from(data, offset + 1)
            self._check_length(data[offset], length)
            offset += length + 1
        if offset < end:
            self._header_start = data[offset:]
            self._to_skip = 0
        else:
            self._to_skip = offset - end

    def _split(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        offset = 0
        end = len(data)
        while end - offset >= 5:
            (length,) = _LENGTH.unpack_from(view, offset + 1)
            self._check_length(data[offset], length)
            total = length + 1
            if end - offset < total:
                break
            frames.append(Frame(data[offset], data[offset : offset + total]))
            offset += total
        if offset < end:
            self._keep_partial(data, offset)
        return frames

    def _check_length(self, msg_type: int, length: int) -> None:
        if length < 4:
            raise ProtocolError(
                f"invalid message length {length} for message type "
                f"{chr(msg_type)!r}"
            )
        if length + 1 > self._max_message:
            raise MessageTooLarge(self._source, length + 1, self._max_message)

    def _keep_partial(self, data: bytes, offset: int) -> None:
        rest = data[offset:]
        self._pending.append(rest)
        self._pending_size = len(rest)
        if len(rest) >= 5:
            (length,) = _LENGTH.unpack_from(rest, 1)
            self._expected = length + 1
        else:
            self._expected = 5


def build(msg_type: bytes, payload: bytes) -> bytes:
    """Frame a payload as a regular message of the given type."""
    return msg_type + _LENGTH.pack(len(payload) + 4) + payload


def read_startup_length(header: bytes) -> int:
    """Return the total length of a startup packet from its first 4 bytes."""
    (length,) = _LENGTH.unpack(header)
    return int(length)
