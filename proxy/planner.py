"""The bridge between the session and the crypto: seal and open wire values.

A value on the wire is in text or binary format. Text columns store the
armoured form, which is the same ASCII bytes in both formats. Bytea columns
store the binary form, which travels raw in binary format and as `\\x` hex in
text format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.catalog import Catalog, EncryptedColumn, Storage
from proxy.crypto.keystore import KeyCache, KeyRef
from proxy.crypto.values import (
    Algorithm,
    DataKey,
    armour,
    dearmour,
    open_sealed,
    read_key_ref,
    seal,
)
from proxy.errors import DecryptionError, KeyringError, StatementRejected
from proxy.lookups import (
    KeyVersions,
    SealedStatement,
    check_versions,
    covered,
    lookup_edits,
    statement_keys,
)
from proxy.rules import Encryption, OnDecryptError
from proxy.sql.analyze import Analyzer, SearchValue, StatementPlan
from proxy.sql.arrays import (
    build_array,
    flat_map_binary_array,
    flat_map_text_array,
    map_binary_array,
    map_text_array,
)
from proxy.sql.literals import LiteralSlot, quote_literal, replace_spans
from proxy.wire.messages import BINARY_FORMAT, TEXT_FORMAT, Field

Candidates = tuple[EncryptedColumn, ...]
RowPlan = tuple[tuple[int, Candidates, int], ...]


def algorithm_of(column: EncryptedColumn) -> Algorithm:
    if column.rule.encryption is Encryption.DETERMINISTIC:
        return Algorithm.AES_256_SIV
    return Algorithm.XCHACHA20_POLY1305


@dataclass(frozen=True, slots=True)
class KeyView:
    """Synchronous access to the data keys that the server loaded into the cache."""

    cache: KeyCache
    store_id: bytes
    # False for a write-only proxy. It keeps the data keys it created, but
    # opens no value, so its reads never depend on which replica sealed a row.
    can_open: bool = True

    def active(self, column: EncryptedColumn) -> DataKey:
        ref = self.cache.active_ref(column.key_name)
        key = self.cache.get(*ref) if ref is not None else None
        if key is None:
            raise KeyringError(f"no data key is loaded for column {column.identity}")
        # Each call seals one value. For randomized columns the count feeds
        # max_values_per_key, past which the proxy rolls a new version.
        if column.rule.encryption is Encryption.RANDOMIZED:
            self.cache.note_sealed(column.key_name, (key.key_id, key.version))
        return key

    def live_refs(self, key_name: str) -> tuple[KeyRef, ...]:
        """Return the key name's versions that are not retired, oldest first."""
        return self.cache.live_refs(key_name)

    def live_keys(self, column: EncryptedColumn) -> tuple[DataKey, ...]:
        """Return the data keys of the column's live versions, oldest first.

        Raises KeyringError when one of them is not loaded.
        """
        keys = []
        for key_id, version in self.cache.live_refs(column.key_name):
            key = self.cache.get(key_id, version)
            if key is None:
                raise KeyringError(
                    f"data key {key_id} version {version} of column "
                    f"{column.identity} is not loaded"
                )
            keys.append(key)
        if not keys:
            raise KeyringError(f"no data key is loaded for column {column.identity}")
        return tuple(keys)

    def for_value(self, blob: bytes) -> DataKey:
        if not self.can_open:
            raise KeyringError("no configured keyring can unwrap, so no value opens")
        key_id, version = read_key_ref(blob)
        key = self.cache.get(key_id, version)
        if key is None:
            raise KeyringError(f"data key {key_id} version {version} is not loaded")
        return key


