"""`pgseal rules check`: validate rule files against the live catalog.

Unlike the proxy's start, which stops at the first problem, the check reports
every problem it finds, so an operator can fix a rules folder in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from proxy.catalog import RuledTable, load_catalog
from proxy.errors import RuleError
from proxy.rules import ColumnRule, Encryption, TableRule, load_rules
from proxy.server import Upstream

_CHECK_CONSTRAINTS = """
SELECT conname, pg_catalog.pg_get_constraintdef(oid) AS definition, conkey
FROM pg_catalog.pg_constraint
WHERE conrelid = $1 AND contype = 'c' AND conkey && $2::int2[]
"""

_UNIQUE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, i.indkey::int2[] AS columns
FROM pg_catalog.pg_index i
WHERE i.indrelid = $1 AND i.indisunique AND i.indkey::int2[] && $2::int2[]
"""


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tables: int = 0
    columns: int = 0


async def check_rules(upstream: Upstream, rules_dir: Path) -> CheckReport:
    report = CheckReport()
    try:
        rules = load_rules(rules_dir)
    except RuleError as exc:
        report.problems.append(str(exc))
        return report
    for database in sorted(rules.databases(upstream.database)):
        table_rules = rules.for_database(database, upstream.database)
        try:
            conn = await asyncpg.connect(**upstream.connect_args(database))
        except (OSError, asyncpg.PostgresError) as exc:
            report.problems.append(
                f"database {database}: cannot connect to {upstream.address}: {exc}"
            )
            continue
        try:
            for rule in table_rules:
                await _check_table(conn, rule, report)
        finally:
            await conn.close()
    return report


async def _check_table(conn: Any, rule: TableRule, report: CheckReport) -> None:
    try:
        catalog = await load_catalog(conn, [rule])
    except RuleError:
        # Loading stops at the first problem, so check column by column to
        # list them all, then go on with the columns that passed.
        passed = await _check_columns(conn, rule, report)
        if not passed:
            return
        try:
            catalog = await load_catalog(conn, [replace(rule, columns=passed)])
        except RuleError as exc:
            report.problems.append(str(exc))
            return
    table = next(t for t in catalog.tables if not t.is_view)
    report.tables += 1
    report.columns += len(table.encrypted)
    attnums = {column.attnum: column for column in table.encrypted.values()}
    for row in await conn.fetch(_CHECK_CONSTRAINTS, table.oid, list(attnums)):
        column = attnums[next(n for n in row["conkey"] if n in attnums)]
        report.problems.append(
            f"{column.rule.source}: check constraint {row['conname']} on "
            f"{table.qualified_name} would see the ciphertext of {column.name}: "
            f"{row['definition']}; drop it or check the value in the application"
        )
    _check_unique(table, await conn.fetch(_UNIQUE_INDEXES, table.oid, list(attnums)), report)


async def _check_columns(
    conn: Any, rule: TableRule, report: CheckReport
) -> tuple[ColumnRule, ...]:
    """Report the problem of each column of a rule; return the columns without one."""
    try:
        await load_catalog(conn, [replace(rule, columns=())])
    except RuleError as exc:
        # The table itself is missing, so no column can be checked.
        report.problems.append(str(exc))
        return ()
    passed = []
    for column in rule.columns:
        try:
            await load_catalog(conn, [replace(rule, columns=(column,))])
        except RuleError as exc:
            report.problems.append(str(exc))
        else:
            passed.append(column)
    return tuple(passed)


def _check_unique(table: RuledTable, rows: list[Any], report: CheckReport) -> None:
    for row in rows:
        for column in table.encrypted.values():
            if column.attnum in row["columns"] and (
                column.rule.encryption is Encryption.RANDOMIZED
            ):
                report.warnings.append(
                    f"{column.rule.source}: unique index {row['name']} includes "
                    f"randomized column {column.identity}, so it never finds a "
                    "duplicate; make the column deterministic to enforce uniqueness"
                )
