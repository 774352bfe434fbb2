"""The stored form of a sealed value: data keys, sealing, opening and armour.

A sealed value is self-describing: its header names the format version, the
algorithm and the data key (id and version) that sealed it. The binary form is
what a bytea column stores, and the armoured form is what a text column stores.
The byte layout is described in docs/value-format.md.
"""

from __future__ import annotations

import binascii
import enum
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from proxy.errors import DecryptionError

__all__ = [
    "ARMOUR_PREFIX",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Algorithm",
    "DataKey",
    "ValueCipher",
    "armour",
    "dearmour",
    "is_armoured",
    "is_sealed_binary",
    "open_sealed",
    "read_key_ref",
    "seal",
]

MAGIC = b"\xffPS"
FORMAT_VERSION = 1
ARMOUR_PREFIX = b"pgs:"
STORE_ID_SIZE = 16
NONCE_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = 16
UINT32_MAX = 2**32 - 1

# Format version, algorithm, key id, key version: all big-endian.
_HEADER = struct.Struct(">BBII")
HEADER_SIZE = _HEADER.size
_CONTEXT_LENGTH = struct.Struct(">I")
_UINT32 = struct.Struct(">I")
# The length field of a NULL associated value. Real lengths stay below it.
_NULL_MARKER = _UINT32.pack(UINT32_MAX)
_AD_LABEL = b"pgseal/value/1"
_BASE64URL_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Maps the URL-safe alphabet to the standard one, and the standard alphabet's
# own '+', '/' and '=' to '!', which strict decoding rejects.
_FROM_BASE64URL = bytes.maketrans(b"-_+/=", b"+/!!!")
_TO_BASE64URL = bytes.maketrans(b"+/", b"-_")
_PADDING = (b"", b"", b"==", b"=")
# The low bits of the last digit that carry no data, by length modulo 4.
# Only zeros there keep one armoured text per value.
_UNUSED_BITS = (0, 0, 0x0F, 0x03)
_DIGIT_VALUES = bytes(
    _BASE64URL_DIGITS.index(byte) if byte in _BASE64URL_DIGITS else 0 for byte in range(256)
)


class Algorithm(enum.IntEnum):
    """The AEAD that seals a value, stored as one byte in its header."""

    XCHACHA20_POLY1305 = 1
    """Randomized: a fresh 24-byte nonce per value."""

    AES_256_SIV = 2
    """Deterministic: equal plaintexts give equal ciphertexts under one key."""

    @property
    def key_size(self) -> int:
        """Size in bytes of a data key for this algorithm."""
        return _KEY_SIZES[self]

    @property
    def nonce_size(self) -> int:
        """Size in bytes of the nonce stored in a value, 0 if none."""
        return NONCE_SIZE if self is Algorithm.XCHACHA20_POLY1305 else 0


_KEY_SIZES = {
    Algorithm.XCHACHA20_POLY1305: 32,
    Algorithm.AES_256_SIV: 64,
}


@dataclass(frozen=True)
class DataKey:
    """A plaintext data key with its id, version and algorithm."""

    key_id: int
    version: int
    algorithm: Algorithm
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_uint32("key_id", self.key_id)
        _check_uint32("version", self.version)
        if self.version < 1:
            raise ValueError(f"version must be at least 1, got {self.version}")
        if not isinstance(self.algorithm, Algorithm):
            raise TypeError("algorithm must be an Algorithm")
        if not isinstance(self.material, bytes):
            raise TypeError("data key material must be bytes")
        if len(self.material) != self.algorithm.key_size:
            raise ValueError(
                f"data key for {self.algorithm.name} must be "
                f"{self.algorithm.key_size} bytes, got {len(self.material)}"
            )

    @classmethod
    def generate(cls, key_id: int, version: int, algorithm: Algorithm) -> DataKey:
        """Create a data key with fresh random material from the OS."""
        if not isinstance(algorithm, Algorithm):
            raise TypeError("algorithm must be an Algorithm")
        material = secrets.token_bytes(algorithm.key_size)
        return cls(key_id, version, algorithm, material)


@dataclass(frozen=True)
class _Header:
    algorithm: Algorithm
    key_id: int
    version: int

    def pack(self) -> bytes:
        return _HEADER.pack(FORMAT_VERSION, self.algorithm, self.key_id, self.version)


