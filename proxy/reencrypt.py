"""Re-encryption: move a table's sealed values to the newest data key versions.

`pgseal reencrypt` walks the table in primary key order, in short batches.
Each batch is one transaction that locks its rows (SELECT ... FOR UPDATE),
opens every value sealed under an older version with the proxy's own code,
seals it again under the active version and writes it back. The last
primary key done is stored in `pgseal.reencrypt_progress`, in the same
transaction as the batch, so an interrupted run resumes where it stopped.

A value is rewritten only when it opens as a sealed value of its own column.
Anything else (a value that does not open, or one sealed under a retired or
unknown version) is reported and left as it is. A value without the pgseal
prefix is sealed as plaintext only with `seal_plaintext`, which is meant for a
column that was just put under a rule. Without it, such a value is reported
too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.audit import KeyVersionRef, audit_operation
from proxy.catalog import Catalog, EncryptedColumn, RuledTable, Storage
from proxy.crypto.keystore import KeyStore
from proxy.crypto.values import (
    ARMOUR_PREFIX,
    MAGIC,
    armour,
    dearmour,
    open_sealed,
    read_key_ref,
    seal,
)
from proxy.errors import ConfigError, DecryptionError, KeyringError, UpstreamError
from proxy.planner import ColumnPlanner, KeyView, algorithm_of
from proxy.progress import ProgressBar
from proxy.wire.messages import BINARY_FORMAT, TEXT_FORMAT

__all__ = ["ReencryptOptions", "ReencryptReport", "Reencryptor", "count_key_versions"]

log = logging.getLogger(__name__)

MAX_REPORTED = 100
"""Skipped values listed one by one; later ones are only counted."""

# The server aborts one side of a deadlock with the application's writes, and
# the batch then runs again from its start.
_DEADLOCK_RETRIES = 3

# Class id of the session advisory lock (class id, hashtext(table)) that keeps
# two runs from working on one table at once. Key creation uses 0x70677301.
_RUN_LOCK_CLASS = 0x7067_7302

_PROGRESS_SQL = """
CREATE SCHEMA IF NOT EXISTS pgseal;
CREATE TABLE IF NOT EXISTS pgseal.reencrypt_progress (
    table_name text PRIMARY KEY,
    last_key text[],
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
"""

_PRIMARY_KEY_SQL = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY array_position(i.indkey::int2[], a.attnum)
"""

_MISSING_PRIVILEGES_SQL = """
SELECT quote_ident(current_user) AS login,
       format('%I.%I', $4::text, $5::text) AS relation,
       needed.name, needed.privilege
FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS needed(name, privilege, n)
WHERE NOT pg_catalog.has_column_privilege($1::oid, needed.name, needed.privilege)
ORDER BY needed.n
"""


@dataclass(frozen=True, slots=True)
class ReencryptOptions:
    batch_size: int = 500
    max_rows_per_second: float | None = None
    seal_plaintext: bool = False
    max_batches: int | None = None
    """Stop after this many batches, leaving the run to resume; None for no limit."""
    restart: bool = False
    """Start from the first row even if an earlier run was interrupted."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_rows_per_second is not None and self.max_rows_per_second <= 0:
            raise ConfigError(
                f"max rows per second must be positive, got {self.max_rows_per_second}"
            )
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"max batches must be at least 1, got {self.max_batches}")


@dataclass(frozen=True, slots=True)
class SkippedValue:
    """A stored value left unchanged, with the reason."""

    row: str
    """The row's primary key, as (id)=(42)."""
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column}: {self.reason}"


@dataclass
class ReencryptReport:
    table: str
    total_rows: int = 0
    rows_done: int = 0
    """Rows scanned, by this run and by the interrupted runs it resumed."""
    scanned: int = 0
    resealed: int = 0
    sealed_plaintext: int = 0
    current: int = 0
    skipped: list[SkippedValue] = field(default_factory=list)
    skipped_count: int = 0
    batches: int = 0
    finished: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows_scanned": self.scanned,
            "values_resealed": self.resealed,
            "plaintext_sealed": self.sealed_plaintext,
            "values_current": self.current,
            "values_skipped": self.skipped_count,
            "batches": self.batches,
            "finished": self.finished,
        }


@dataclass(frozen=True, slots=True)
class _Change:
    column: EncryptedColumn
    value: str | bytes
    kind: str
    """"resealed" or "plaintext"."""


