"""COPY data streams: seal or open chosen fields of each row, in every format.

CopyData messages split the stream at arbitrary points, so each stream keeps
the bytes of an unfinished row until the rest arrives, and emits only whole
rows. Fields that need no change are copied as their original bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from proxy.errors import ProtocolError

# Transforms one field value (None for NULL) in the given wire format. The
# mapping contains the row's context fields, decoded, with None for NULL.
FieldTransform = Callable[[int, bytes, int, Mapping[int, bytes | None]], bytes | None]

BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")

_TEXT_ESCAPES = {
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
}


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """The parts of a COPY statement's options that change how rows are split."""

    format: str = "text"
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    quote: bytes = b'"'
    escape: bytes = b'"'
    header: bool = False

    @classmethod
    def from_options(cls, options: dict[str, str | bool]) -> CopyOptions:
        fmt = str(options.get("format", "text")).lower()
        csv = fmt == "csv"
        delimiter = str(options.get("delimiter", "," if csv else "\t")).encode()
        null = str(options.get("null", "" if csv else "\\N")).encode()
        quote = str(options.get("quote", '"')).encode()
        escape = str(options.get("escape", quote.decode())).encode()
        header = options.get("header", False)
        header = header is True or str(header).lower() in ("true", "on", "1", "match")
        return cls(fmt, delimiter, null, quote, escape, header)


class CopyStream:
    """Rewrite the chosen fields of a COPY stream, row by row."""

    def __init__(
        self,
        options: CopyOptions,
        fields: set[int],
        transform: FieldTransform,
        context: frozenset[int] = frozenset(),
    ) -> None:
        """`context` names the fields whose values the transform reads as well."""
        self._options = options
        self._fields = fields
        self._transform = transform
        self._context = context
        self._buffer = b""
        self._skip_header = options.header and options.format != "binary"
        self._binary_header_done = False
        # The undecoded fields of the row being rewritten, for row_value().
        self._row_fields: list[bytes] | list[bytes | None] = []

    def feed(self, data: bytes) -> bytes:
        """Return the rewritten whole rows that `data` completes.

        If the transform raises, the stream is left as it was before the
        call, so the same data can be fed again.
        """
        state = (self._buffer, self._skip_header, self._binary_header_done)
        self._buffer += data
        try:
            if self._options.format == "binary":
                return self._feed_binary()
            return self._feed_lines()
        except Exception:
            self._buffer, self._skip_header, self._binary_header_done = state
            raise

    def finish(self) -> bytes:
        """Return the rewritten last row, when the stream lacks a final newline.

        If the transform raises, the stream is left as it was before the call.
        """
        rest = self._buffer
        if not rest:
            return b""
        if self._options.format == "binary":
            raise ProtocolError("binary COPY data ends in the middle of a row")
        skip_header = self._skip_header
        try:
            row = self._row(rest)
        except Exception:
            self._skip_header = skip_header
            raise
        self._buffer = b""
        return row

    def row_value(self, index: int) -> bytes | None:
        """Return a field of the row being rewritten, decoded, or None for NULL.

        For a transform that needs another field of the same row.
        """
        if index >= len(self._row_fields):
            return None
        raw = self._row_fields[index]
        if self._options.format == "binary" or raw is None:
            return raw
        if raw == self._options.null:
            return None
        if self._options.format == "csv":
            return _unquote_csv(raw, self._options)
        return _unescape_text(raw)

    # Text and CSV

    def _feed_lines(self) -> bytes:
        out = []
        start = 0
        while True:
            end = self._row_end(start)
            if end < 0:
                break
            out.append(self._row(self._buffer[start : end + 1]))
            start = end + 1
        self._buffer = self._buffer[start:]
        return b"".join(out)

    def _row_end(self, start: int) -> int:
        """Return the index of the newline that ends the row at `start`, or -1."""
        if self._options.format != "csv":
            return self._buffer.find(b"\n", start)
        for index, byte, inside in _csv_bytes(self._buffer, start, self._options):
            if byte == 0x0A and not inside:
                return index
        return -1

    def _row(self, line: bytes) -> bytes:
        if self._skip_header:
            self._skip_header = False
            return line
        body = line.rstrip(b"\r\n")
        ending = line[len(body) :]
        if body == b"\\.":
            return line
        if self._options.format == "csv":
            return self._csv_row(body) + ending
        return self._text_row(body) + ending

    def _text_row(self, body: bytes) -> bytes:
        fields = body.split(self._options.delimiter)
        self._row_fields = list(fields)
        row = {
            i: None if fields[i] == self._options.null else _unescape_text(fields[i])
            for i in self._context
            if i < len(fields)
        }
        for index in self._fields:
            if index >= len(fields) or fields[index] == self._options.null:
                continue
            value = self._transform(index, _unescape_text(fields[index]), 0, row)
            fields[index] = self._options.null if value is None else _escape_text(value)
        return self._options.delimiter.join(fields)

    def _csv_row(self, body: bytes) -> bytes:
        raw_fields = _split_csv(body, self._options)
        self._row_fields = list(raw_fields)
        row = {
            i: None
            if raw_fields[i] == self._options.null
            else _unquote_csv(raw_fields[i], self._options)
            for i in self._context
            if i < len(raw_fields)
        }
        for index in self._fields:
            if index >= len(raw_fields):
                continue
            raw = raw_fields[index]
            if raw == self._options.null:
                continue
            value = self._transform(index, _unquote_csv(raw, self._options), 0, row)
            raw_fields[index] = (
                self._options.null if value is None else _quote_csv(value, self._options)
            )
        return self._options.delimiter.join(raw_fields)

    # Binary

    def _feed_binary(self) -> bytes:
        out = []
        pos = 0
        if not self._binary_header_done:
            header_end = _binary_header_end(self._buffer)
            if header_end < 0:
                return b""
            out.append(self._buffer[:header_end])
            pos = header_end
            self._binary_header_done = True
        while True:
            end, row = self._binary_row(pos)
            if end < 0:
                break
            out.append(row)
            pos = end
        self._buffer = self._buffer[pos:]
        return b"".join(out)

    def _binary_row(self, pos: int) -> tuple[int, bytes]:
        buffer = self._buffer
        if len(buffer) - pos < 2:
            return -1, b""
        (count,) = _INT16.unpack_from(buffer, pos)
        if count == -1:
            return pos + 2, buffer[pos : pos + 2]
        cursor = pos + 2
        values: list[bytes | None] = []
        for _ in range(count):
            if len(buffer) - cursor < 4:
                return -1, b""
            (size,) = _INT32.unpack_from(buffer, cursor)
            cursor += 4
            if size < 0:
                values.append(None)
                continue
            if len(buffer) - cursor < size:
                return -1, b""
            values.append(buffer[cursor : cursor + size])
            cursor += size
        return cursor, self._binary_tuple(values)

    def _binary_tuple(self, values: list[bytes | None]) -> bytes:
        self._row_fields = list(values)
        row = {i: values[i] for i in self._context if i < len(values)}
        for index in self._fields:
            if index < len(values) and values[index] is not None:
                value = values[index]
                assert value is not None
                values[index] = self._transform(index, value, 1, row)
        parts = [_INT16.pack(len(values))]
        for value in values:
            if value is None:
                parts.append(_INT32.pack(-1))
            else:
                parts.append(_INT32.pack(len(value)) + value)
        return b"".join(parts)