class ValueCipher:
    """A data key bound to a key store and a context, which seals and opens values.

    The header and the associated data depend only on the key, the store id
    and the context, so they are built once here rather than per value.
    """

    __slots__ = ("_associated_data", "_min_size", "_prefix", "_siv", "key")

    def __init__(self, key: DataKey, *, store_id: bytes, context: str) -> None:
        _check_data_key(key)
        header = _Header(key.algorithm, key.key_id, key.version).pack()
        self.key = key
        self._prefix = MAGIC + header
        self._associated_data = _associated_data(store_id, context, header)
        self._min_size = len(self._prefix) + key.algorithm.nonce_size + TAG_SIZE
        self._siv: AESSIV | None = None
        if key.algorithm is Algorithm.AES_256_SIV:
            self._siv = AESSIV(key.material)

    def __repr__(self) -> str:
        return f"ValueCipher(key_id={self.key.key_id}, version={self.key.version})"

    def seal(self, plaintext: bytes, associated: Sequence[bytes | None] = ()) -> bytes:
        """Encrypt plaintext and return the binary form.

        `associated` contains the canonical text of other columns of the row
        (None for NULL); the value then opens only with the same values in
        the same order.
        """
        if not isinstance(plaintext, bytes):
            raise TypeError("plaintext must be bytes")
        associated_data = self._associated_data
        if associated:
            associated_data += _encode_associated(associated)
        if self._siv is None:
            nonce = os.urandom(NONCE_SIZE)
            ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
                plaintext, associated_data, nonce, self.key.material
            )
            return self._prefix + nonce + ciphertext
        # AES-SIV output is the 16-byte synthetic IV (its tag), then the ciphertext.
        return self._prefix + self._siv.encrypt(plaintext, [associated_data])

    def open(self, blob: bytes, associated: Sequence[bytes | None] = ()) -> bytes:
        """Decrypt a binary-form value sealed under this key, context and row values.

        Raises DecryptionError, with no detail, if the blob is malformed,
        names another key or algorithm, or fails authentication.
        """
        associated_data = self._associated_data
        if associated:
            associated_data += _encode_associated(associated)
        prefix = self._prefix
        if len(blob) < self._min_size or not blob.startswith(prefix):
            raise DecryptionError()
        start = len(prefix)
        if self._siv is None:
            nonce = blob[start : start + NONCE_SIZE]
            ciphertext = blob[start + NONCE_SIZE :]
            try:
                return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    ciphertext, associated_data, nonce, self.key.material
                )
            except nacl.exceptions.CryptoError:
                raise DecryptionError() from None
        try:
            return self._siv.decrypt(blob[start:], [associated_data])
        except InvalidTag:
            raise DecryptionError() from None


def seal(
    key: DataKey,
    plaintext: bytes,
    *,
    store_id: bytes,
    context: str,
    associated: Sequence[bytes | None] = (),
) -> bytes:
    """Encrypt plaintext under key and return the binary form.

    store_id (16 bytes) and context (the column identity, for example
    "public.users.email") go into the associated data, so the value opens
    only with the same key store and context. `associated` contains the
    canonical text of other columns of the row (None for NULL); the value
    then opens only with the same values in the same order. Callers that seal
    many values under one key keep a ValueCipher instead.
    """
    cipher = ValueCipher(key, store_id=store_id, context=context)
    return cipher.seal(plaintext, associated)


def read_key_ref(blob: bytes) -> tuple[int, int]:
    """Return (key_id, version) from the header of a binary-form value.

    Raises DecryptionError if the blob is not a well-formed sealed value.
    """
    header = _parse_header(blob)
    return header.key_id, header.version


def open_sealed(
    blob: bytes,
    key: DataKey,
    *,
    store_id: bytes,
    context: str,
    associated: Sequence[bytes | None] = (),
) -> bytes:
    """Decrypt a binary-form value and return its plaintext.

    Raises DecryptionError, with no detail, if the blob is malformed, names
    another key or algorithm, or fails authentication for store_id, context
    and the associated column values.
    """
    if not isinstance(blob, bytes):
        raise TypeError("blob must be bytes")
    return ValueCipher(key, store_id=store_id, context=context).open(blob, associated)