class Reencryptor:
    """Re-encrypts one ruled table; run() does the whole job."""

    def __init__(
        self,
        conn: asyncpg.Connection[asyncpg.Record],
        keystore: KeyStore,
        catalog: Catalog,
        table: RuledTable,
        view: KeyView,
        options: ReencryptOptions,
        progress: ProgressBar | None = None,
    ) -> None:
        self._conn = conn
        self._keystore = keystore
        self._table = table
        self._columns = tuple(table.encrypted.values())
        self._view = view
        self._planner = ColumnPlanner(catalog, view)
        self._options = options
        self._progress = progress
        self._pk: list[tuple[str, str]] = []
        self.report = ReencryptReport(table.qualified_name)

    async def run(self) -> ReencryptReport:
        targets = await self._load_keys()
        names = sorted({column.key_name for column in self._columns})
        table = {"table": self._table.qualified_name}
        audit = self._keystore.audit
        with audit_operation(
            audit, "reencrypt_start", key_names=names, details=table
        ) as record:
            record.keys.extend(targets)
            last_key = await self._prepare()
            record.details["resumed"] = last_key is not None
            record.details["total_rows"] = self.report.total_rows
        with audit_operation(audit, "reencrypt_finish", key_names=names) as record:
            record.keys.extend(targets)
            try:
                await self._batches(last_key)
            finally:
                record.details.update(self.report.summary())
        return self.report

    async def _load_keys(self) -> list[KeyVersionRef]:
        """Load every usable version of the columns' keys; return the active ones."""
        targets = []
        for column in self._columns:
            key = await self._keystore.active_key(column.key_name, algorithm_of(column))
            targets.append(KeyVersionRef(column.key_name, key.key_id, key.version))
        await self._keystore.load_keys(column.key_name for column in self._columns)
        return targets

    async def _prepare(self) -> list[str] | None:
        """Read the primary key and the progress row; return where to resume."""
        conn = self._conn
        table_name = self._table.qualified_name
        self._pk = [
            (row["attname"], row["type"])
            for row in await conn.fetch(_PRIMARY_KEY_SQL, self._table.oid)
        ]
        if not self._pk:
            raise ConfigError(
                f"table {self._table.qualified_name} has no primary key, which "
                "reencrypt needs to walk the table in batches and to resume"
            )
        await self._check_privileges()
        locked = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", _RUN_LOCK_CLASS, table_name
        )
        if not locked:
            raise ConfigError(
                f"another pgseal reencrypt is running on {table_name}; wait for it "
                "to finish, or stop it first"
            )
        await conn.execute(_PROGRESS_SQL)
        row = await conn.fetchrow(
            "SELECT last_key, rows_done, finished_at FROM pgseal.reencrypt_progress "
            "WHERE table_name = $1",
            self._table.qualified_name,
        )
        resume = (
            row is not None
            and row["finished_at"] is None
            and row["last_key"] is not None
            and not self._options.restart
        )
        self.report.total_rows = await conn.fetchval(
            f"SELECT count(*) FROM {self._relation()}"
        )
        if resume:
            assert row is not None
            self.report.rows_done = row["rows_done"]
            log.info(
                "resuming reencrypt of %s after %d rows",
                self._table.qualified_name,
                row["rows_done"],
            )
            return list(row["last_key"])
        await conn.execute(
            "INSERT INTO pgseal.reencrypt_progress (table_name) VALUES ($1) "
            "ON CONFLICT (table_name) DO UPDATE SET last_key = NULL, rows_done = 0, "
            "started_at = now(), updated_at = now(), finished_at = NULL",
            self._table.qualified_name,
        )
        return None

    async def _check_privileges(self) -> None:
        """Raise UpstreamError naming each privilege the login lacks on the table.

        Checked per column, so that column-level grants are enough.
        """
        read = [name for name, _ in self._pk]
        read += [column.name for column in self._columns]
        read += [o.name for column in self._columns for o in column.associated]
        needed = [(name, "SELECT") for name in dict.fromkeys(read)]
        needed += [(column.name, "UPDATE") for column in self._columns]
        rows = await self._conn.fetch(
            _MISSING_PRIVILEGES_SQL,
            self._table.oid,
            [name for name, _ in needed],
            [privilege for _, privilege in needed],
            self._table.schema,
            self._table.name,
        )
        if not rows:
            return
        missing: dict[str, list[str]] = {}
        for row in rows:
            missing.setdefault(row["privilege"], []).append(row["name"])
        details = "; ".join(
            f"{privilege} on columns {', '.join(names)}"
            for privilege, names in missing.items()
        )
        login = rows[0]["login"]
        raise UpstreamError(
            f"the login {login} in --upstream lacks privileges on table "
            f"{self._table.qualified_name}: {details}. pgseal reencrypt reads and "
            "rewrites the rows, so grant them, for example: GRANT SELECT, UPDATE "
            f"ON {rows[0]['relation']} TO {login}"
        )

    async def _batches(self, last_key: list[str] | None) -> None:
        options = self._options
        started = time.monotonic()
        try:
            while (
                options.max_batches is None or self.report.batches < options.max_batches
            ):
                last_key = await self._batch(last_key)
                if last_key is None:
                    await self._finish()
                    break
                self.report.batches += 1
                self._show(started)
                await self._throttle(started)
            self._show(started, force=True)
        finally:
            if self._progress is not None:
                self._progress.close()

    async def _batch(self, last_key: list[str] | None) -> list[str] | None:
        """Re-encrypt one batch in one transaction; return its last key, None at the end."""
        per_row = False
        for attempt in range(1, _DEADLOCK_RETRIES + 1):
            try:
                async with self._conn.transaction():
                    return await self._batch_in_transaction(last_key, per_row=per_row)
            except asyncpg.UniqueViolationError:
                # Two rows now seal equal values alike: write row by row, so
                # that only the rows in conflict are skipped.
                per_row = True
            except asyncpg.DeadlockDetectedError:
                if attempt == _DEADLOCK_RETRIES:
                    raise
                log.warning(
                    "reencrypt of %s: deadlock with another transaction, "
                    "retrying the batch",
                    self._table.qualified_name,
                )
        async with self._conn.transaction():
            return await self._batch_in_transaction(last_key, per_row=True)

    async def _batch_in_transaction(
        self, last_key: list[str] | None, *, per_row: bool
    ) -> list[str] | None:
        params: list[Any] = list(last_key or [])
        rows = await self._conn.fetch(
            self._select_sql(last_key is not None), *params, self._options.batch_size
        )
        if not rows:
            return None
        counts = _Counts()
        for row in rows:
            changes = self._plan_row(row, counts)
            if changes:
                await self._write_row(row, changes, counts, per_row=per_row)
        new_last = [row[f"pgseal_pk_{i}"] for i in range(len(self._pk))]
        await self._conn.execute(
            "UPDATE pgseal.reencrypt_progress SET last_key = $2, "
            "rows_done = rows_done + $3, updated_at = now() WHERE table_name = $1",
            self._table.qualified_name,
            new_last,
            len(rows),
        )
        # Count only once the batch is certain to commit with this attempt.
        counts.add_to(self.report, len(rows))
        return new_last

    def _plan_row(self, row: asyncpg.Record, counts: _Counts) -> list[_Change]:
        changes = []
        for index, column in enumerate(self._columns):
            value = row[f"pgseal_col_{index}"]
            if value is None:
                continue
            try:
                associated = _associated_values(row, index, column)
                change = self._plan_value(column, value, associated)
            except _Skip as skip:
                counts.skip(
                    SkippedValue(self._row_label(row), column.identity, str(skip))
                )
                continue
            if change is None:
                counts.current += 1
            else:
                changes.append(change)
        return changes

    def _plan_value(
        self,
        column: EncryptedColumn,
        value: str | bytes,
        associated: tuple[bytes | None, ...] = (),
    ) -> _Change | None:
        """Return the change for one stored value, None if it is current.

        Raises _Skip for a value that must stay as it is.
        """
        raw = value.encode("utf-8") if isinstance(value, str) else value
        prefix = ARMOUR_PREFIX if column.storage is Storage.TEXT else MAGIC
        if not raw.startswith(prefix):
            return self._plan_plaintext(column, raw, associated)

        try:
            blob = dearmour(raw) if column.storage is Storage.TEXT else raw
            active = self._view.active(column)
            current = read_key_ref(blob) == (active.key_id, active.version)
            plaintext, bound = self._open_migrating(column, blob, associated)
            if current and bound:
                return None
        except DecryptionError:
            raise _Skip(
                "the value does not open as a sealed value of this column"
            ) from None
        except KeyringError as exc:
            raise _Skip(f"its data key is not available: {exc}") from None
        sealed = seal(
            active,
            plaintext,
            store_id=self._view.store_id,
            context=column.key_name,
            associated=associated,
        )
        stored = (
            armour(sealed).decode("ascii") if column.storage is Storage.TEXT else sealed
        )
        return _Change(column, stored, "resealed")

    def _plan_plaintext(
        self, column: EncryptedColumn, raw: bytes, associated: tuple[bytes | None, ...]
    ) -> _Change:
        if not self._options.seal_plaintext:
            raise _Skip(
                "the value is not sealed; if the column was just put under a rule, "
                "run again with --seal-plaintext to seal such values"
            )
        if column.storage is Storage.TEXT:
            fmt = TEXT_FORMAT
        elif column.logical.name == "bytea":
            fmt = BINARY_FORMAT
        else:
            raise _Skip(
                f"plaintext stored as bytea cannot be read as {column.logical.name}"
            )
        try:
            sealed = self._planner.seal_param(column, raw, fmt, associated=associated)
        except (ValueError, UnicodeError):
            raise _Skip(
                f"the plaintext is not valid {column.logical.name} input"
            ) from None
        stored: str | bytes = sealed.decode("ascii") if fmt == TEXT_FORMAT else sealed
        return _Change(column, stored, "plaintext")

    def _open_migrating(
        self, column: EncryptedColumn, blob: bytes, associated: tuple[bytes | None, ...]
    ) -> tuple[bytes, bool]:
        """Open a value and return its plaintext and whether it binds `associated`.

        A value sealed before its rule named associated columns binds no row
        values. It opens without them here, and only here, so that it can be
        sealed again with them. The proxy never opens such a value.
        """
        try:
            return self._open(column, blob, associated), True
        except DecryptionError:
            if not associated:
                raise
        return self._open(column, blob, ()), False

    def _open(
        self, column: EncryptedColumn, blob: bytes, associated: tuple[bytes | None, ...]
    ) -> bytes:
        key = self._view.for_value(blob)
        return open_sealed(
            blob,
            key,
            store_id=self._view.store_id,
            context=column.key_name,
            associated=associated,
        )

    async def _write_row(
        self,
        row: asyncpg.Record,
        changes: list[_Change],
        counts: _Counts,
        *,
        per_row: bool,
    ) -> None:
        assignments = ", ".join(
            f"{_quote(change.column.name)} = ${index}"
            for index, change in enumerate(changes, start=1)
        )
        where = self._pk_match(len(changes) + 1)
        sql = f"UPDATE {self._relation()} SET {assignments} WHERE {where}"
        args = [change.value for change in changes]
        args += [row[f"pgseal_pk_{i}"] for i in range(len(self._pk))]
        if not per_row:
            await self._conn.execute(sql, *args)
            counts.changed(changes)
            return
        try:
            async with self._conn.transaction():
                await self._conn.execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            columns = ", ".join(change.column.identity for change in changes)
            counts.skip(
                SkippedValue(
                    self._row_label(row),
                    columns,
                    f"the new value breaks {exc.constraint_name or 'a unique constraint'}, "
                    "because another row holds an equal value",
                )
            )
            return
        counts.changed(changes)

    async def _finish(self) -> None:
        await self._conn.execute(
            "UPDATE pgseal.reencrypt_progress SET last_key = NULL, "
            "finished_at = now(), updated_at = now() WHERE table_name = $1",
            self._table.qualified_name,
        )
        self.report.finished = True

    def _show(self, started: float, *, force: bool = False) -> None:
        if self._progress is not None:
            report = self.report
            elapsed = time.monotonic() - started
            self._progress.update(
                report.rows_done,
                report.total_rows,
                report.scanned,
                elapsed,
                force=force,
            )

    async def _throttle(self, started: float) -> None:
        rate = self._options.max_rows_per_second
        if rate is None:
            return
        ahead = self.report.scanned / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _select_sql(self, after: bool) -> str:
        pk_text = ", ".join(
            f"{_quote(name)}::text AS pgseal_pk_{i}"
            for i, (name, _) in enumerate(self._pk)
        )
        values = ", ".join(
            f"{_quote(column.name)} AS pgseal_col_{i}"
            for i, column in enumerate(self._columns)
        )
        # Associated columns are read as text, the form canonical() takes.
        values += "".join(
            f", {_quote(other.name)}::text AS pgseal_assoc_{i}_{k}"
            for i, column in enumerate(self._columns)
            for k, other in enumerate(column.associated)
        )
        order = ", ".join(_quote(name) for name, _ in self._pk)
        where = f"WHERE ({order}) > ({self._pk_params(1)})" if after else ""
        limit = len(self._pk) + 1 if after else 1
        return (
            f"SELECT {pk_text}, {values} FROM {self._relation()} {where} "
            f"ORDER BY {order} LIMIT ${limit} FOR UPDATE"
        )

    def _pk_match(self, first: int) -> str:
        columns = ", ".join(_quote(name) for name, _ in self._pk)
        return f"({columns}) = ({self._pk_params(first)})"

    def _pk_params(self, first: int) -> str:
        return ", ".join(
            f"${first + i}::text::{type_name}"
            for i, (_, type_name) in enumerate(self._pk)
        )

    def _relation(self) -> str:
        return f"{_quote(self._table.schema)}.{_quote(self._table.name)}"

    def _row_label(self, row: asyncpg.Record) -> str:
        names = ", ".join(name for name, _ in self._pk)
        values = ", ".join(str(row[f"pgseal_pk_{i}"]) for i in range(len(self._pk)))
        return f"({names})=({values})"


