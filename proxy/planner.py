"""The bridge between the session and the crypto: seal and open wire values.

A value on the wire is in text or binary format. Text columns store the
armoured form, which is the same ASCII bytes in both formats. Bytea columns
store the binary form, which travels raw in binary format and as `\\x` hex in
text format.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import NoReturn

from proxy.catalog import Catalog, EncryptedColumn, Storage
from proxy.crypto.keystore import KeyCache, KeyRef
from proxy.crypto.subjects import (
    KeyRequest,
    KeysNeeded,
    StoredKeyRequest,
    SubjectKeyRequest,
    SubjectValue,
    UnavailableKeys,
    canonical_subject,
    subject_digest,
    subject_key_name,
)
from proxy.crypto.values import (
    Algorithm,
    DataKey,
    ValueCipher,
    armour,
    dearmour,
    read_key_ref,
    seal,
)
from proxy.errors import (
    AssociatedValuesMissing,
    DecryptionError,
    KeyringError,
    KeyUnavailableError,
    StatementRejected,
)
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
    TEXT_LIKE_OIDS,
    binary_element_type,
    build_array,
    flat_map_binary_array,
    flat_map_text_array,
    map_binary_array,
    map_text_array,
)
from proxy.sql.literals import LiteralSlot, quote_literal, replace_spans
from proxy.text_forms import DEFAULT_SETTINGS, TextSettings
from proxy.wire.messages import BINARY_FORMAT, TEXT_FORMAT, Field, format_code

Candidates = tuple[EncryptedColumn, ...]
# Per associated column of a bound field, the index and format of the field
# that contains its value in the same row. None means the row lacks them.
AssociatedFields = tuple[tuple[int, int], ...] | None
# The associated values of one row, as (wire value, format) pairs.
AssociatedRow = tuple[tuple[bytes | None, int], ...] | None
RowPlan = tuple[tuple[int, Candidates, int, AssociatedFields], ...]


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
    # The key store's HMAC key for subject values; empty when the view
    # cannot seal columns keyed per subject.
    subject_secret: bytes = dataclasses.field(default=b"", repr=False)
    # Keys that failed to load. Without it, a key missing from the cache is
    # an error at once. With it, KeysNeeded asks the caller to fetch the key.
    unavailable: UnavailableKeys | None = None

    def active(self, column: EncryptedColumn) -> DataKey:
        ref = self.cache.active_ref(column.key_name)
        key = self.cache.get(*ref) if ref is not None else None
        if key is None:
            raise KeyUnavailableError(
                f"no data key is loaded for column {column.identity}"
            )
        # Each call seals one value. For randomized columns the count feeds
        # max_values_per_key, past which the proxy rolls a new version.
        if column.rule.encryption is Encryption.RANDOMIZED:
            self.cache.note_sealed(column.key_name, (key.key_id, key.version))
        return key

    def sealer(self, column: EncryptedColumn) -> ValueCipher:
        """Return the cipher that seals the next value of column."""
        key_name = column.key_name
        cipher = self.cache.sealer(key_name, self.store_id)
        if cipher is None:
            raise KeyUnavailableError(
                f"no data key is loaded for column {column.identity}"
            )
        cache = self.cache
        if cache.max_values_per_key is not None and column.rule.encryption is Encryption.RANDOMIZED:
            key = cipher.key
            cache.note_sealed(key_name, (key.key_id, key.version))
        return cipher

    def live_refs(self, key_name: str) -> tuple[KeyRef, ...]:
        """Return the key name's versions that are not retired, oldest first."""
        return self.cache.live_refs(key_name)

    def live_sealers(self, column: EncryptedColumn) -> tuple[ValueCipher, ...]:
        """Return a cipher for each live version of the column's key, oldest first.

        A lookup seals its value under each of them. Raises KeysNeeded for
        live versions that are not cached yet, and KeyringError when one of
        them recently failed to load or no version is known.
        """
        ciphers = []
        missing = []
        for ref in self.cache.live_refs(column.key_name):
            cipher = self.cache.version_sealer(ref, column.key_name, self.store_id)
            if cipher is None:
                missing.append(StoredKeyRequest(*ref))
            else:
                ciphers.append(cipher)
        if missing:
            if self.unavailable is None:
                request = missing[0]
                raise KeyUnavailableError(
                    f"data key {request.key_id} version {request.version} of column "
                    f"{column.identity} is not loaded"
                )
            for request in missing:
                name = f"data key {request.key_id} version {request.version}"
                _raise_if_failed(self.unavailable, request, name)
            raise KeysNeeded(tuple(missing))
        if not ciphers:
            raise KeyUnavailableError(
                f"no data key is loaded for column {column.identity}"
            )
        return tuple(ciphers)

    def opener(self, blob: bytes, context: str) -> ValueCipher:
        """Return the cipher that opens blob under context (a key name)."""
        if not self.can_open:
            raise KeyringError("no configured keyring can unwrap, so no value opens")
        cipher = self.cache.opener(blob, context, self.store_id)
        if cipher is None:
            self._missing_stored_key(*read_key_ref(blob))
        return cipher

    def subject_key(self, column: EncryptedColumn, canonical: str) -> DataKey:
        """Return the active data key of one subject of a column keyed per subject.

        Raises KeysNeeded when it is not cached yet, and KeyringError when it
        recently failed to load or be created.
        """
        digest = subject_digest(self.subject_secret, canonical)
        key_name = subject_key_name(column.key_name, digest)
        ref = self.cache.active_ref(key_name)
        key = self.cache.get(*ref) if ref is not None else None
        if key is None:
            request = SubjectKeyRequest(key_name, column.key_name, digest, algorithm_of(column))
            if self.unavailable is None:
                raise KeyUnavailableError(
                    f"no data key is loaded for this subject of column "
                    f"{column.identity}: subject keys are not enabled"
                )
            _raise_if_failed(
                self.unavailable, request, f"the data key of this subject of {column.identity}"
            )
            raise KeysNeeded((request,))
        self.cache.note_sealed(key_name, (key.key_id, key.version))
        return key

    def for_value(self, blob: bytes) -> DataKey:
        if not self.can_open:
            raise KeyringError("no configured keyring can unwrap, so no value opens")
        key_id, version = read_key_ref(blob)
        key = self.cache.get(key_id, version)
        if key is None:
            self._missing_stored_key(key_id, version)
        return key

    def _missing_stored_key(self, key_id: int, version: int) -> NoReturn:
        """Raise KeysNeeded for a data key to fetch, or why it cannot be had."""
        what = f"data key {key_id} version {version}"
        if self.unavailable is None:
            raise KeyUnavailableError(f"{what} is not loaded")
        request = StoredKeyRequest(key_id, version)
        _raise_if_failed(self.unavailable, request, what)
        raise KeysNeeded((request,))


