"""Logical types: what an application sees of a column stored as text or bytea.

An encrypted column is stored as text or bytea, but a rule may give it the
type the application works with, such as int4 or date. Values are sealed in
one canonical text form per type, so deterministic equality holds however the
client wrote the value, and are converted to the client's text or binary
format on the way out. RowDescription and ParameterDescription carry the
logical type's OID, so drivers decode and encode it as usual.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from proxy.text_forms import (
    DEFAULT_SETTINGS,
    TEXT_LIKE_OIDS,
    TextSettings,
    binary_as_text,
)

_EPOCH_DATE = dt.date(2000, 1, 1)
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
_INT2 = struct.Struct("!h")
_INT4 = struct.Struct("!i")
_INT8 = struct.Struct("!q")
_NUMERIC_HEADER = struct.Struct("!hhHH")
_NUMERIC_NEGATIVE = 0x4000
_NUMERIC_NAN = 0xC000

TEXT_FORMAT = 0
BINARY_FORMAT = 1


@dataclass(frozen=True, slots=True)
class LogicalType:
    name: str
    oid: int
    size: int

    def from_wire(
        self,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes:
        """Return the canonical plaintext of a value the client sent.

        `declared_oid` is the type the client named in Parse, which decides
        how a binary value is read (a driver may send an int2 for an int4).
        A binary value of another type bound for text becomes the text the
        server would store for it, in the session's `settings`.
        Raises ValueError on input the server would reject, and
        UnconvertibleParameter for a binary type the proxy cannot read.
        """
        if fmt == BINARY_FORMAT and self.name in ("text", "varchar"):
            if declared_oid in TEXT_LIKE_OIDS:
                return value
            return binary_as_text(value, declared_oid, settings)
        if fmt == BINARY_FORMAT:
            return _DECODE_BINARY[self.name](value, declared_oid or self.oid)
        return canonical_text(self.name, value)

    def to_wire(self, plaintext: bytes, fmt: int) -> bytes:
        """Return an opened plaintext in the format the client asked for."""
        if fmt == BINARY_FORMAT:
            return _ENCODE_BINARY[self.name](plaintext)
        if self.name == "bytea":
            return b"\\x" + plaintext.hex().encode()
        return plaintext


TYPES = {
    t.name: t
    for t in (
        LogicalType("text", 25, -1),
        LogicalType("varchar", 1043, -1),
        LogicalType("bytea", 17, -1),
        LogicalType("int4", 23, 4),
        LogicalType("int8", 20, 8),
        LogicalType("numeric", 1700, -1),
        LogicalType("date", 1082, 4),
        LogicalType("timestamptz", 1184, 8),
        LogicalType("uuid", 2950, 16),
        LogicalType("jsonb", 3802, -1),
    )
}


def canonical_text(name: str, value: bytes) -> bytes:
    """Return the one text form sealed for `value` of logical type `name`."""
    if name in ("text", "varchar"):
        return value
    if name == "bytea":
        return _bytea_from_text(value)
    text = value.decode("utf-8").strip()
    return _CANONICAL[name](text).encode()


def _int_text(bits: int) -> Callable[[str], str]:
    def canonical(text: str) -> str:
        number = int(text)
        if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
            raise ValueError(f"value out of range for a {bits}-bit integer")
        return str(number)

    return canonical


def _numeric_text(text: str) -> str:
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError("invalid numeric input") from None
    if number.is_nan():
        return "NaN"
    if number.is_infinite():
        raise ValueError("infinite numeric values cannot be sealed")
    # NOTE: trailing zeros are dropped, so 1.50 reads back as 1.5; equal
    # numbers then seal alike on deterministic columns.
    normal = number.normalize()
    return f"{normal:f}" if normal != 0 else "0"


def _date_text(text: str) -> str:
    return dt.date.fromisoformat(text).isoformat()


def _timestamptz_text(text: str) -> str:
    moment = dt.datetime.fromisoformat(text.replace(" ", "T", 1))
    if moment.tzinfo is None:
        raise ValueError("timestamptz input needs a time zone offset")
    return _render_timestamptz(moment)


def _render_timestamptz(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


def _jsonb_text(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(", ", ": "))


_CANONICAL: dict[str, Callable[[str], str]] = {
    "int4": _int_text(32),
    "int8": _int_text(64),
    "numeric": _numeric_text,
    "date": _date_text,
    "timestamptz": _timestamptz_text,
    "uuid": lambda text: str(uuid.UUID(text)),
    "jsonb": _jsonb_text,
}


def _bytea_from_text(value: bytes) -> bytes:
    from proxy.planner import decode_bytea_text

    return decode_bytea_text(value)


# Binary input, by the OID the client declared.

def _decode_int(value: bytes, declared_oid: int) -> bytes:
    reader = {21: _INT2, 23: _INT4, 20: _INT8}.get(declared_oid)
    if reader is None or len(value) != reader.size:
        raise ValueError("binary integer of unexpected size")
    return str(reader.unpack(value)[0]).encode()


def _decode_int_checked(bits: int) -> Callable[[bytes, int], bytes]:
    check = _int_text(bits)

    def decode(value: bytes, declared_oid: int) -> bytes:
        return check(_decode_int(value, declared_oid).decode()).encode()

    return decode


def _decode_numeric(value: bytes, declared_oid: int) -> bytes:
    if declared_oid in (20, 21, 23):
        return _decode_int(value, declared_oid)
    count, weight, sign, _scale = _NUMERIC_HEADER.unpack_from(value)
    if sign == _NUMERIC_NAN:
        return b"NaN"
    digits = struct.unpack_from(f"!{count}H", value, _NUMERIC_HEADER.size)
    number = Decimal(0)
    for index, digit in enumerate(digits):
        number += Decimal(digit).scaleb(4 * (weight - index))
    if sign == _NUMERIC_NEGATIVE:
        number = -number
    return _numeric_text(str(number)).encode()


def _encode_numeric(plaintext: bytes) -> bytes:
    number = Decimal(plaintext.decode())
    if number.is_nan():
        return _NUMERIC_HEADER.pack(0, 0, _NUMERIC_NAN, 0)
    scale = max(0, -int(number.as_tuple().exponent))
    integer, _, fraction = f"{abs(number):f}".partition(".")
    # Base-10000 digits: the integer part grouped from the decimal point
    # leftwards, the fraction part from the decimal point rightwards.
    integer = integer.lstrip("0")
    integer = "0" * (-len(integer) % 4) + integer
    fraction = fraction + "0" * (-len(fraction) % 4)
    groups = [int(integer[i : i + 4]) for i in range(0, len(integer), 4)]
    weight = len(groups) - 1
    groups += [int(fraction[i : i + 4]) for i in range(0, len(fraction), 4)]
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight = 0
    sign = _NUMERIC_NEGATIVE if number < 0 else 0
    header = _NUMERIC_HEADER.pack(len(groups), weight, sign, scale)
    return header + struct.pack(f"!{len(groups)}H", *groups)


def _decode_date(value: bytes, declared_oid: int) -> bytes:
    (days,) = _INT4.unpack(value)
    return (_EPOCH_DATE + dt.timedelta(days=days)).isoformat().encode()


def _decode_timestamptz(value: bytes, declared_oid: int) -> bytes:
    (micros,) = _INT8.unpack(value)
    return _render_timestamptz(_EPOCH + dt.timedelta(microseconds=micros)).encode()


def _encode_timestamptz(plaintext: bytes) -> bytes:
    moment = dt.datetime.fromisoformat(plaintext.decode().replace(" ", "T", 1))
    delta = moment - _EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return _INT8.pack(micros)


def _decode_uuid(value: bytes, declared_oid: int) -> bytes:
    return str(uuid.UUID(bytes=value)).encode()


def _decode_jsonb(value: bytes, declared_oid: int) -> bytes:
    text = value[1:] if declared_oid == 3802 and value[:1] == b"\x01" else value
    return _jsonb_text(text.decode()).encode()


_DECODE_BINARY: dict[str, Callable[[bytes, int], bytes]] = {
    "text": lambda value, oid: value,
    "varchar": lambda value, oid: value,
    "bytea": lambda value, oid: value,
    "int4": _decode_int_checked(32),
    "int8": _decode_int_checked(64),
    "numeric": _decode_numeric,
    "date": _decode_date,
    "timestamptz": _decode_timestamptz,
    "uuid": _decode_uuid,
    "jsonb": _decode_jsonb,
}

_ENCODE_BINARY: dict[str, Callable[[bytes], bytes]] = {
    "text": lambda plaintext: plaintext,
    "varchar": lambda plaintext: plaintext,
    "bytea": lambda plaintext: plaintext,
    "int4": lambda plaintext: _INT4.pack(int(plaintext)),
    "int8": lambda plaintext: _INT8.pack(int(plaintext)),
    "numeric": _encode_numeric,
    "date": lambda plaintext: _INT4.pack(
        (dt.date.fromisoformat(plaintext.decode()) - _EPOCH_DATE).days
    ),
    "timestamptz": _encode_timestamptz,
    "uuid": lambda plaintext: uuid.UUID(plaintext.decode()).bytes,
    "jsonb": lambda plaintext: b"\x01" + plaintext,
}
