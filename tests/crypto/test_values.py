"""Tests for the sealed value format in proxy.crypto.values."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.crypto.values import (
    ARMOUR_PREFIX,
    MAGIC,
    Algorithm,
    DataKey,
    armour,
    dearmour,
    is_armoured,
    is_sealed_binary,
    open_sealed,
    read_key_ref,
    seal,
)
from proxy.errors import DecryptionError

XCHACHA = Algorithm.XCHACHA20_POLY1305
STORE_ID = bytes(range(16))
OTHER_STORE_ID = bytes(range(1, 17))
CONTEXT = "public.users.email"
ALGORITHMS = list(Algorithm)
OPEN_FAILED = "sealed value could not be opened"


def make_key(algorithm: Algorithm, key_id: int = 7, version: int = 3) -> DataKey:
    return DataKey.generate(key_id, version, algorithm)


def seal_default(key: DataKey, plaintext: bytes) -> bytes:
    return seal(key, plaintext, store_id=STORE_ID, context=CONTEXT)


def open_default(blob: bytes, key: DataKey) -> bytes:
    return open_sealed(blob, key, store_id=STORE_ID, context=CONTEXT)


def assert_open_fails(blob: bytes, key: DataKey, **overrides: object) -> None:
    kwargs: dict[str, object] = {"store_id": STORE_ID, "context": CONTEXT}
    kwargs.update(overrides)
    with pytest.raises(DecryptionError) as info:
        open_sealed(blob, key, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == OPEN_FAILED
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


# --- data keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "size"),
    [(Algorithm.XCHACHA20_POLY1305, 32), (Algorithm.AES_256_SIV, 64)],
)
def test_data_key_generate_size(algorithm: Algorithm, size: int) -> None:
    key = DataKey.generate(1, 1, algorithm)
    assert len(key.material) == size
    assert key.algorithm is algorithm


def test_data_key_generate_random() -> None:
    first = DataKey.generate(1, 1, Algorithm.XCHACHA20_POLY1305)
    second = DataKey.generate(1, 1, Algorithm.XCHACHA20_POLY1305)
    assert first.material != second.material


def test_data_key_wrong_size() -> None:
    with pytest.raises(ValueError, match="must be 32 bytes"):
        DataKey(1, 1, Algorithm.XCHACHA20_POLY1305, b"\x00" * 64)
    with pytest.raises(ValueError, match="must be 64 bytes"):
        DataKey(1, 1, Algorithm.AES_256_SIV, b"\x00" * 32)


@pytest.mark.parametrize(
    ("key_id", "version", "error"),
    [
        (-1, 1, ValueError),
        (2**32, 1, ValueError),
        (1, 0, ValueError),
        (1, 2**32, ValueError),
        (True, 1, TypeError),
        ("1", 1, TypeError),
    ],
)
def test_data_key_invalid_ids(key_id: object, version: object, error: type) -> None:
    material = b"\x00" * 32
    with pytest.raises(error):
        DataKey(key_id, version, XCHACHA, material)  # type: ignore[arg-type]


def test_data_key_invalid_types() -> None:
    with pytest.raises(TypeError, match="algorithm"):
        DataKey(1, 1, 1, b"\x00" * 32)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="material"):
        DataKey(1, 1, XCHACHA, bytearray(32))  # type: ignore[arg-type]


def test_data_key_repr_hides_material() -> None:
    key = DataKey(5, 2, Algorithm.XCHACHA20_POLY1305, b"\xab" * 32)
    text = repr(key)
    assert "material" not in text
    assert "ab" * 4 not in text
    assert "\\xab" not in text


# --- seal and open ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [0, 1, 64, 64 * 1024])
def test_seal_round_trip(algorithm: Algorithm, size: int) -> None:
    key = make_key(algorithm)
    plaintext = os.urandom(size)
    blob = seal_default(key, plaintext)
    assert open_default(blob, key) == plaintext


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_seal_binary_layout(algorithm: Algorithm) -> None:
    key = make_key(algorithm, key_id=0x01020304, version=0x0A0B0C0D)
    blob = seal_default(key, b"hello")
    assert blob[:3] == MAGIC
    assert blob[3] == 1
    assert blob[4] == int(algorithm)
    assert blob[5:9] == bytes([1, 2, 3, 4])
    assert blob[9:13] == bytes([0x0A, 0x0B, 0x0C, 0x0D])
    assert read_key_ref(blob) == (0x01020304, 0x0A0B0C0D)


@pytest.mark.parametrize(
    ("algorithm", "overhead"),
    [(Algorithm.XCHACHA20_POLY1305, 53), (Algorithm.AES_256_SIV, 29)],
)
def test_seal_binary_overhead(algorithm: Algorithm, overhead: int) -> None:
    key = make_key(algorithm)
    for size in (0, 1, 64, 1000):
        assert len(seal_default(key, b"x" * size)) == size + overhead


@pytest.mark.parametrize(
    ("algorithm", "armoured_size"),
    [(Algorithm.XCHACHA20_POLY1305, 156), (Algorithm.AES_256_SIV, 124)],
)
def test_armour_overhead_64_bytes(algorithm: Algorithm, armoured_size: int) -> None:
    key = make_key(algorithm)
    text = armour(seal_default(key, b"x" * 64))
    assert len(text) - 64 < 100
    assert len(text) == armoured_size


def test_deterministic_equal_ciphertext() -> None:
    key = make_key(Algorithm.AES_256_SIV)
    assert seal_default(key, b"alice") == seal_default(key, b"alice")
    assert seal_default(key, b"alice") != seal_default(key, b"bob")


def test_deterministic_depends_on_context() -> None:
    key = make_key(Algorithm.AES_256_SIV)
    first = seal(key, b"alice", store_id=STORE_ID, context="public.a.x")
    second = seal(key, b"alice", store_id=STORE_ID, context="public.a.y")
    assert first != second


def test_randomized_distinct_ciphertext() -> None:
    key = make_key(Algorithm.XCHACHA20_POLY1305)
    assert seal_default(key, b"alice") != seal_default(key, b"alice")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_wrong_context(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"secret")
    assert_open_fails(blob, key, context="public.users.name")
    assert_open_fails(blob, key, context=CONTEXT + " ")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_associated_values_round_trip(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    values = (b"42", None, b"")
    blob = seal(key, b"secret", store_id=STORE_ID, context=CONTEXT, associated=values)
    opened = open_sealed(blob, key, store_id=STORE_ID, context=CONTEXT, associated=values)
    assert opened == b"secret"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "other",
    [
        (b"43",),  # another value
        (None,),  # NULL is not the empty string
        (b"",),
        (b"4", b"2"),  # the same bytes split into two values
        (b"42", None),  # an extra value
        (),  # no values: the form of a value sealed without associated columns
    ],
)
def test_open_wrong_associated_values(
    algorithm: Algorithm, other: tuple[bytes | None, ...]
) -> None:
    key = make_key(algorithm)
    blob = seal(key, b"secret", store_id=STORE_ID, context=CONTEXT, associated=(b"42",))
    assert_open_fails(blob, key, associated=other)


def test_null_and_empty_associated_differ() -> None:
    key = make_key(XCHACHA)
    blob = seal(key, b"secret", store_id=STORE_ID, context=CONTEXT, associated=(None,))
    assert_open_fails(blob, key, associated=(b"",))
    assert open_sealed(
        blob, key, store_id=STORE_ID, context=CONTEXT, associated=(None,)
    ) == b"secret"


def test_associated_values_not_stored() -> None:
    key = make_key(Algorithm.AES_256_SIV)
    plain = seal_default(key, b"secret")
    bound = seal(key, b"secret", store_id=STORE_ID, context=CONTEXT, associated=(b"42",))
    assert len(bound) == len(plain)
    assert bound != plain
    assert b"42" not in bound


def test_associated_values_invalid_type() -> None:
    key = make_key(XCHACHA)
    with pytest.raises(TypeError, match="associated values must be bytes or None"):
        seal(key, b"x", store_id=STORE_ID, context=CONTEXT, associated=("42",))  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_wrong_store_id(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"secret")
    assert_open_fails(blob, key, store_id=OTHER_STORE_ID)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_wrong_key_material(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    other = make_key(algorithm)
    blob = seal_default(key, b"secret")
    assert_open_fails(blob, other)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_key_ref_mismatch(algorithm: Algorithm) -> None:
    key = make_key(algorithm, key_id=7, version=3)
    blob = seal_default(key, b"secret")
    same_material_other_id = DataKey(8, 3, algorithm, key.material)
    same_material_other_version = DataKey(7, 4, algorithm, key.material)
    assert_open_fails(blob, same_material_other_id)
    assert_open_fails(blob, same_material_other_version)


def test_open_wrong_algorithm() -> None:
    siv_key = make_key(Algorithm.AES_256_SIV)
    chacha_key = DataKey(
        siv_key.key_id,
        siv_key.version,
        Algorithm.XCHACHA20_POLY1305,
        siv_key.material[:32],
    )
    blob = seal_default(siv_key, b"secret")
    assert_open_fails(blob, chacha_key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_flipped_byte_anywhere(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"sixteen byte msg")
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        assert_open_fails(bytes(tampered), key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_truncated(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"some plaintext")
    for length in range(len(blob)):
        assert_open_fails(blob[:length], key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_extended(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"some plaintext")
    assert_open_fails(blob + b"\x00", key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_tampered_header(algorithm: Algorithm) -> None:
    key = make_key(algorithm, key_id=7, version=3)
    blob = seal_default(key, b"secret")
    body = blob[3 + 10 :]
    cases = [
        MAGIC + struct.pack(">BBII", 2, algorithm, 7, 3) + body,
        MAGIC + struct.pack(">BBII", 1, 99, 7, 3) + body,
        MAGIC + struct.pack(">BBII", 1, algorithm, 8, 3) + body,
        MAGIC + struct.pack(">BBII", 1, algorithm, 7, 0) + body,
        b"\xffPT" + blob[3:],
    ]
    for tampered in cases:
        assert_open_fails(tampered, key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_open_other_header_same_key(algorithm: Algorithm) -> None:
    """A header rewritten to name a second key with equal material fails."""
    key = make_key(algorithm, key_id=7, version=3)
    moved = DataKey(7, 4, algorithm, key.material)
    blob = seal_default(key, b"secret")
    rewritten = MAGIC + struct.pack(">BBII", 1, algorithm, 7, 4) + blob[13:]
    assert_open_fails(rewritten, moved)


def test_open_failures_share_message() -> None:
    key = make_key(Algorithm.XCHACHA20_POLY1305)
    blob = seal_default(key, b"secret")
    attempts = [
        (blob, OTHER_STORE_ID, CONTEXT),
        (blob[:20], STORE_ID, CONTEXT),
        (b"", STORE_ID, CONTEXT),
        (blob, STORE_ID, "x.y.z"),
    ]
    messages = set()
    for candidate, store_id, context in attempts:
        with pytest.raises(DecryptionError) as info:
            open_sealed(candidate, key, store_id=store_id, context=context)
        messages.add(str(info.value))
    assert messages == {OPEN_FAILED}


@pytest.mark.parametrize(
    "blob", [b"", b"\xffP", MAGIC, MAGIC + b"\x01\x01", b"plain text value"]
)
def test_read_key_ref_malformed(blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        read_key_ref(blob)


def test_read_key_ref_unknown_format_version() -> None:
    blob = MAGIC + struct.pack(">BBII", 2, 1, 7, 3) + b"\x00" * 40
    with pytest.raises(DecryptionError):
        read_key_ref(blob)


def test_seal_invalid_arguments() -> None:
    key = make_key(Algorithm.XCHACHA20_POLY1305)
    with pytest.raises(ValueError, match="store_id must be 16 bytes"):
        seal(key, b"x", store_id=b"short", context=CONTEXT)
    with pytest.raises(ValueError, match="context must not be empty"):
        seal(key, b"x", store_id=STORE_ID, context="")
    with pytest.raises(TypeError, match="plaintext must be bytes"):
        seal(key, "x", store_id=STORE_ID, context=CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a DataKey"):
        not_a_key = b"k" * 32
        seal(not_a_key, b"x", store_id=STORE_ID, context=CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UTF-8"):
        seal(key, b"x", store_id=STORE_ID, context="\ud800")


# --- armour ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_armour_round_trip(algorithm: Algorithm) -> None:
    key = make_key(algorithm)
    blob = seal_default(key, b"armoured")
    text = armour(blob)
    assert text.startswith(ARMOUR_PREFIX)
    assert text.isascii()
    assert b"=" not in text
    assert dearmour(text) == blob
    assert open_default(dearmour(text), key) == b"armoured"


def test_armour_rejects_non_sealed() -> None:
    with pytest.raises(ValueError, match="magic"):
        armour(b"plain")


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"pgs",
        b"PGS:AQE",
        b"pgs:A",
        b"pgs:AQE=",
        b"pgs:AQ E",
        b"pgs:AQ+/",
        b"pgs:AQ\n",
        b"pgs:AR",
    ],
)
def test_dearmour_malformed(text: bytes) -> None:
    with pytest.raises(DecryptionError):
        dearmour(text)


def test_prefix_checks() -> None:
    key = make_key(Algorithm.XCHACHA20_POLY1305)
    blob = seal_default(key, b"x")
    assert is_sealed_binary(blob)
    assert not is_sealed_binary(b"plain")
    assert is_armoured(armour(blob))
    assert not is_armoured(b"plain")


# --- properties ------------------------------------------------------------

FIXED_KEYS = {algorithm: make_key(algorithm) for algorithm in ALGORITHMS}


@given(body=st.binary(max_size=512))
def test_armour_dearmour_property(body: bytes) -> None:
    blob = MAGIC + body
    assert dearmour(armour(blob)) == blob


@given(text=st.binary(max_size=64))
def test_dearmour_canonical_property(text: bytes) -> None:
    candidate = ARMOUR_PREFIX + text
    try:
        blob = dearmour(candidate)
    except DecryptionError:
        return
    assert armour(blob) == candidate


@given(
    algorithm=st.sampled_from(ALGORITHMS),
    plaintext=st.binary(max_size=2048),
    context=st.text(min_size=1, max_size=64),
    store_id=st.binary(min_size=16, max_size=16),
)
def test_seal_open_property(
    algorithm: Algorithm, plaintext: bytes, context: str, store_id: bytes
) -> None:
    key = FIXED_KEYS[algorithm]
    blob = seal(key, plaintext, store_id=store_id, context=context)
    assert open_sealed(blob, key, store_id=store_id, context=context) == plaintext
    assert read_key_ref(blob) == (key.key_id, key.version)