def _binary_header_end(buffer: bytes) -> int:
    fixed = len(BINARY_SIGNATURE) + 8
    if len(buffer) < fixed:
        return -1
    if not buffer.startswith(BINARY_SIGNATURE):
        raise ProtocolError("binary COPY data does not start with the PGCOPY signature")
    (extension,) = _INT32.unpack_from(buffer, len(BINARY_SIGNATURE) + 4)
    end = fixed + extension
    return end if len(buffer) >= end else -1


def _unescape_text(field: bytes) -> bytes:
    """Decode the backslash escapes of COPY's text format."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        byte = field[i]
        if byte != 0x5C or i + 1 >= len(field):
            out.append(byte)
            i += 1
            continue
        code = field[i + 1]
        if code in _TEXT_ESCAPES:
            out += _TEXT_ESCAPES[code]
            i += 2
        elif code == ord("x") and i + 2 < len(field) and _is_hex(field[i + 2]):
            digits = field[i + 2 : i + 4] if i + 3 < len(field) and _is_hex(field[i + 3]) else field[i + 2 : i + 3]
            out.append(int(digits, 16))
            i += 2 + len(digits)
        elif 0x30 <= code <= 0x37:
            j = i + 1
            while j < len(field) and j < i + 4 and 0x30 <= field[j] <= 0x37:
                j += 1
            out.append(int(field[i + 1 : j], 8) & 0xFF)
            i = j
        else:
            out.append(code)
            i += 2
    return bytes(out)


def _is_hex(byte: int) -> bool:
    return chr(byte) in "0123456789abcdefABCDEF"


def _escape_text(value: bytes) -> bytes:
    return (
        value.replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


def _split_csv(body: bytes, options: CopyOptions) -> list[bytes]:
    """Split a CSV row into its raw fields, quotes kept."""
    fields = []
    start = 0
    delimiter = options.delimiter[0]
    for index, byte, inside in _csv_bytes(body, 0, options):
        if byte == delimiter and not inside:
            fields.append(body[start:index])
            start = index + 1
    fields.append(body[start:])
    return fields


def _csv_bytes(
    data: bytes, start: int, options: CopyOptions
) -> Iterator[tuple[int, int, bool]]:
    """Yield (index, byte, inside quotes) for the structural bytes of CSV data.

    Escaped characters inside quotes are skipped; a doubled quote toggles
    the state twice, which leaves it unchanged.
    """
    quote = options.quote[0]
    escape = options.escape[0]
    inside = False
    index = start
    while index < len(data):
        byte = data[index]
        if inside and escape != quote and byte == escape:
            index += 2
            continue
        if byte == quote:
            inside = not inside
        yield index, byte, inside
        index += 1


def _unquote_csv(raw: bytes, options: CopyOptions) -> bytes:
    quote = options.quote
    if not raw.startswith(quote):
        return raw
    inner = raw[1:-1]
    return inner.replace(options.escape + quote, quote)


def _quote_csv(value: bytes, options: CopyOptions) -> bytes:
    quote = options.quote
    return quote + value.replace(quote, options.escape + quote) + quote
