"""The snapshot of a database's other relations, beside its ruled tables.

A write into a relation that the snapshot does not list may go through a
view over a ruled table created since, so the proxy reads the catalog
again first. Relations that depend on ruled tables without being traced,
and ruled tables renamed or detached since the last read, are recorded so
that statements on them fail closed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from proxy.catalog import Catalog

log = logging.getLogger(__name__)


_RELATIONS_QUERY = """
SELECT c.oid, n.nspname, c.relname, n.nspname LIKE 'pg\\_temp\\_%' AS temporary
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
"""

_DEPENDENT_RELATIONS_QUERY = """
WITH RECURSIVE dependent(oid) AS (
    SELECT unnest($1::oid[])
    UNION
    SELECT r.ev_class FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    JOIN dependent ON d.refobjid = dependent.oid
    WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
      AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
      AND r.ev_class <> dependent.oid
)
SELECT n.nspname, c.relname
FROM dependent
JOIN pg_catalog.pg_class c ON c.oid = dependent.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""


async def add_snapshot(
    conn: Any,
    catalog: Catalog,
    broken: dict[tuple[str, str], str],
    broken_oids: list[int],
    previous: Catalog | None,
) -> Catalog:
    """Record every relation of the database, and the views that cannot be traced.

    Writes to a relation that is not in this snapshot wait for a fresh
    catalog, since it may be a view over a ruled table created since.
    """
    relations = set()
    oids = {}
    for row in await conn.fetch(_RELATIONS_QUERY):
        key = (row["nspname"], row["relname"])
        relations.add(key)
        oids[row["oid"]] = key
        if row["temporary"]:
            # Each session's pg_temp is its own pg_temp_N schema, which the
            # proxy cannot map to a client session, so any one counts.
            relations.add(("pg_temp", row["relname"]))
    ruled = {(t.schema, t.name) for t in catalog.tables}
    if previous is not None:
        for table in previous.tables:
            moved = oids.get(table.oid)
            if table.is_view or moved is None or moved in ruled or moved in broken:
                continue
            if moved == (table.schema, table.name):
                # An inheritance child or partition detached from its parent.
                reason = (
                    f"table {table.qualified_name} was ruled through its parent and "
                    "has been detached, so it may hold sealed values; attach it "
                    "again or write a rule file for it"
                )
            else:
                reason = (
                    f"table {moved[0]}.{moved[1]} was ruled table "
                    f"{table.qualified_name}, renamed or moved since; rename it "
                    "back or change its rule file"
                )
            log.error("%s, so statements on it are rejected", reason)
            broken[moved] = reason
            broken_oids.append(table.oid)
    start = [t.oid for t in catalog.tables if not t.is_view] + broken_oids
    # The closure starts at the ruled tables, which stay ruled.
    rows = await conn.fetch(_DEPENDENT_RELATIONS_QUERY, start)
    untraced = {(row["nspname"], row["relname"]) for row in rows} - ruled
    # NOTE: a temporary view over a ruled table is not traced under the name
    # pg_temp, so writes through it are rejected rather than sealed.
    untraced.update(
        ("pg_temp", name) for schema, name in ruled | untraced if schema.startswith("pg_temp_")
    )
    return replace(
        catalog,
        relations=frozenset(relations),
        untraced=frozenset(untraced),
        broken=dict(broken),
        has_snapshot=True,
    )
