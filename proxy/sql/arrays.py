"""One-dimensional array values, for `col = ANY($1)` on deterministic columns.

Each element of the array parameter is sealed like a single value, so the
server compares ciphertext with ciphertext. Text arrays arrive as `{a,"b c"}`
in text format, or in the binary array layout: dimensions, flags, element
type, then each element with its length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

_HEADER = struct.Struct("!iiI")
_DIMENSION = struct.Struct("!ii")
_INT32 = struct.Struct("!i")

Transform = Callable[[bytes], bytes]
FlatTransform = Callable[[bytes], list[bytes]]

# Element types whose values are text on the wire: text, varchar, bpchar, name.
TEXT_LIKE_OIDS = frozenset({25, 1043, 1042, 19})
# Their array types: text[], varchar[], bpchar[], name[].
_TEXT_LIKE_ARRAY_OIDS = frozenset({1009, 1015, 1014, 1003})
# The array type of each storage type: text[] for text, bytea[] for bytea.
STORAGE_ARRAY_OIDS = {25: 1009, 17: 1001}


def storage_array_type(declared_oid: int, storage_oid: int) -> int:
    """Return the array type to declare to the server for an array of sealed values.

    A declared type that already fits the stored form is kept, and so is
    0, which leaves the server to infer the type.
    """
    storage_array = STORAGE_ARRAY_OIDS[storage_oid]
    if declared_oid in (0, storage_array):
        return declared_oid
    if storage_oid == 25 and declared_oid in _TEXT_LIKE_ARRAY_OIDS:
        return declared_oid
    return storage_array


def map_text_array(value: bytes, transform: Transform) -> bytes:
    """Apply `transform` to every non-NULL element of a text-format array."""
    elements = parse_text_array(value)
    rendered = []
    for element in elements:
        if element is None:
            rendered.append(b"NULL")
        else:
            sealed = transform(element)
            rendered.append(b'"' + sealed.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
    return b"{" + b",".join(rendered) + b"}"


def flat_map_text_array(value: bytes, transform: FlatTransform) -> bytes:
    """Replace each non-NULL element of a text array by `transform`'s elements."""
    elements: list[bytes | None] = []
    for element in parse_text_array(value):
        if element is None:
            elements.append(None)
        else:
            elements.extend(transform(element))
    return _render_text_array(elements)


def build_array(elements: Sequence[bytes], element_oid: int, fmt: int) -> bytes:
    """Build a one-dimensional array value in text (0) or binary (1) format."""
    if fmt == 0:
        return _render_text_array(elements)
    parts = [_HEADER.pack(1, 0, element_oid), _DIMENSION.pack(len(elements), 1)]
    for element in elements:
        parts.append(_INT32.pack(len(element)) + element)
    return b"".join(parts)


def _render_text_array(elements: Sequence[bytes | None]) -> bytes:
    rendered = []
    for element in elements:
        if element is None:
            rendered.append(b"NULL")
        else:
            escaped = element.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            rendered.append(b'"' + escaped + b'"')
    return b"{" + b",".join(rendered) + b"}"


def parse_text_array(value: bytes) -> list[bytes | None]:
    """Parse a one-dimensional array literal such as `{a,"b,c",NULL}`."""
    text = value.strip()
    if text[:1] == b"[":
        text = text[text.index(b"=") + 1 :].strip()
    if text[:1] != b"{" or text[-1:] != b"}":
        raise ValueError("array value must be enclosed in braces")
    body = text[1:-1]
    elements: list[bytes | None] = []
    if not body.strip():
        return elements
    i = 0
    while i <= len(body):
        element, i, quoted = _next_element(body, i)
        if not quoted and element.strip().upper() == b"NULL":
            elements.append(None)
        else:
            elements.append(element if quoted else element.strip())
        if i >= len(body):
            break
        i += 1
    return elements


def _next_element(body: bytes, i: int) -> tuple[bytes, int, bool]:
    """Return one element, the index of the comma after it, and whether it was quoted."""
    while i < len(body) and body[i : i + 1].isspace():
        i += 1
    if body[i : i + 1] == b"{":
        raise ValueError("only one-dimensional arrays can be sealed")
    out = bytearray()
    quoted = body[i : i + 1] == b'"'
    if quoted:
        i += 1
        while i < len(body) and body[i] != 0x22:
            if body[i] == 0x5C:
                i += 1
            out.append(body[i])
            i += 1
        i += 1
        while i < len(body) and body[i] != 0x2C:
            i += 1
        return bytes(out), i, True
    while i < len(body) and body[i] != 0x2C:
        if body[i] == 0x5C:
            i += 1
        out.append(body[i])
        i += 1
    return bytes(out), i, False


def binary_element_type(value: bytes) -> int:
    """Return the element type OID in the header of a binary-format array."""
    _, _, element_type = _HEADER.unpack_from(value, 0)
    return int(element_type)


def map_binary_array(
    value: bytes, transform: Transform, element_type: int | None = None
) -> bytes:
    """Apply `transform` to every non-NULL element of a binary-format array.

    `element_type`, when given, replaces the element type OID of the header.
    """
    dimensions, flags, old_type = _HEADER.unpack_from(value, 0)
    if dimensions > 1:
        raise ValueError("only one-dimensional arrays can be sealed")
    if element_type is None:
        element_type = old_type
    pos = _HEADER.size
    parts = [_HEADER.pack(dimensions, flags, element_type)]
    count = 0
    if dimensions == 1:
        count, _ = _DIMENSION.unpack_from(value, pos)
        parts.append(value[pos : pos + _DIMENSION.size])
        pos += _DIMENSION.size
    for _ in range(count):
        (size,) = _INT32.unpack_from(value, pos)
        pos += 4
        if size < 0:
            parts.append(_INT32.pack(-1))
            continue
        sealed = transform(value[pos : pos + size])
        pos += size
        parts.append(_INT32.pack(len(sealed)) + sealed)
    return b"".join(parts)


def flat_map_binary_array(
    value: bytes, transform: FlatTransform, element_type: int | None = None
) -> bytes:
    """Replace each non-NULL element of a binary array by `transform`'s elements.

    `element_type`, when given, replaces the element type OID of the header.
    """
    dimensions, flags, old_type = _HEADER.unpack_from(value, 0)
    if dimensions > 1:
        raise ValueError("only one-dimensional arrays can be sealed")
    if element_type is None:
        element_type = old_type
    pos = _HEADER.size
    count, lower = 0, 1
    if dimensions == 1:
        count, lower = _DIMENSION.unpack_from(value, pos)
        pos += _DIMENSION.size
    parts = []
    for _ in range(count):
        (size,) = _INT32.unpack_from(value, pos)
        pos += 4
        if size < 0:
            parts.append(_INT32.pack(-1))
            continue
        for sealed in transform(value[pos : pos + size]):
            parts.append(_INT32.pack(len(sealed)) + sealed)
        pos += size
    if not parts:
        return _HEADER.pack(dimensions, flags, element_type) + value[_HEADER.size : pos]
    header = _HEADER.pack(1, flags, element_type) + _DIMENSION.pack(len(parts), lower)
    return header + b"".join(parts)
