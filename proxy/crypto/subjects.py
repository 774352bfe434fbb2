"""Data keys per subject: subject values, their key names, and keys to fetch.

A column with `key_scope: subject` seals each row's value under the data key
of the row's subject (the value of its `subject_column`, such as a creator
id), so destroying that one key with `pgseal keys shred` makes every value of
the subject unreadable while other subjects stay readable.

The key store never holds a subject value itself. It holds an HMAC-SHA256 of
the value's canonical text under the store's subject secret, because key
names appear in logs, audit lines and `pgseal keys list` output. The secret
is kept in the key store table, so this keeps subject ids out of those
outputs but does not hide them from someone who can read the database, which
holds the subject column in plaintext anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid
from dataclasses import dataclass

from cachetools import TTLCache

from proxy.crypto.values import Algorithm
from proxy.errors import PgsealError

__all__ = [
    "SUBJECT_TYPE_NAMES",
    "KeysNeeded",
    "StoredKeyRequest",
    "SubjectKeyRequest",
    "SubjectValue",
    "UnavailableKeys",
    "canonical_forms",
    "canonical_subject",
    "subject_digest",
    "subject_key_name",
]

SUBJECT_SECRET_SIZE = 32

# Subject column types by OID, and how their values are made canonical.
_INTEGER_TYPES = {21: "smallint", 23: "integer", 20: "bigint"}
_TEXT_TYPES = {25: "text", 1043: "varchar"}
_UUID_OID = 2950
SUBJECT_TYPE_NAMES = {**_INTEGER_TYPES, **_TEXT_TYPES, _UUID_OID: "uuid"}
_BINARY_INTEGERS = {2: struct.Struct(">h"), 4: struct.Struct(">i"), 8: struct.Struct(">q")}

_KEY_NAME_MARK = "@subject:"


@dataclass(frozen=True, slots=True)
class SubjectValue:
    """A row's subject value as it came on the wire, in text (0) or binary (1) format."""

    raw: bytes
    format: int = 0


@dataclass(frozen=True, slots=True)
class SubjectKeyRequest:
    """The active data key of one subject for one column, to find or create."""

    key_name: str
    column_key_name: str
    digest: bytes
    algorithm: Algorithm


@dataclass(frozen=True, slots=True)
class StoredKeyRequest:
    """A data key named by a stored value's header, to unwrap."""

    key_id: int
    version: int


KeyRequest = SubjectKeyRequest | StoredKeyRequest


class KeysNeeded(PgsealError):
    """Sealing or opening a message needs data keys that are not in the cache.

    The session raises it before it changes any state for the message, so
    the caller can fetch the keys and pass the same messages again.
    """

    def __init__(self, requests: tuple[KeyRequest, ...]) -> None:
        super().__init__(f"{len(requests)} data keys are not loaded yet")
        self.requests = requests


def canonical_subject(type_oid: int, raw: bytes, fmt: int) -> str:
    """Return the canonical text of a subject value of the given column type.

    Equal values give equal text whatever their wire format or spelling,
    so " 42" and binary int4 42 select the same data key. Raises ValueError
    on a value that is not valid input for the type.
    """
    if type_oid in _INTEGER_TYPES:
        if fmt == 1:
            decoder = _BINARY_INTEGERS.get(len(raw))
            if decoder is None:
                raise ValueError("binary integer must be 2, 4 or 8 bytes")
            return str(decoder.unpack(raw)[0])
        return str(int(raw.decode("ascii").strip()))
    if type_oid == _UUID_OID:
        if fmt == 1:
            return str(uuid.UUID(bytes=raw))
        return str(uuid.UUID(raw.decode("ascii").strip()))
    if type_oid in _TEXT_TYPES:
        return raw.decode("utf-8")
    raise ValueError(f"subject columns of type OID {type_oid} are not supported")


def canonical_forms(text: str) -> set[str]:
    """Return the canonical texts that `text` has as any supported subject type.

    `pgseal keys shred --subject` does not know the column's type, so it
    destroys the keys of every reading: "042" is the integer 42 and the
    text "042".
    """
    forms = {text}
    for type_oid in (23, _UUID_OID):
        try:
            forms.add(canonical_subject(type_oid, text.encode("utf-8"), 0))
        except (ValueError, UnicodeError):
            continue
    return forms


def subject_digest(secret: bytes, canonical: str) -> bytes:
    """Return the HMAC-SHA256 of a canonical subject text under the store's secret."""
    if len(secret) != SUBJECT_SECRET_SIZE:
        raise ValueError(f"subject secret must be {SUBJECT_SECRET_SIZE} bytes")
    return hmac.new(secret, canonical.encode("utf-8"), hashlib.sha256).digest()


def subject_key_name(column_key_name: str, digest: bytes) -> str:
    """Return the key name of a subject's data key for a column."""
    return f"{column_key_name}{_KEY_NAME_MARK}{digest.hex()}"


def is_subject_key_name(key_name: str) -> bool:
    return _KEY_NAME_MARK in key_name


class UnavailableKeys:
    """Keys that failed to load or to be created, remembered for a while.

    A scan over many rows of a shredded subject would otherwise query the
    key store once per row. After `ttl` seconds a key is tried again.
    """

    def __init__(self, ttl: float, maxsize: int = 10_000) -> None:
        self.ttl = ttl
        self._failed: TTLCache[KeyRequest, tuple[str, bool]] = TTLCache(maxsize, ttl)

    def add(self, request: KeyRequest, reason: str, gone: bool = False) -> None:
        """Remember a failed key; `gone` means the key store has no such key."""
        self._failed[request] = (reason, gone)

    def reason(self, request: KeyRequest) -> str | None:
        """Return why the key is unavailable, or None if it may be fetched."""
        failed = self._failed.get(request)
        return failed[0] if failed is not None else None

    def gone(self, request: KeyRequest) -> bool:
        """Tell whether the key store had no such key, as after a shred."""
        failed = self._failed.get(request)
        return failed is not None and failed[1]

    def clear(self) -> None:
        self._failed.clear()
