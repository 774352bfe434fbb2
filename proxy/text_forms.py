"""Text forms of binary parameters bound for encrypted text columns.

A client may send a parameter in binary format under its own type, as
psycopg 3 does for int, float, Decimal, bool, date, datetime and UUID. Sent
directly, the server casts such a value to the text column's type, which
stores the type's output function's text. The proxy seals that same text,
so the column contains what a plain column would. A type without a converter
here is rejected, so no raw binary form is ever sealed as text.

The text forms follow PostgreSQL 15's output functions: `bool::text`, the
shortest round-trip digits of float4 and float8, numeric at its display
scale, and dates and times in the ISO DateStyle and the session's TimeZone.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

_T = TypeVar("_T")

TEXT_LIKE_OIDS = frozenset({0, 25, 1043, 1042, 19, 705})

_INT2 = struct.Struct("!h")
_INT4 = struct.Struct("!i")
_INT8 = struct.Struct("!q")
_UINT4 = struct.Struct("!I")
_FLOAT4 = struct.Struct("!f")
_FLOAT8 = struct.Struct("!d")
_NUMERIC_HEADER = struct.Struct("!hhHH")
_NUMERIC_SPECIAL = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}
_NUMERIC_NEGATIVE = 0x4000
_EPOCH_DATE = dt.date(2000, 1, 1)
_EPOCH = dt.datetime(2000, 1, 1)
_INT4_LIMITS = {2**31 - 1: "infinity", -(2**31): "-infinity"}
_INT8_LIMITS = {2**63 - 1: "infinity", -(2**63): "-infinity"}

_TYPE_NAMES = {
    16: "bool",
    17: "bytea",
    18: '"char"',
    20: "int8",
    21: "int2",
    23: "int4",
    26: "oid",
    114: "json",
    700: "float4",
    701: "float8",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    1186: "interval",
    1266: "timetz",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}


@dataclass(frozen=True, slots=True)
class TextSettings:
    """The session settings that decide a value's text form, as the server reports them."""

    date_style: str = "ISO, MDY"
    time_zone: str = "UTC"


DEFAULT_SETTINGS = TextSettings()


class UnconvertibleParameter(ValueError):
    """A binary parameter whose text form the proxy cannot produce.

    The message names the type and the reason, never the value.
    """


def type_name(oid: int) -> str:
    return _TYPE_NAMES.get(oid, f"OID {oid}")


def binary_as_text(value: bytes, oid: int, settings: TextSettings) -> bytes:
    """Return the text that the server stores for a binary `oid` value cast to text.

    Raises UnconvertibleParameter for a type or setting without a converter,
    and ValueError for a value that is not a valid binary form of `oid`.
    """
    convert = _CONVERTERS.get(oid)
    if convert is None:
        raise UnconvertibleParameter(
            f"the proxy cannot convert a binary {type_name(oid)} value to text"
        )
    return convert(value, settings).encode()


def _unpack(reader: struct.Struct, value: bytes) -> Any:
    if len(value) != reader.size:
        raise ValueError(f"binary value of {len(value)} bytes, expected {reader.size}")
    return reader.unpack(value)[0]


def _integer(reader: struct.Struct) -> Callable[[bytes, TextSettings], str]:
    return lambda value, settings: str(_unpack(reader, value))


def _bool(value: bytes, settings: TextSettings) -> str:
    if value not in (b"\x00", b"\x01"):
        raise ValueError("binary bool must be one byte, 0 or 1")
    return "true" if value == b"\x01" else "false"


def _bytea(value: bytes, settings: TextSettings) -> str:
    # NOTE: this is bytea_output = hex, the default. The server does not
    # report bytea_output, so a session that sets it to escape differs.
    return "\\x" + value.hex()


