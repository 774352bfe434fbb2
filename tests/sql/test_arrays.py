"""Array parameter codecs used to seal `col = ANY($1)`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sql.arrays import (
    binary_element_type,
    build_array,
    flat_map_binary_array,
    flat_map_text_array,
    map_binary_array,
    map_text_array,
    parse_text_array,
    storage_array_type,
)


def _binary_array(elements: list[bytes | None]) -> bytes:
    parts = [struct.pack("!iiI", 1, int(None in elements), 25), struct.pack("!ii", len(elements), 1)]
    for element in elements:
        parts.append(struct.pack("!i", -1) if element is None else struct.pack("!i", len(element)) + element)
    return b"".join(parts)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (b"{}", []),
        (b"{a,b}", [b"a", b"b"]),
        (b'{"a,b","c\\"d",NULL,"NULL"}', [b"a,b", b'c"d', None, b"NULL"]),
        (b"{ spaced , x }", [b"spaced", b"x"]),
        (b"[1:2]={a,b}", [b"a", b"b"]),
    ],
)
def test_parse_text_array(literal: bytes, expected: list[bytes | None]) -> None:
    assert parse_text_array(literal) == expected


@pytest.mark.parametrize("literal", [b"a,b", b"{{a},{b}}"])
def test_parse_text_array_invalid(literal: bytes) -> None:
    with pytest.raises(ValueError):
        parse_text_array(literal)


elements = st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=8)


@given(elements)
def test_text_array_round_trip(values: list[bytes | None]) -> None:
    text_values = [None if v is None else v.hex().encode() for v in values]
    rendered = map_text_array(
        b"{" + b",".join(b"NULL" if v is None else b'"' + v + b'"' for v in text_values) + b"}",
        lambda v: v.upper(),
    )
    assert parse_text_array(rendered) == [None if v is None else v.upper() for v in text_values]


@given(elements)
def test_binary_array_round_trip(values: list[bytes | None]) -> None:
    mapped = map_binary_array(_binary_array(values), lambda v: b"<" + v + b">")
    assert mapped == _binary_array([None if v is None else b"<" + v + b">" for v in values])


def test_flat_map_text_array_keeps_null() -> None:
    value = flat_map_text_array(b'{a,NULL,"b c"}', lambda v: [v + b"1", v + b"2"])
    assert parse_text_array(value) == [b"a1", b"a2", None, b"b c1", b"b c2"]


def test_flat_map_binary_array_counts_elements() -> None:
    original = build_array([b"a", b"bc"], 25, 1)
    value = flat_map_binary_array(original, lambda v: [v, v.upper()])
    expected = build_array([b"a", b"A", b"bc", b"BC"], 25, 1)
    assert value == expected


def test_build_array_text_escapes() -> None:
    assert build_array([b'a"b', b"c\\d"], 25, 0) == b'{"a\\"b","c\\\\d"}'
    assert parse_text_array(build_array([b'a"b', b"c\\d"], 25, 0)) == [b'a"b', b"c\\d"]


def test_flat_map_binary_array_replaces_element_type() -> None:
    original = build_array([b"\x00\x05"], 23, 1)
    value = flat_map_binary_array(original, lambda v: [b"x", b"y"], element_type=17)
    assert binary_element_type(value) == 17
    assert value == build_array([b"x", b"y"], 17, 1)


def test_flat_map_binary_empty_array_replaces_element_type() -> None:
    original = build_array([], 23, 1)
    value = flat_map_binary_array(original, lambda v: [v], element_type=17)
    assert binary_element_type(value) == 17


def test_binary_array_element_type_replaced() -> None:
    value = _binary_array([b"\x00\x05", None])
    sealed = map_binary_array(value, lambda v: b"sealed", element_type=17)

    assert binary_element_type(value) == 25
    assert binary_element_type(sealed) == 17
    assert sealed == struct.pack("!iiI", 1, 1, 17) + value[12:20] + (
        struct.pack("!i", 6) + b"sealed" + struct.pack("!i", -1)
    )


@pytest.mark.parametrize(
    ("declared", "storage", "expected"),
    [
        (0, 25, 0),
        (1009, 25, 1009),
        (1015, 25, 1015),
        (1007, 25, 1009),
        (1009, 17, 1001),
        (1001, 17, 1001),
    ],
)
def test_storage_array_type(declared: int, storage: int, expected: int) -> None:
    assert storage_array_type(declared, storage) == expected
