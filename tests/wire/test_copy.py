"""CopyStream: rows rewritten the same however the stream is split."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ProtocolError
from proxy.wire.copy import BINARY_SIGNATURE, CopyOptions, CopyStream


def _mark(index: int, value: bytes, fmt: int, row: object = None) -> bytes | None:
    return b"<" + value + b">"


def _run(options: CopyOptions, data: bytes, cuts: list[int]) -> bytes:
    stream = CopyStream(options, {1}, _mark)
    out = []
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out.append(stream.feed(data[start:cut]))
        start = cut
    out.append(stream.finish())
    return b"".join(out)


def test_text_row_rewritten() -> None:
    out = _run(CopyOptions(), b"1\ta\\tb\t\\N\n2\t\\N\tz\n", [])
    assert out == b"1\t<a\\tb>\t\\N\n2\t\\N\tz\n"


def test_text_end_marker_kept() -> None:
    assert _run(CopyOptions(), b"1\tx\n\\.\n", []) == b"1\t<x>\n\\.\n"


def test_csv_quotes_and_header() -> None:
    options = CopyOptions.from_options({"format": "csv", "header": True})
    data = b'id,token\n1,"a,""b""\nc"\n2,\n3,""\n'
    out = _run(options, data, [])
    assert out == b'id,token\n1,"<a,""b""\nc>"\n2,\n3,"<>"\n'


def test_csv_custom_escape() -> None:
    options = CopyOptions.from_options({"format": "csv", "escape": "\\"})
    out = _run(options, b'1,"x\\"y"\n', [])
    assert out == b'1,"<x\\"y>"\n'


def _binary(rows: list[list[bytes | None]]) -> bytes:
    parts = [BINARY_SIGNATURE, struct.pack("!ii", 0, 0)]
    for row in rows:
        parts.append(struct.pack("!h", len(row)))
        for value in row:
            parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    parts.append(struct.pack("!h", -1))
    return b"".join(parts)


def test_binary_rows() -> None:
    options = CopyOptions.from_options({"format": "binary"})
    data = _binary([[b"1", b"tok"], [b"2", None]])
    assert _run(options, data, []) == _binary([[b"1", b"<tok>"], [b"2", None]])


def test_binary_bad_signature() -> None:
    stream = CopyStream(CopyOptions.from_options({"format": "binary"}), {0}, _mark)
    with pytest.raises(ProtocolError):
        stream.feed(b"NOT-A-COPY-HEADER-AT-ALL")


tokens = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@given(st.lists(tokens, min_size=1, max_size=5), st.lists(st.integers(0, 400), max_size=6))
def test_csv_split_anywhere(values: list[str], cuts: list[int]) -> None:
    options = CopyOptions.from_options({"format": "csv"})
    data = b"".join(
        b'%d,"%s"\n' % (i, v.encode().replace(b'"', b'""')) for i, v in enumerate(values)
    )
    assert _run(options, data, cuts) == _run(options, data, [])


@given(
    st.lists(st.lists(st.one_of(st.none(), st.binary(max_size=8)), min_size=2, max_size=2), max_size=4),
    st.lists(st.integers(0, 300), max_size=6),
)
def test_binary_split_anywhere(rows: list[list[bytes | None]], cuts: list[int]) -> None:
    options = CopyOptions.from_options({"format": "binary"})
    data = _binary(rows)
    assert _run(options, data, cuts) == _run(options, data, [])


class _Pause(Exception):
    """Raised by a transform that cannot handle a row yet."""


def test_failed_feed_leaves_stream_unchanged() -> None:
    ready = False

    def transform(index: int, value: bytes, fmt: int, row: object) -> bytes | None:
        if value == b"late" and not ready:
            raise _Pause()
        return b"<" + value + b">"

    options = CopyOptions.from_options({"format": "csv", "header": True})
    stream = CopyStream(options, {1}, transform)
    assert stream.feed(b"id,body\n1,ea") == b"id,body\n"
    data = b"rly\n2,late\n3,last"
    with pytest.raises(_Pause):
        stream.feed(data)
    ready = True
    assert stream.feed(data) == b'1,"<early>"\n2,"<late>"\n'
    assert stream.finish() == b'3,"<last>"'


@pytest.mark.parametrize(
    ("options", "row", "expected"),
    [
        (CopyOptions(), b"7\\t1\tbody\n", b"7\t1"),
        (CopyOptions.from_options({"format": "csv"}), b'"7,1",body\n', b"7,1"),
        (CopyOptions(), b"\\N\tbody\n", None),
    ],
    ids=["text", "csv", "null"],
)
def test_row_value_reads_other_field(
    options: CopyOptions, row: bytes, expected: bytes | None
) -> None:
    seen: list[bytes | None] = []

    def transform(index: int, value: bytes, fmt: int, row: object) -> bytes | None:
        seen.append(stream.row_value(0))
        return value

    stream = CopyStream(options, {1}, transform)
    stream.feed(row)
    assert seen == [expected]
