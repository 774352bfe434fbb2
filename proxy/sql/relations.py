"""Checks on the relations a statement names, against the catalog snapshot.

A write into a relation the catalog has not seen might go through a view
over a ruled table created since the catalog was read. The proxy then reads
the catalog again before it analyses the statement, instead of passing
values that the view would store in plaintext.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from proxy.catalog import Catalog, RelationKind
from proxy.errors import PgsealError, StatementRejected

Node = dict[str, Any]

FEATURE_NOT_SUPPORTED = "0A000"

# Words without which a statement text cannot write into a relation.
_WRITE_WORDS = ("insert", "update", "copy", "merge")
# A single INSERT, UPDATE or COPY into an unquoted, possibly qualified name.
# Data-modifying WITH clauses are allowed only at the top of a statement,
# so such a text writes into this relation alone.
_SIMPLE_WRITE = re.compile(
    r"\s*(?:insert\s+into|update(?:\s+only)?|copy)\s+"
    r"([a-z_][a-z0-9_$]*)(?:\s*\.\s*([a-z_][a-z0-9_$]*))?(?=[\s(]|$)"
)
# Statement kinds that read or write rows, on which a broken table fails.
_DML = (
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "CopyStmt",
    "DeclareCursorStmt",
    "ExplainStmt",
    "CreateTableAsStmt",
)


class CatalogStale(PgsealError):
    """A statement writes into relations that the catalog has not seen.

    The session reads the catalog again and then retries the statement.
    """

    def __init__(self, relations: tuple[str, ...]) -> None:
        super().__init__(f"relations not in the catalog: {', '.join(relations)}")
        self.relations = relations


def write_needs_analysis(
    lowered: str, catalog: Catalog, search_path: tuple[str, ...] | None
) -> bool:
    """Tell whether a statement naming no ruled table may still write one.

    Only a single INSERT, UPDATE or COPY into a plain relation that the
    catalog has seen skips the parser.
    """
    if not any(word in lowered for word in _WRITE_WORDS):
        return False
    match = _SIMPLE_WRITE.match(lowered)
    if match is None or ";" in lowered.rstrip().rstrip(";"):
        return True
    if match.group(2) is None:
        schema, name = None, match.group(1)
    else:
        schema, name = match.group(1), match.group(2)
    kind, _ = catalog.classify(schema, name, search_path)
    return kind is not RelationKind.PLAIN


def check_relations(
    stmt: Node,
    catalog: Catalog,
    search_path: tuple[str, ...] | None,
    absent: frozenset[str] = frozenset(),
) -> None:
    """Reject statements on broken tables and writes the proxy cannot classify.

    `absent` contains the names that a catalog read just now did not find
    either. Writes into them pass, and the server reports a missing one.
    Raises CatalogStale for other names the catalog has not seen.
    """
    ((kind, _),) = stmt.items()
    if kind in _DML:
        for relation in _range_vars(stmt):
            found, detail = _classify(relation, catalog, search_path)
            if found is RelationKind.BROKEN:
                raise StatementRejected(
                    FEATURE_NOT_SUPPORTED,
                    f"table {_name(relation)} no longer matches its encryption "
                    f"rule: {detail}",
                    "Fix the table or its rule file, then reload the rules "
                    "(SIGHUP). Until then the proxy cannot seal or open its values.",
                )
    unknown = []
    for relation in _write_targets(stmt):
        found, detail = _classify(relation, catalog, search_path)
        if found is RelationKind.UNTRACED:
            raise StatementRejected(
                FEATURE_NOT_SUPPORTED,
                f"writes into {detail} are not supported: it is a view over a "
                "ruled table, or has a rewrite rule that reads or writes one, and "
                "the proxy cannot trace the encrypted columns",
                "Write to the ruled table itself.",
            )
        if found is RelationKind.UNKNOWN and _name(relation) not in absent:
            unknown.append(_name(relation))
    if unknown:
        raise CatalogStale(tuple(unknown))


def _classify(
    relation: Node, catalog: Catalog, search_path: tuple[str, ...] | None
) -> tuple[RelationKind, str]:
    return catalog.classify(relation.get("schemaname"), relation["relname"], search_path)


def _name(relation: Node) -> str:
    schema = relation.get("schemaname")
    return f"{schema}.{relation['relname']}" if schema else str(relation["relname"])


def _write_targets(node: Any) -> Iterator[Node]:
    """Yield the target relation of every INSERT, UPDATE, MERGE and COPY FROM."""
    if isinstance(node, list):
        for item in node:
            yield from _write_targets(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            writes = key in ("InsertStmt", "UpdateStmt", "MergeStmt") or (
                key == "CopyStmt" and value.get("is_from")
            )
            if writes and "relation" in value:
                yield value["relation"]
            yield from _write_targets(value)


def _range_vars(node: Any) -> Iterator[Node]:
    if isinstance(node, list):
        for item in node:
            yield from _range_vars(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "RangeVar" or (key == "relation" and "relname" in value):
                yield value
            yield from _range_vars(value)