class ColumnPlanner:
    """Plan statements with the analyzer and seal or open values with the keys."""

    def __init__(self, catalog: Catalog, keys: KeyView) -> None:
        self._keys = keys
        self.update(catalog)

    def update(self, catalog: Catalog) -> None:
        """Plan with a newly read catalog from now on, in every session."""
        self.catalog = catalog
        self._analyzer = Analyzer(catalog)
        self._oids = frozenset(table.oid for table in catalog.tables)

    def statement(self, sql: str, search_path: tuple[str, ...] | None = None) -> StatementPlan:
        return self._analyzer.plan(sql, search_path)

    def seal_statement(self, sql: str, plan: StatementPlan) -> SealedStatement:
        """Seal the literals of `sql` and rewrite its lookups for the live key versions.

        Raises StatementRejected for a join, grouping or deduplication on a
        deterministic column whose key has several live versions.
        """
        names = statement_keys(plan)
        if not names:
            return SealedStatement(sql)
        versions = self.key_versions(names)
        live = dict(versions)
        check_versions(plan, live)
        edits, arrays = lookup_edits(plan, live, self._seal_search_literal)
        for slot in plan.literals:
            if not covered(slot.start, slot.end, edits):
                edits.append((slot.start, slot.end, self._seal_literal(slot)))
        text = replace_spans(sql, edits) if edits else sql
        return SealedStatement(text, versions, arrays)

    def key_versions(self, names: tuple[str, ...]) -> KeyVersions:
        """Return the live versions of each key name, to compare with a statement's."""
        return tuple((name, self._keys.live_refs(name)) for name in names)

    def _seal_search_literal(self, search: SearchValue) -> list[str]:
        assert search.literal is not None
        keys = self._keys.live_keys(search.column)
        return [self._seal_literal(search.literal, key) for key in keys]

    def _seal_literal(self, slot: LiteralSlot, key: DataKey | None = None) -> str:
        column = slot.column
        try:
            plaintext = column.logical.from_wire(slot.value.encode("utf-8"), TEXT_FORMAT)
        except (ValueError, UnicodeError):
            raise _invalid_input(column) from None
        sealed = self._seal(column, plaintext, key)
        if column.storage is Storage.BYTEA:
            return quote_literal("\\x" + sealed.hex())
        return quote_literal(armour(sealed).decode("ascii"))

    def seal_param(
        self, column: EncryptedColumn, value: bytes, fmt: int, declared_oid: int = 0
    ) -> bytes:
        """Seal a parameter for the column's storage, in the same wire format.

        Text and bytea send their binary form as plain bytes, so the format
        code of the parameter never has to change. Raises ValueError on
        input the server would reject for the logical type.
        """
        plaintext = column.logical.from_wire(value, fmt, declared_oid)
        return self._wire_form(column, self._seal(column, plaintext), fmt)

    def seal_param_versions(
        self, column: EncryptedColumn, value: bytes, fmt: int, declared_oid: int = 0
    ) -> bytes:
        """Seal a parameter under every live version, as an array in the same format.

        For a lookup parameter that the statement compares with
        `= ANY($n::text[])` while the column's key has several live versions.
        """
        plaintext = column.logical.from_wire(value, fmt, declared_oid)
        elements = [
            self._wire_form(column, self._seal(column, plaintext, key), fmt)
            for key in self._keys.live_keys(column)
        ]
        return build_array(elements, column.storage_oid, fmt)

    def _wire_form(self, column: EncryptedColumn, sealed: bytes, fmt: int) -> bytes:
        if column.storage is Storage.TEXT:
            return armour(sealed)
        if fmt == BINARY_FORMAT:
            return sealed
        return b"\\x" + sealed.hex().encode()

    def seal_array_param(
        self, column: EncryptedColumn, value: bytes, fmt: int, declared_oid: int = 0
    ) -> bytes:
        """Seal every element of an array parameter, as for `col = ANY($1)`.

        Elements are read as the column's logical type; `declared_oid` is the
        array's own type and is not used.
        """
        if column.rule.encryption is Encryption.DETERMINISTIC:
            keys = self._keys.live_keys(column)
            if len(keys) > 1:
                # Each element matches under every live version.
                def seal_all(element: bytes) -> list[bytes]:
                    plaintext = column.logical.from_wire(element, fmt)
                    return [
                        self._wire_form(column, self._seal(column, plaintext, key), fmt)
                        for key in keys
                    ]

                if fmt == BINARY_FORMAT:
                    return flat_map_binary_array(value, seal_all)
                return flat_map_text_array(value, seal_all)
        if fmt == BINARY_FORMAT:
            return map_binary_array(value, lambda v: self.seal_param(column, v, fmt))
        return map_text_array(value, lambda v: self.seal_param(column, v, fmt))

    def _seal(
        self, column: EncryptedColumn, plaintext: bytes, key: DataKey | None = None
    ) -> bytes:
        if key is None:
            key = self._keys.active(column)
        store_id = self._keys.store_id
        return seal(key, plaintext, store_id=store_id, context=column.key_name)

    def row_plan(
        self, fields: tuple[Field, ...], outputs: tuple[Candidates, ...] | None = None
    ) -> RowPlan | None:
        """Return which fields of a row to open, and under which columns.

        A field named by table OID and attribute number is looked up in the
        catalog. A computed field (OID 0) falls back to the statement's own
        trace, when its output count matches the row description.
        """
        if outputs is not None and len(outputs) != len(fields):
            outputs = None
        plan = []
        for index, field in enumerate(fields):
            candidates = None
            if field.table_oid in self._oids:
                candidates = self.catalog.column_at(field.table_oid, field.column)
            elif field.table_oid == 0 and outputs is not None:
                candidates = outputs[index] or None
            if candidates:
                plan.append((index, candidates, field.format))
        return tuple(plan) or None

    def open_value(self, columns: Candidates, value: bytes, fmt: int) -> bytes | None:
        """Open a result value, or apply the column's on_decrypt_error setting.

        Raises DecryptionError or KeyringError only for `error`, the default.
        """
        try:
            return self._open_value(columns, value, fmt)
        except (DecryptionError, KeyringError):
            policy = columns[0].rule.on_decrypt_error
            if policy is OnDecryptError.NULL:
                return None
            if policy is OnDecryptError.CIPHERTEXT:
                return value
            raise

    def _open_value(self, columns: Candidates, value: bytes, fmt: int) -> bytes:
        column = columns[0]
        if column.storage is Storage.TEXT:
            blob = dearmour(value)
        elif fmt == BINARY_FORMAT:
            blob = value
        else:
            try:
                blob = decode_bytea_text(value)
            except ValueError:
                raise DecryptionError() from None
        plaintext = self._open(columns, blob)
        try:
            return column.logical.to_wire(plaintext, fmt)
        except (ValueError, UnicodeError, struct.error):
            raise DecryptionError() from None

    def _open(self, columns: Candidates, blob: bytes) -> bytes:
        key = self._keys.for_value(blob)
        store_id = self._keys.store_id
        for column in columns[:-1]:
            try:
                return open_sealed(blob, key, store_id=store_id, context=column.key_name)
            except DecryptionError:
                continue
        return open_sealed(blob, key, store_id=store_id, context=columns[-1].key_name)


def _invalid_input(column: EncryptedColumn) -> StatementRejected:
    return StatementRejected(
        "22P02",
        f"a literal for encrypted column {column.identity} is not valid "
        f"{column.logical.name} input",
        "Check the value's format; it is checked by the proxy before sealing.",
    )


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