def _float(number: float, max_fixed_exponent: int) -> str:
    """Render `number` as float4out or float8out do with extra_float_digits >= 1.

    `number` must already be the shortest round-trip decimal of the value.
    Exponents below -4 or from `max_fixed_exponent` on use the e notation.
    """
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number == 0:
        return "-0" if str(number).startswith("-") else "0"
    sign, digits, exponent = Decimal(repr(number)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    assert isinstance(exponent, int)
    point = len(digits) + exponent - 1
    minus = "-" if sign else ""
    if point < -4 or point >= max_fixed_exponent:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{minus}{mantissa}e{'-' if point < 0 else '+'}{abs(point):02d}"
    if point < 0:
        return f"{minus}0.{'0' * (-point - 1)}{text}"
    whole = text[: point + 1].ljust(point + 1, "0")
    fraction = text[point + 1 :]
    return f"{minus}{whole}.{fraction}" if fraction else f"{minus}{whole}"


def _float4(value: bytes, settings: TextSettings) -> str:
    number = _unpack(_FLOAT4, value)
    if math.isfinite(number):
        # The shortest decimal that reads back as the same float4.
        for precision in range(1, 10):
            candidate = float(f"{number:.{precision}g}")
            if _FLOAT4.unpack(_FLOAT4.pack(candidate))[0] == number:
                number = candidate
                break
    return _float(number, 6)


def _float8(value: bytes, settings: TextSettings) -> str:
    return _float(_unpack(_FLOAT8, value), 15)


def _numeric(value: bytes, settings: TextSettings) -> str:
    count, weight, sign, scale = _NUMERIC_HEADER.unpack_from(value)
    if sign in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[sign]
    if len(value) != _NUMERIC_HEADER.size + 2 * count:
        raise ValueError("binary numeric of unexpected size")
    digits = struct.unpack_from(f"!{count}H", value, _NUMERIC_HEADER.size)
    if any(digit > 9999 for digit in digits):
        raise ValueError("binary numeric digit out of range")
    # Base-10000 digits: the first one is at 10000**weight.
    number = Decimal(0)
    for index, digit in enumerate(digits):
        number += Decimal(digit).scaleb(4 * (weight - index))
    text = f"{number.quantize(Decimal(1).scaleb(-scale)):f}" if scale else f"{number:f}"
    if not scale:
        text = text.partition(".")[0]
    minus = "-" if sign == _NUMERIC_NEGATIVE and number != 0 else ""
    return minus + text


def _require_iso(settings: TextSettings, name: str) -> None:
    if settings.date_style.split(",")[0].strip().upper() != "ISO":
        raise UnconvertibleParameter(
            f"the proxy converts a binary {name} value to text only under "
            f"DateStyle ISO, and this session's DateStyle is {settings.date_style}"
        )


def _date(value: bytes, settings: TextSettings) -> str:
    _require_iso(settings, "date")
    days = _unpack(_INT4, value)
    if days in _INT4_LIMITS:
        return _INT4_LIMITS[days]
    return _in_range(lambda: _EPOCH_DATE + dt.timedelta(days=days), "date").isoformat()


def _fraction(micros: int) -> str:
    return f".{micros:06d}".rstrip("0") if micros else ""


def _time(value: bytes, settings: TextSettings) -> str:
    micros = _unpack(_INT8, value)
    if not 0 <= micros <= 86_400_000_000:
        raise ValueError("binary time out of range")
    seconds, fraction = divmod(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}{_fraction(fraction)}"


def _timestamp(value: bytes, settings: TextSettings) -> str:
    _require_iso(settings, "timestamp")
    micros = _unpack(_INT8, value)
    if micros in _INT8_LIMITS:
        return _INT8_LIMITS[micros]
    moment = _in_range(lambda: _EPOCH + dt.timedelta(microseconds=micros), "timestamp")
    return moment.strftime("%Y-%m-%d %H:%M:%S") + _fraction(moment.microsecond)


def _timestamptz(value: bytes, settings: TextSettings) -> str:
    _require_iso(settings, "timestamptz")
    micros = _unpack(_INT8, value)
    if micros in _INT8_LIMITS:
        return _INT8_LIMITS[micros]
    try:
        zone = zoneinfo.ZoneInfo(settings.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UnconvertibleParameter(
            "the proxy cannot convert a binary timestamptz value to text in "
            f"time zone {settings.time_zone}, which its zone database lacks"
        ) from None
    utc = _EPOCH.replace(tzinfo=dt.UTC)
    moment = _in_range(
        lambda: (utc + dt.timedelta(microseconds=micros)).astimezone(zone), "timestamptz"
    )
    text = moment.strftime("%Y-%m-%d %H:%M:%S") + _fraction(moment.microsecond)
    return text + _utc_offset(moment.utcoffset() or dt.timedelta())


def _utc_offset(offset: dt.timedelta) -> str:
    """Render an offset as timestamptz output does: +HH, +HH:MM or +HH:MM:SS."""
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{sign}{hours:02d}"
    if minutes or seconds:
        text += f":{minutes:02d}"
    if seconds:
        text += f":{seconds:02d}"
    return text


def _in_range(build: Callable[[], _T], name: str) -> _T:
    try:
        return build()
    except OverflowError:
        raise UnconvertibleParameter(
            f"the proxy converts binary {name} values to text only for years 1 to 9999"
        ) from None


def _uuid(value: bytes, settings: TextSettings) -> str:
    if len(value) != 16:
        raise ValueError("binary uuid must be 16 bytes")
    return str(uuid.UUID(bytes=value))


def _json(value: bytes, settings: TextSettings) -> str:
    text = value.decode("utf-8")
    json.loads(text)
    return text


class _JsonObject(list[tuple[str, Any]]):
    """The key-value pairs of a JSON object, in input order."""


def _jsonb(value: bytes, settings: TextSettings) -> str:
    if value[:1] != b"\x01":
        raise ValueError("unsupported binary jsonb version")
    parsed = json.loads(
        value[1:].decode("utf-8"),
        object_pairs_hook=_JsonObject,
        parse_float=Decimal,
        parse_int=Decimal,
        parse_constant=_reject_constant,
    )
    return _render_jsonb(parsed)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _render_jsonb(node: Any) -> str:
    """Render parsed JSON as jsonb_out does.

    Object keys are unique, the last one winning, and sorted shorter first,
    then by their UTF-8 bytes. Numbers keep their numeric display scale.
    """
    if isinstance(node, _JsonObject):
        unique = dict(node)
        keys = sorted(unique, key=lambda key: (len(key.encode()), key.encode()))
        items = (f"{_json_string(k)}: {_render_jsonb(unique[k])}" for k in keys)
        return "{" + ", ".join(items) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(_render_jsonb(item) for item in node) + "]"
    if isinstance(node, Decimal):
        text = f"{node:f}"
        return "0" if node == 0 and text.startswith("-") else text
    if isinstance(node, str):
        return _json_string(node)
    return json.dumps(node)


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_CONVERTERS: dict[int, Callable[[bytes, TextSettings], str]] = {
    16: _bool,
    17: _bytea,
    20: _integer(_INT8),
    21: _integer(_INT2),
    23: _integer(_INT4),
    26: _integer(_UINT4),
    114: _json,
    700: _float4,
    701: _float8,
    1082: _date,
    1083: _time,
    1114: _timestamp,
    1184: _timestamptz,
    1700: _numeric,
    2950: _uuid,
    3802: _jsonb,
}
