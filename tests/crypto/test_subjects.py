"""Subject values: canonical text, digests and key names."""

from __future__ import annotations

import struct
import uuid

import pytest

from proxy.crypto.subjects import (
    canonical_forms,
    canonical_subject,
    subject_digest,
    subject_key_name,
)

INT4, INT8, TEXT, UUID = 23, 20, 25, 2950
SECRET = bytes(range(32))


@pytest.mark.parametrize(
    ("type_oid", "raw", "fmt", "expected"),
    [
        (INT4, b"42", 0, "42"),
        (INT4, b" +042 ", 0, "42"),
        (INT4, struct.pack(">i", 42), 1, "42"),
        (INT4, struct.pack(">q", 42), 1, "42"),
        (INT8, b"-9000000000", 0, "-9000000000"),
        (TEXT, b" Alice ", 0, " Alice "),
        (TEXT, "Zoë".encode(), 1, "Zoë"),
        (
            UUID,
            b"{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}",
            0,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ),
        (
            UUID,
            uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").bytes,
            1,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ),
    ],
)
def test_canonical_subject(type_oid: int, raw: bytes, fmt: int, expected: str) -> None:
    assert canonical_subject(type_oid, raw, fmt) == expected


@pytest.mark.parametrize(
    ("type_oid", "raw", "fmt"),
    [(INT4, b"x1", 0), (INT4, b"\x00\x01\x02", 1), (UUID, b"not-a-uuid", 0), (1700, b"1.5", 0)],
    ids=["text int", "binary int size", "uuid", "numeric type"],
)
def test_canonical_subject_invalid(type_oid: int, raw: bytes, fmt: int) -> None:
    with pytest.raises(ValueError):
        canonical_subject(type_oid, raw, fmt)


def test_canonical_forms_cover_types() -> None:
    assert canonical_forms("042") == {"042", "42"}
    assert canonical_forms("alice") == {"alice"}


def test_subject_key_name_hides_value() -> None:
    digest = subject_digest(SECRET, "4711")
    name = subject_key_name("public.posts.body", digest)
    assert name == f"public.posts.body@subject:{digest.hex()}"
    assert "4711" not in name
    assert subject_digest(SECRET, "4712") != digest
    assert subject_digest(bytes(32), "4711") != digest