class _Skip(Exception):
    """A stored value that stays as it is, with the reason as the message."""


@dataclass
class _Counts:
    """Counts of one batch attempt, added to the report only if the batch commits."""

    resealed: int = 0
    plaintext: int = 0
    current: int = 0
    skipped: list[SkippedValue] = field(default_factory=list)

    def changed(self, changes: Sequence[_Change]) -> None:
        for change in changes:
            if change.kind == "plaintext":
                self.plaintext += 1
            else:
                self.resealed += 1

    def skip(self, value: SkippedValue) -> None:
        self.skipped.append(value)

    def add_to(self, report: ReencryptReport, rows: int) -> None:
        report.scanned += rows
        report.rows_done += rows
        report.resealed += self.resealed
        report.sealed_plaintext += self.plaintext
        report.current += self.current
        report.skipped_count += len(self.skipped)
        room = MAX_REPORTED - len(report.skipped)
        report.skipped.extend(self.skipped[: max(0, room)])


async def count_key_versions(
    conn: asyncpg.Connection[asyncpg.Record], table: RuledTable, column: EncryptedColumn
) -> dict[tuple[int, int] | None, int]:
    """Count a column's non-null values by the (key_id, version) in their header.

    Values without a readable pgseal header count under None. The header is
    read on the server, so the values never leave it.
    """
    name = _quote(column.name)
    if column.storage is Storage.TEXT:
        # The first 16 base64url characters after "pgs:" encode 12 bytes,
        # which start with the 10-byte header.
        header = (
            f"CASE WHEN {name} ~ '^pgs:[A-Za-z0-9_-]{{16}}' THEN "
            f"decode(translate(substr({name}, 5, 16), '-_', '+/'), 'base64') END"
        )
    else:
        header = (
            f"CASE WHEN substr({name}, 1, 3) = '\\xff5053'::bytea "
            f"AND length({name}) >= 13 THEN substr({name}, 4, 10) END"
        )
    sql = f"""
        SELECT {_uint32("h", 2)} AS key_id, {_uint32("h", 6)} AS version,
               count(*) AS n
        FROM (SELECT {header} AS h
              FROM {_quote(table.schema)}.{_quote(table.name)}
              WHERE {name} IS NOT NULL) AS headers
        GROUP BY 1, 2
    """
    counts: dict[tuple[int, int] | None, int] = {}
    for row in await conn.fetch(sql):
        ref = None if row["key_id"] is None else (row["key_id"], row["version"])
        counts[ref] = counts.get(ref, 0) + row["n"]
    return counts


def _uint32(column: str, offset: int) -> str:
    parts = " | ".join(
        f"(get_byte({column}, {offset + i})::bigint << {24 - 8 * i})" for i in range(4)
    )
    return f"({parts})"


def _associated_values(
    row: asyncpg.Record, index: int, column: EncryptedColumn
) -> tuple[bytes | None, ...]:
    """Return the canonical values of a column's associated columns in `row`.

    Raises _Skip when one is not valid input for its type.
    """
    values = []
    for k, other in enumerate(column.associated):
        text = row[f"pgseal_assoc_{index}_{k}"]
        try:
            values.append(
                other.canonical(None if text is None else text.encode("utf-8"), TEXT_FORMAT)
            )
        except (ValueError, UnicodeError):
            raise _Skip(
                f"its associated column {other.name} contains a value that is not "
                f"valid {other.type.name} input"
            ) from None
    return tuple(values)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
