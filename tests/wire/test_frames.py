"""FrameReader: whole messages out of a byte stream split at any point."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import MessageTooLarge, ProtocolError
from proxy.wire.frames import Frame, FrameReader, build


def _stream() -> list[bytes]:
    return [
        build(b"P", b"\0SELECT 1\0\0\0"),
        build(b"B", b"\0\0" + b"\0\0" * 3),
        build(b"S", b""),
        build(b"D", b"x" * 1000),
    ]


def _feed_all(reader: FrameReader, chunks: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(reader.feed(chunk))
    return frames


def test_feed_whole_message() -> None:
    message = build(b"Q", b"SELECT 1\0")
    frames = FrameReader().feed(message)
    assert frames == [Frame(ord("Q"), message)]
    assert bytes(frames[0].payload) == b"SELECT 1\0"


def test_feed_one_byte_at_a_time() -> None:
    messages = _stream()
    data = b"".join(messages)
    frames = _feed_all(FrameReader(), [data[i : i + 1] for i in range(len(data))])
    assert [frame.raw for frame in frames] == messages
    assert [frame.type for frame in frames] == [ord(m[:1]) for m in messages]


def test_feed_many_messages_in_one_read() -> None:
    messages = _stream() * 50
    frames = FrameReader().feed(b"".join(messages))
    assert [frame.raw for frame in frames] == messages


def test_feed_split_inside_header() -> None:
    message = build(b"D", b"payload")
    reader = FrameReader()
    assert reader.feed(message[:3]) == []
    assert reader.feed(message[3:6]) == []
    assert reader.feed(message[6:]) == [Frame(ord("D"), message)]


def test_feed_message_and_partial_next() -> None:
    first, second = build(b"C", b"SELECT 1\0"), build(b"Z", b"I")
    reader = FrameReader()
    assert reader.feed(first + second[:2]) == [Frame(ord("C"), first)]
    assert reader.feed(second[2:]) == [Frame(ord("Z"), second)]


def test_feed_empty_read() -> None:
    reader = FrameReader()
    assert reader.feed(b"") == []
    assert reader.feed(b"S\0") == []
    assert reader.feed(b"") == []
    assert reader.feed(b"\0\0\4") == [Frame(ord("S"), b"S\0\0\0\4")]


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_rejected(length: int) -> None:
    with pytest.raises(ProtocolError, match="invalid message length"):
        FrameReader().feed(b"Q" + struct.pack("!I", length) + b"x" * 8)


def test_length_below_four_rejected_when_split() -> None:
    reader = FrameReader()
    assert reader.feed(b"Q\0\0") == []
    with pytest.raises(ProtocolError, match="invalid message length"):
        reader.feed(b"\0\2")


def test_over_max_message_rejected_from_header() -> None:
    reader = FrameReader(max_message=1024)
    # Only the header has arrived: the reader must not wait for the body.
    with pytest.raises(ProtocolError, match="exceeds the maximum message size"):
        reader.feed(b"D" + struct.pack("!I", 1024))


def test_message_at_max_size_accepted() -> None:
    message = build(b"D", b"x" * (1024 - 5))
    assert FrameReader(max_message=1024).feed(message) == [Frame(ord("D"), message)]


def test_over_max_message_names_source() -> None:
    reader = FrameReader(max_message=1024, source="server")
    with pytest.raises(MessageTooLarge) as failure:
        reader.feed(b"D" + struct.pack("!I", 2000) + b"x" * 100)
    assert failure.value.size == 2001
    assert failure.value.limit == 1024
    assert "from the server" in str(failure.value)


def test_over_max_message_after_whole_ones() -> None:
    reader = FrameReader(max_message=1024)
    with pytest.raises(MessageTooLarge):
        reader.feed(build(b"Z", b"I") + b"D" + struct.pack("!I", 1024))


def test_pending_bytes_counts_partial_message() -> None:
    message = build(b"D", b"x" * 100)
    reader = FrameReader()
    assert reader.pending_bytes == 0
    reader.feed(message[:3])
    assert reader.pending_bytes == 3
    reader.feed(message[3:50])
    assert reader.pending_bytes == 50
    reader.feed(message[50:] + message[:10])
    assert reader.pending_bytes == 10


_messages = st.lists(
    st.builds(
        build,
        st.sampled_from([b"P", b"B", b"E", b"S", b"D", b"T", b"Z", b"d"]),
        st.binary(max_size=300),
    ),
    min_size=1,
    max_size=20,
)


@given(_messages, st.lists(st.integers(min_value=0, max_value=6000), max_size=30))
def test_any_split_gives_same_frames(messages: list[bytes], cuts: list[int]) -> None:
    data = b"".join(messages)
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    chunks = [data[start:end] for start, end in itertools.pairwise(points)]
    frames = _feed_all(FrameReader(), chunks)
    assert [frame.raw for frame in frames] == messages
    assert [frame.type for frame in frames] == [m[0] for m in messages]


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def _scan_all(reader: FrameReader, chunks: list[bytes]) -> None:
    for chunk in chunks:
        reader.scan(chunk)


@given(_messages, st.lists(st.integers(min_value=0, max_value=6000), max_size=30))
def test_scan_accepts_any_split(messages: list[bytes], cuts: list[int]) -> None:
    reader = FrameReader(max_message=400)
    _scan_all(reader, _chunks(b"".join(messages), cuts))


@given(
    _messages,
    st.integers(min_value=0, max_value=20),
    st.lists(st.integers(min_value=0, max_value=6000), max_size=30),
)
def test_scan_finds_oversized_message_at_any_split(
    messages: list[bytes], position: int, cuts: list[int]
) -> None:
    oversized = build(b"D", b"x" * 500)
    messages.insert(position % (len(messages) + 1), oversized)
    reader = FrameReader(max_message=400, source="server")
    with pytest.raises(MessageTooLarge):
        _scan_all(reader, _chunks(b"".join(messages), cuts))


def test_scan_rejects_short_length_after_long_message() -> None:
    reader = FrameReader()
    data = build(b"D", b"x" * 100) + b"D" + struct.pack("!I", 2)
    reader.scan(data[:50])
    with pytest.raises(ProtocolError, match="invalid message length 2"):
        reader.scan(data[50:])


def test_scan_header_split_one_byte_at_a_time() -> None:
    reader = FrameReader(max_message=64)
    data = build(b"S", b"") + b"D" + struct.pack("!I", 1000)
    with pytest.raises(MessageTooLarge):
        for index in range(len(data)):
            reader.scan(data[index : index + 1])
