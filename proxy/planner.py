"""The bridge between the session and the crypto: seal and open wire values.

A value on the wire is in text or binary format. Text columns store the
armoured form, which is the same ASCII bytes in both formats. Bytea columns
store the binary form, which travels raw in binary format and as `\\x` hex in
text format.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.catalog import Catalog, EncryptedColumn, Storage
from proxy.crypto.keystore import KeyCache
from proxy.crypto.values import (
    Algorithm,
    DataKey,
    armour,
    dearmour,
    open_sealed,
    read_key_ref,
    seal,
)
from proxy.errors import DecryptionError, KeyringError
from proxy.rules import Encryption
from proxy.sql.analyze import Analyzer, StatementPlan
from proxy.sql.literals import LiteralSlot, quote_literal, replace_literals
from proxy.wire.messages import BINARY_FORMAT, Field

RowPlan = tuple[tuple[int, EncryptedColumn, int], ...]


def algorithm_of(column: EncryptedColumn) -> Algorithm:
    if column.rule.encryption is Encryption.DETERMINISTIC:
        return Algorithm.AES_256_SIV
    return Algorithm.XCHACHA20_POLY1305


@dataclass(frozen=True, slots=True)
class KeyView:
    """Synchronous access to the data keys that the server loaded into the cache."""

    cache: KeyCache
    store_id: bytes

    def active(self, column: EncryptedColumn) -> DataKey:
        ref = self.cache.active_ref(column.identity)
        key = self.cache.get(*ref) if ref is not None else None
        if key is None:
            raise KeyringError(f"no data key is loaded for column {column.identity}")
        return key

    def for_value(self, blob: bytes) -> DataKey:
        key_id, version = read_key_ref(blob)
        key = self.cache.get(key_id, version)
        if key is None:
            raise KeyringError(f"data key {key_id} version {version} is not loaded")
        return key


class ColumnPlanner:
    """Plan statements with the analyzer and seal or open values with the keys."""

    def __init__(self, catalog: Catalog, keys: KeyView) -> None:
        self.catalog = catalog
        self._analyzer = Analyzer(catalog)
        self._keys = keys
        self._oids = frozenset(table.oid for table in catalog.tables)

    def statement(self, sql: str) -> StatementPlan:
        return self._analyzer.plan(sql)

    def seal_literals(self, sql: str, plan: StatementPlan) -> str:
        return replace_literals(sql, plan.literals, self._seal_literal)

    def _seal_literal(self, slot: LiteralSlot) -> str:
        column = slot.column
        if column.storage is Storage.BYTEA:
            plaintext = decode_bytea_text(slot.value.encode("utf-8"))
            return quote_literal("\\x" + self._seal(column, plaintext).hex())
        sealed = armour(self._seal(column, slot.value.encode("utf-8")))
        return quote_literal(sealed.decode("ascii"))

    def seal_param(self, column: EncryptedColumn, value: bytes, fmt: int) -> bytes:
        if column.storage is Storage.TEXT:
            return armour(self._seal(column, value))
        if fmt == BINARY_FORMAT:
            return self._seal(column, value)
        return b"\\x" + self._seal(column, decode_bytea_text(value)).hex().encode()

    def _seal(self, column: EncryptedColumn, plaintext: bytes) -> bytes:
        key = self._keys.active(column)
        return seal(key, plaintext, store_id=self._keys.store_id, context=column.identity)

    def row_plan(self, fields: tuple[Field, ...]) -> RowPlan | None:
        plan = []
        for index, field in enumerate(fields):
            if field.table_oid in self._oids:
                column = self.catalog.column_at(field.table_oid, field.column)
                if column is not None:
                    plan.append((index, column, field.format))
        return tuple(plan) or None

    def open_value(self, column: EncryptedColumn, value: bytes, fmt: int) -> bytes:
        if column.storage is Storage.TEXT:
            return self._open(column, dearmour(value))
        if fmt == BINARY_FORMAT:
            return self._open(column, value)
        try:
            blob = decode_bytea_text(value)
        except ValueError:
            raise DecryptionError() from None
        return b"\\x" + self._open(column, blob).hex().encode()

    def _open(self, column: EncryptedColumn, blob: bytes) -> bytes:
        key = self._keys.for_value(blob)
        return open_sealed(blob, key, store_id=self._keys.store_id, context=column.identity)


def decode_bytea_text(value: bytes) -> bytes:
    """Decode bytea's text input form: `\\x` hex, or the escape form.

    Raises ValueError on input that the server would reject too.
    """
    if value[:2] == b"\\x":
        return bytes.fromhex(value[2:].decode("ascii"))
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] != 0x5C:
            out.append(value[i])
            i += 1
        elif value[i + 1 : i + 2] == b"\\":
            out.append(0x5C)
            i += 2
        else:
            digits = value[i + 1 : i + 4]
            if len(digits) != 3 or not digits.isdigit():
                raise ValueError("invalid escape sequence in bytea text")
            out.append(int(digits, 8))
            i += 4
    return bytes(out)