def _raise_if_failed(unavailable: UnavailableKeys, request: KeyRequest, what: str) -> None:
    """Raise for a key that recently failed to load, else return.

    A key the key store no longer has, as after a shred, raises KeyringError,
    so the value fails like any value that does not open. A key that may load
    later, as when the KMS is unreachable, raises KeyUnavailableError.
    """
    reason = unavailable.reason(request)
    if reason is None:
        return
    if unavailable.gone(request):
        raise KeyringError(f"{what} is not available: {reason}")
    raise KeyUnavailableError(f"{what} is not available: {reason}")


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

    def statement(
        self,
        sql: str,
        search_path: tuple[str, ...] | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> StatementPlan:
        return self._analyzer.plan(sql, search_path, absent)

    def seal_statement(
        self, sql: str, plan: StatementPlan, encoding: str = "utf-8"
    ) -> SealedStatement:
        """Seal the literals of `sql` and rewrite its lookups for the live key versions.

        A literal's plaintext is its value in the client's `encoding` (a
        Python codec name), the bytes that a parameter would carry. Raises
        StatementRejected for a join, grouping or deduplication on a
        deterministic column whose key has several live versions.
        """
        names = statement_keys(plan)
        if not names:
            return SealedStatement(sql)
        versions = self.key_versions(names)
        live = dict(versions)
        check_versions(plan, live)
        edits, arrays = lookup_edits(
            plan, live, lambda search: self._seal_search_literal(search, encoding)
        )
        for slot in plan.literals:
            if not covered(slot.start, slot.end, edits):
                edits.append((slot.start, slot.end, self._seal_literal(slot, encoding)))
        text = replace_spans(sql, edits) if edits else sql
        return SealedStatement(text, versions, arrays)

    def key_versions(self, names: tuple[str, ...]) -> KeyVersions:
        """Return the live versions of each key name, to compare with a statement's."""
        return tuple((name, self._keys.live_refs(name)) for name in names)

    def _seal_search_literal(self, search: SearchValue, encoding: str) -> list[str]:
        assert search.literal is not None
        ciphers = self._keys.live_sealers(search.column)
        return [self._seal_literal(search.literal, encoding, cipher) for cipher in ciphers]

    def _seal_literal(
        self, slot: LiteralSlot, encoding: str, cipher: ValueCipher | None = None
    ) -> str:
        """Seal one literal, under `cipher` if given, else as the column seals values."""
        column = slot.column
        if slot.array:
            return self._seal_array_literal(slot, encoding)
        value = _client_bytes(slot.value, encoding, column)
        try:
            plaintext = column.logical.from_wire(value, TEXT_FORMAT)
        except (ValueError, UnicodeError):
            raise _invalid_input(column) from None
        subject = None
        if slot.subject is not None:
            if slot.subject.literal is None:
                raise StatementRejected(
                    "0A000",
                    f"a literal for column {column.identity}, which is keyed per "
                    f"subject, takes its subject {column.subject_column} from "
                    f"parameter ${slot.subject.param}, whose value is not known "
                    "when the literal is sealed",
                    "Send the value as a parameter too, or the subject as a literal.",
                )
            subject_value = _client_bytes(slot.subject.literal, encoding, column)
            subject = SubjectValue(subject_value, TEXT_FORMAT)
        associated = self._literal_associated(slot, encoding)
        if cipher is None:
            sealed = self._seal(column, plaintext, associated, subject)
        else:
            sealed = cipher.seal(plaintext, associated)
        if column.storage is Storage.BYTEA:
            return quote_literal("\\x" + sealed.hex())
        return quote_literal(armour(sealed).decode("ascii"))

    def _seal_array_literal(self, slot: LiteralSlot, encoding: str) -> str:
        literal = _client_bytes(slot.value, encoding, slot.column)
        try:
            sealed = self.seal_array_param(slot.column, literal, TEXT_FORMAT)
        except (ValueError, UnicodeError):
            raise _invalid_input(slot.column) from None
        return quote_literal(sealed.decode("ascii"))

    @staticmethod
    def _literal_associated(slot: LiteralSlot, encoding: str) -> tuple[bytes | None, ...]:
        values = []
        for source in slot.associated:
            text = None
            if source.literal is not None:
                text = _client_bytes(source.literal, encoding, slot.column)
            try:
                values.append(source.column.canonical(text, TEXT_FORMAT))
            except (ValueError, UnicodeError):
                raise StatementRejected(
                    "22P02",
                    f"a literal for column {source.column.name}, which "
                    f"{slot.column.identity} is bound to, is not valid "
                    f"{source.column.type.name} input",
                    "Check the value's format; it is checked by the proxy before sealing.",
                ) from None
        return tuple(values)

    def seal_param(
        self,
        column: EncryptedColumn,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        associated: tuple[bytes | None, ...] = (),
        subject: SubjectValue | None = None,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes:
        """Seal a parameter for the column's storage, in the same wire format.

        Text and bytea send their binary form as plain bytes, so the format
        code of the parameter never has to change. `associated` contains the
        canonical values of the column's associated columns in the row, and
        `subject` is the row's subject value, for a column keyed per subject.
        `settings` are the session's, for the text form of a binary value.
        Raises ValueError on input the server would reject for the logical
        type, and UnconvertibleParameter for a binary type it cannot read.
        """
        plaintext = column.logical.from_wire(value, fmt, declared_oid, settings)
        sealed = self._seal(column, plaintext, associated, subject)
        return self._wire_form(column, sealed, fmt)

    def seal_param_versions(
        self,
        column: EncryptedColumn,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes:
        """Seal a parameter under every live version, as an array in the same format.

        For a lookup parameter that the statement compares with
        `= ANY($n::text[])` while the column's key has several live versions.
        Deterministic columns have no associated columns and no subject, so
        the value is sealed without them.
        """
        plaintext = column.logical.from_wire(value, fmt, declared_oid, settings)
        elements = [
            self._wire_form(column, cipher.seal(plaintext), fmt)
            for cipher in self._keys.live_sealers(column)
        ]
        return build_array(elements, column.storage_oid, fmt)

    @staticmethod
    def _wire_form(column: EncryptedColumn, sealed: bytes, fmt: int) -> bytes:
        if column.storage is Storage.TEXT:
            return armour(sealed)
        if fmt == BINARY_FORMAT:
            return sealed
        return b"\\x" + sealed.hex().encode()

    def seal_array_param(
        self,
        column: EncryptedColumn,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes:
        """Seal every element of an array parameter, as for `col = ANY($1)`.

        Elements are read as the column's logical type; `declared_oid` is the
        array's own type and is not used. A binary array reads its elements
        by the element type in its header, and leaves with the storage type
        there unless its elements are already text-like for a text column.
        """
        if fmt != BINARY_FORMAT:
            return map_text_array(
                value, lambda v: self.seal_param(column, v, fmt, settings=settings)
            )
        element_oid = binary_element_type(value)
        stored_oid = column.storage_oid
        if column.storage is Storage.TEXT and element_oid in TEXT_LIKE_OIDS:
            stored_oid = element_oid
        return map_binary_array(
            value,
            lambda v: self.seal_param(column, v, fmt, element_oid, settings=settings),
            stored_oid,
        )

    def seal_lookup_array(
        self,
        column: EncryptedColumn,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes:
        """Seal an array compared with ANY or ALL, so that it matches every live version.

        While a deterministic column's key has several live versions, each
        element becomes one element per version, so `col = ANY($1)` finds rows
        sealed under any of them. Otherwise it is sealed as seal_array_param
        does. An array stored by a batch INSERT must go through
        seal_array_param instead, which keeps one element per row.
        """
        live = self._keys.live_refs(column.key_name)
        if column.rule.encryption is not Encryption.DETERMINISTIC or len(live) <= 1:
            return self.seal_array_param(column, value, fmt, declared_oid, settings)
        ciphers = self._keys.live_sealers(column)
        element_oid = 0
        stored_oid = column.storage_oid
        if fmt == BINARY_FORMAT:
            element_oid = binary_element_type(value)
            if column.storage is Storage.TEXT and element_oid in TEXT_LIKE_OIDS:
                stored_oid = element_oid

        def seal_all(element: bytes) -> list[bytes]:
            plaintext = column.logical.from_wire(element, fmt, element_oid, settings)
            return [
                self._wire_form(column, cipher.seal(plaintext), fmt) for cipher in ciphers
            ]

        if fmt == BINARY_FORMAT:
            return flat_map_binary_array(value, seal_all, stored_oid)
        return flat_map_text_array(value, seal_all)

    def _seal(
        self,
        column: EncryptedColumn,
        plaintext: bytes,
        associated: tuple[bytes | None, ...] = (),
        subject: SubjectValue | None = None,
    ) -> bytes:
        if len(associated) != len(column.associated):
            raise ValueError(
                f"column {column.identity} needs {len(column.associated)} associated "
                f"values, got {len(associated)}"
            )
        if column.subject_column is None:
            return self._keys.sealer(column).seal(plaintext, associated)
        key = self._keys.subject_key(column, _canonical_subject(column, subject))
        return seal(
            key,
            plaintext,
            store_id=self._keys.store_id,
            context=column.key_name,
            associated=associated,
        )

    def row_plan(
        self,
        fields: tuple[Field, ...],
        outputs: tuple[Candidates, ...] | None = None,
        formats: tuple[int, ...] = (),
        associations: dict[int, tuple[int, ...]] | None = None,
    ) -> RowPlan | None:
        """Return which fields of a row to open, and under which columns.

        A field named by table OID and attribute number is looked up in the
        catalog. A computed field (OID 0) falls back to the statement's own
        trace, when its output count matches the row description. `formats`
        are the result formats of a Bind, when they are not yet in `fields`.
        `associations` gives, per field of a bound column, the fields of
        its associated values, as the statement's analysis traced them.
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
                fmt = format_code(formats, index) if formats else field.format
                associated = _associated_fields(
                    candidates, index, fields, formats, associations
                )
                plan.append((index, candidates, fmt, associated))
        return tuple(plan) or None

    def open_value(
        self,
        columns: Candidates,
        value: bytes,
        fmt: int,
        associated: AssociatedRow = (),
    ) -> bytes | None:
        """Open a result value, or apply the column's on_decrypt_error setting.

        `associated` contains the row's values of the column's associated
        columns. None means the row lacks them, so the value cannot open.
        Raises DecryptionError or KeyringError only for `error`, the default.
        """
        try:
            return self._open_value(columns, value, fmt, associated)
        except (DecryptionError, KeyringError):
            policy = columns[0].rule.on_decrypt_error
            if policy is OnDecryptError.NULL:
                return None
            if policy is OnDecryptError.CIPHERTEXT:
                return value
            raise

    def _open_value(
        self, columns: Candidates, value: bytes, fmt: int, associated: AssociatedRow
    ) -> bytes:
        column = columns[0]
        bound = _canonical_associated(columns, associated)
        if column.storage is Storage.TEXT:
            blob = dearmour(value)
        elif fmt == BINARY_FORMAT:
            blob = value
        else:
            try:
                blob = decode_bytea_text(value)
            except ValueError:
                raise DecryptionError() from None
        plaintext = self._open(columns, blob, bound)
        try:
            return column.logical.to_wire(plaintext, fmt)
        except (ValueError, UnicodeError, struct.error):
            raise DecryptionError() from None

    def _open(
        self, columns: Candidates, blob: bytes, associated: tuple[bytes | None, ...] = ()
    ) -> bytes:
        keys = self._keys
        if len(columns) == 1:
            return keys.opener(blob, columns[0].key_name).open(blob, associated)
        for column in columns[:-1]:
            try:
                return keys.opener(blob, column.key_name).open(blob, associated)
            except DecryptionError:
                continue
        return keys.opener(blob, columns[-1].key_name).open(blob, associated)


def _associated_fields(
    candidates: Candidates,
    index: int,
    fields: tuple[Field, ...],
    formats: tuple[int, ...],
    associations: dict[int, tuple[int, ...]] | None,
) -> AssociatedFields:
    """Return where a bound field's associated values are in the row, if known."""
    if not any(column.associated for column in candidates):
        return ()
    indexes = (associations or {}).get(index)
    if indexes is None or any(i >= len(fields) for i in indexes):
        return None
    return tuple(
        (i, format_code(formats, i) if formats else fields[i].format) for i in indexes
    )


def _canonical_associated(
    columns: Candidates, associated: AssociatedRow
) -> tuple[bytes | None, ...]:
    """Return the canonical associated values of a row, or raise DecryptionError.

    Every candidate must bind the same associated columns, because only one
    set of values is read from the row.
    """
    expected = columns[0].associated
    if len(columns) > 1 and any(c.associated != expected for c in columns[1:]):
        raise DecryptionError()
    if not expected:
        return ()
    if associated is None:
        raise AssociatedValuesMissing(columns[0].identity)
    if len(associated) != len(expected):
        raise DecryptionError()
    try:
        return tuple(
            column.canonical(value, fmt)
            for column, (value, fmt) in zip(expected, associated)
        )
    except (ValueError, UnicodeError, struct.error):
        raise DecryptionError() from None


def _canonical_subject(column: EncryptedColumn, subject: SubjectValue | None) -> str:
    if subject is None:
        raise StatementRejected(
            "0A000",
            f"column {column.identity} is keyed per subject, but the row's subject "
            f"{column.subject_column} is NULL or missing, so no data key can seal "
            "the value",
            f"Set {column.subject_column} to a non-null value in the same statement.",
        )
    try:
        return canonical_subject(column.subject_type, subject.raw, subject.format)
    except (ValueError, UnicodeError):
        raise StatementRejected(
            "22P02",
            f"the subject {column.subject_column} of column {column.identity} is "
            "not valid input for its type",
            "Check the value's format; the proxy reads it to choose the data key.",
        ) from None


def _client_bytes(text: str, encoding: str, column: EncryptedColumn) -> bytes:
    """Encode a literal's value as the client sent it, in its client_encoding."""
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        # A Unicode escape in an E'' literal can name a character that the
        # client encoding lacks.
        raise StatementRejected(
            "22P05",
            f"a literal for encrypted column {column.identity} has a character "
            f"that the client encoding ({encoding}) cannot represent",
            "Write the value in the client encoding, or send it as a parameter.",
        ) from None


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
