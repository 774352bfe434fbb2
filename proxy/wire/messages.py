"""Decoders and encoders for the messages whose contents the proxy reads.

Only messages that may carry an encrypted value or describe one are decoded;
everything else is forwarded as the original bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.errors import ProtocolError
from proxy.wire.frames import build

_INT16 = struct.Struct("!h")
_UINT16 = struct.Struct("!H")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_FIELD = struct.Struct("!IhIhih")

TEXT_FORMAT = 0
BINARY_FORMAT = 1


class _Cursor:
    """Sequential reader over a message payload that raises ProtocolError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = bytes(data)
        self._pos = 0

    def cstring(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise ProtocolError("unterminated string in message")
        text = self._data[self._pos : end].decode("utf-8", "surrogateescape")
        self._pos = end + 1
        return text

    def _unpack(self, fmt: struct.Struct) -> int:
        if self._pos + fmt.size > len(self._data):
            raise ProtocolError("message is shorter than its contents")
        (value,) = fmt.unpack_from(self._data, self._pos)
        self._pos += fmt.size
        return int(value)

    def int16(self) -> int:
        return self._unpack(_INT16)

    def uint16(self) -> int:
        return self._unpack(_UINT16)

    def int32(self) -> int:
        return self._unpack(_INT32)

    def uint32(self) -> int:
        return self._unpack(_UINT32)

    def take(self, size: int) -> bytes:
        if size < 0 or self._pos + size > len(self._data):
            raise ProtocolError("message is shorter than its contents")
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]


def _cstring(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\0"


@dataclass(frozen=True, slots=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Parse:
        cur = _Cursor(payload)
        name = cur.cstring()
        query = cur.cstring()
        count = cur.uint16()
        types = tuple(cur.uint32() for _ in range(count))
        return cls(name, query, types)

    def encode(self) -> bytes:
        body = [_cstring(self.statement), _cstring(self.query)]
        body.append(_UINT16.pack(len(self.param_types)))
        body.extend(_UINT32.pack(oid) for oid in self.param_types)
        return build(b"P", b"".join(body))


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Bind:
        cur = _Cursor(payload)
        portal = cur.cstring()
        statement = cur.cstring()
        param_formats = tuple(cur.int16() for _ in range(cur.uint16()))
        params: list[bytes | None] = []
        for _ in range(cur.uint16()):
            size = cur.int32()
            params.append(None if size < 0 else cur.take(size))
        result_formats = tuple(cur.int16() for _ in range(cur.uint16()))
        return cls(portal, statement, param_formats, tuple(params), result_formats)

    def encode(self) -> bytes:
        body = [_cstring(self.portal), _cstring(self.statement)]
        body.append(_UINT16.pack(len(self.param_formats)))
        body.extend(_INT16.pack(code) for code in self.param_formats)
        body.append(_UINT16.pack(len(self.params)))
        for value in self.params:
            if value is None:
                body.append(_INT32.pack(-1))
            else:
                body.append(_INT32.pack(len(value)))
                body.append(value)
        body.append(_UINT16.pack(len(self.result_formats)))
        body.extend(_INT16.pack(code) for code in self.result_formats)
        return build(b"B", b"".join(body))

    def param_format(self, index: int) -> int:
        return format_code(self.param_formats, index)


def format_code(codes: tuple[int, ...], index: int) -> int:
    """Return the format of column or parameter `index` under the Bind rules.

    No codes means all text, one code applies to all, otherwise one each.
    A list too short for `index` gives text: the server rejects such a Bind
    itself, so the value is never used.
    """
    if not codes:
        return TEXT_FORMAT
    if len(codes) == 1:
        return codes[0]
    if index >= len(codes):
        return TEXT_FORMAT
    return codes[index]


def decode_target(payload: bytes | memoryview) -> tuple[str, str]:
    """Decode Describe or Close: the kind ('S' or 'P') and the name."""
    cur = _Cursor(payload)
    kind = chr(cur.byte())
    return kind, cur.cstring()


def decode_execute(payload: bytes | memoryview) -> tuple[str, int]:
    """Decode Execute: the portal name and the row limit (0 for no limit)."""
    cur = _Cursor(payload)
    portal = cur.cstring()
    return portal, cur.int32()


def decode_query(payload: bytes | memoryview) -> str:
    return _Cursor(payload).cstring()


def encode_query(query: str) -> bytes:
    return build(b"Q", _cstring(query))


def encode_describe(kind: str, name: str) -> bytes:
    return build(b"D", kind.encode() + _cstring(name))


@dataclass(frozen=True, slots=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


def decode_row_description(payload: bytes | memoryview) -> tuple[Field, ...]:
    cur = _Cursor(payload)
    fields = []
    for _ in range(cur.uint16()):
        name = cur.cstring()
        values = _FIELD.unpack(cur.take(_FIELD.size))
        fields.append(Field(name, *values))
    return tuple(fields)


def encode_row_description(fields: tuple[Field, ...]) -> bytes:
    body = [_UINT16.pack(len(fields))]
    for f in fields:
        body.append(_cstring(f.name))
        body.append(
            _FIELD.pack(f.table_oid, f.column, f.type_oid, f.type_size, f.type_modifier, f.format)
        )
    return build(b"T", b"".join(body))


def decode_parameter_description(payload: bytes | memoryview) -> tuple[int, ...]:
    cur = _Cursor(payload)
    return tuple(cur.uint32() for _ in range(cur.uint16()))


def encode_parameter_description(types: tuple[int, ...]) -> bytes:
    body = _UINT16.pack(len(types)) + b"".join(_UINT32.pack(oid) for oid in types)
    return build(b"t", body)


def decode_data_row(payload: bytes | memoryview) -> list[bytes | None]:
    cur = _Cursor(payload)
    values: list[bytes | None] = []
    for _ in range(cur.uint16()):
        size = cur.int32()
        values.append(None if size < 0 else cur.take(size))
    return values


def encode_data_row(values: list[bytes | None]) -> bytes:
    body = [_UINT16.pack(len(values))]
    for value in values:
        if value is None:
            body.append(_INT32.pack(-1))
        else:
            body.append(_INT32.pack(len(value)))
            body.append(value)
    return build(b"D", b"".join(body))


def decode_error_fields(payload: bytes | memoryview) -> dict[str, str]:
    """Decode the fields of an ErrorResponse or NoticeResponse."""
    cur = _Cursor(payload)
    fields: dict[str, str] = {}
    while True:
        code = cur.byte()
        if code == 0:
            return fields
        fields[chr(code)] = cur.cstring()


def encode_error(
    sqlstate: str,
    message: str,
    hint: str = "",
    severity: str = "ERROR",
    position: int | None = None,
) -> bytes:
    """Build an ErrorResponse with the fields drivers read first."""
    parts = [b"S" + _cstring(severity), b"V" + _cstring(severity)]
    parts.append(b"C" + _cstring(sqlstate))
    parts.append(b"M" + _cstring(message))
    if hint:
        parts.append(b"H" + _cstring(hint))
    if position is not None:
        parts.append(b"P" + _cstring(str(position)))
    return build(b"E", b"".join(parts) + b"\0")