def armour(blob: bytes) -> bytes:
    """Convert a binary-form value to the ASCII form stored in text columns."""
    if not isinstance(blob, bytes):
        raise TypeError("blob must be bytes")
    if not blob.startswith(MAGIC):
        raise ValueError("blob must start with the pgseal magic bytes")
    body = binascii.b2a_base64(blob[len(MAGIC) :], newline=False)
    return ARMOUR_PREFIX + body.translate(_TO_BASE64URL).rstrip(b"=")


def dearmour(text: bytes) -> bytes:
    """Convert an armoured value back to the binary form.

    Only the canonical encoding that armour() produces is accepted. Anything
    else raises DecryptionError. The header and ciphertext are checked later,
    by read_key_ref() and open_sealed().
    """
    if not isinstance(text, bytes):
        raise TypeError("text must be bytes")
    if not text.startswith(ARMOUR_PREFIX):
        raise DecryptionError()
    body = text[len(ARMOUR_PREFIX) :]
    remainder = len(body) % 4
    if remainder == 1:
        raise DecryptionError()
    try:
        raw = binascii.a2b_base64(
            body.translate(_FROM_BASE64URL) + _PADDING[remainder], strict_mode=True
        )
    except binascii.Error:
        raise DecryptionError() from None
    if remainder and _DIGIT_VALUES[body[-1]] & _UNUSED_BITS[remainder]:
        raise DecryptionError()
    return MAGIC + raw


def is_sealed_binary(blob: bytes) -> bool:
    """Check for the magic prefix only, for diagnostics.

    Never decide to decrypt on this: a plain column can hold a copied value.
    """
    return blob.startswith(MAGIC)


def is_armoured(text: bytes) -> bool:
    """Check for the armour prefix only, for diagnostics.

    Never decide to decrypt on this: a plain column can hold a copied value.
    """
    return text.startswith(ARMOUR_PREFIX)


def _parse_header(blob: bytes) -> _Header:
    if not isinstance(blob, bytes):
        raise TypeError("blob must be bytes")
    start = len(MAGIC)
    if not blob.startswith(MAGIC) or len(blob) < start + _HEADER.size:
        raise DecryptionError()
    format_version, algorithm_id, key_id, version = _HEADER.unpack_from(blob, start)
    if format_version != FORMAT_VERSION or version < 1:
        raise DecryptionError()
    try:
        algorithm = Algorithm(algorithm_id)
    except ValueError:
        raise DecryptionError() from None
    if len(blob) < start + _HEADER.size + algorithm.nonce_size + TAG_SIZE:
        raise DecryptionError()
    return _Header(algorithm, key_id, version)


def _associated_data(
    store_id: bytes,
    context: str,
    header: bytes,
    associated: Sequence[bytes | None] = (),
) -> bytes:
    """Build the associated data: label, store id, context, header, row values.

    The label, store id and header have fixed sizes, the context carries its
    length, and so do the row values, so no two different inputs give the
    same bytes. Without row values nothing follows the header, which keeps
    values sealed before a rule named associated columns opening as before.
    """
    if not isinstance(store_id, bytes):
        raise TypeError("store_id must be bytes")
    if len(store_id) != STORE_ID_SIZE:
        raise ValueError(f"store_id must be {STORE_ID_SIZE} bytes")
    encoded = _encode_context(context)
    data = _AD_LABEL + store_id + _CONTEXT_LENGTH.pack(len(encoded)) + encoded + header
    if associated:
        data += _encode_associated(associated)
    return data


def _encode_associated(values: Sequence[bytes | None]) -> bytes:
    """Encode row values as a count, then each as a length and its bytes.

    NULL is the length field 0xffffffff with no bytes, so it differs from
    the empty string, whose length is 0.
    """
    parts = [_UINT32.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_NULL_MARKER)
            continue
        if not isinstance(value, bytes):
            raise TypeError("associated values must be bytes or None")
        if len(value) >= UINT32_MAX:
            raise ValueError(f"associated values must be shorter than {UINT32_MAX} bytes")
        parts.append(_UINT32.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def _encode_context(context: str) -> bytes:
    if not isinstance(context, str):
        raise TypeError("context must be a str")
    if not context:
        raise ValueError("context must not be empty")
    try:
        return context.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("context must be encodable as UTF-8") from None


def _check_data_key(key: DataKey) -> None:
    if not isinstance(key, DataKey):
        raise TypeError("key must be a DataKey")


def _check_uint32(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")
    if not 0 <= value <= UINT32_MAX:
        raise ValueError(f"{name} must be between 0 and {UINT32_MAX}, got {value}")

