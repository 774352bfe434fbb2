"""Bound output columns: where a result row carries a sealed value's associated values.

A value of a bound column (one with `associated_columns`) opens only with
the values of its associated columns in the same row. The result must
therefore contain them, and the analysis must trace them to the same range
entry of the same table. A self-join returns both columns from one table, but from different
rows, which is why the table OIDs of RowDescription are not enough.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from proxy.sql.associated import reject_bound

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn, RuledTable
    from proxy.sql.outputs import Trace

Node = dict[str, Any]
TableOf = Callable[[Node], "RuledTable | None"]
Tracer = Callable[[Node], "tuple[Trace, ...] | None"]
# An output column's origin: the range entry's name, its relation, the column name.
OutputSource = tuple[str, "RuledTable", str]


def associate_outputs(
    select: Node, trace: Tracer, table_of: TableOf
) -> dict[int, tuple[int, ...]]:
    """Map each bound output column to the output columns of its associated values.

    Raises StatementRejected when an output column comes from a bound column
    but the output list lacks one of its associated columns from the same
    row. For UNION and the like both branches must place them alike.
    """
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        left = associate_outputs(select["larg"], trace, table_of)
        right = associate_outputs(select["rarg"], trace, table_of)
        if left != right:
            column = _first_bound(trace(select["larg"]) or ())
            if column is None:
                column = _first_bound(trace(select["rarg"]) or ())
            assert column is not None
            raise reject_bound(
                column,
                "the branches of the set operation return its associated columns "
                "in different places",
                "Return the associated columns in the same position in every branch.",
            )
        return left
    traces = trace(select)
    if traces is None or _first_bound(traces) is None:
        return {}
    sources = output_sources(select, table_of)
    result = {}
    for index, candidates in enumerate(traces):
        if any(column.associated for column in candidates):
            source = sources[index] if sources and index < len(sources) else None
            result[index] = _associated_outputs(candidates, source, sources or [])
    return result


def _associated_outputs(
    candidates: Trace, source: OutputSource | None, sources: list[OutputSource | None]
) -> tuple[int, ...]:
    column = next(c for c in candidates if c.associated)
    names = None
    if source is not None and len(candidates) == 1:
        entry, relation, name = source
        names = relation.associated.get(name)
    if source is None or names is None:
        raise reject_bound(
            column,
            "its output cannot be traced to one row of the table together with "
            "its associated columns "
            + ", ".join(a.name for a in column.associated),
            "Select the column and its associated columns by name from the "
            "table itself.",
        )
    indexes = []
    for associated_name in names:
        match = next(
            (
                i
                for i, other in enumerate(sources)
                if other is not None and other[0] == entry and other[2] == associated_name
            ),
            None,
        )
        if match is None:
            # TODO: append the missing column to the output list as a hidden
            # column, and drop it from RowDescription and every DataRow.
            raise reject_bound(
                column,
                f"the result does not contain its associated column {associated_name} "
                "from the same row, which its values need to open",
                f"Select {entry}.{associated_name} beside {entry}.{source[2]}.",
            )
        indexes.append(match)
    return tuple(indexes)


def _first_bound(traces: tuple[Trace, ...]) -> EncryptedColumn | None:
    for candidates in traces:
        for column in candidates:
            if column.associated:
                return column
    return None


def output_sources(select: Node, table_of: TableOf) -> list[OutputSource | None] | None:
    """Return, per output column, the ruled column it returns unchanged, if any.

    Only plain column references and `*` are traced, and only to relations
    in the select's own FROM list. Returns None when a `*` cannot be
    expanded, because the output positions are then unknown.
    """
    entries = dict(_from_entries(select.get("fromClause", []), table_of))
    sources: list[OutputSource | None] = []
    for item in select.get("targetList", []):
        ref = item["ResTarget"].get("val", {}).get("ColumnRef")
        if ref is None:
            sources.append(None)
            continue
        fields = ref.get("fields", [])
        if any("A_Star" in f for f in fields):
            expanded = _expand_star(fields, entries)
            if expanded is None:
                return None
            sources.extend(expanded)
            continue
        sources.append(_column_source(fields, entries))
    return sources


def _from_entries(
    items: list[Node], table_of: TableOf
) -> Iterator[tuple[str, RuledTable | None]]:
    """Yield (name, ruled relation or None) for every range entry of a FROM list."""
    for item in items:
        ((kind, body),) = item.items()
        if kind == "RangeVar":
            alias = body.get("alias", {}).get("aliasname")
            yield alias or body["relname"], table_of(item)
        elif kind == "JoinExpr":
            yield from _from_entries([body["larg"], body["rarg"]], table_of)
        else:
            alias = body.get("alias", {}).get("aliasname")
            if alias:
                yield alias, None


def _expand_star(
    fields: list[Node], entries: dict[str, RuledTable | None]
) -> list[OutputSource | None] | None:
    names = [f["String"]["sval"] for f in fields if "String" in f]
    if names:
        entry = names[-1]
    elif len(entries) == 1:
        (entry,) = entries
    else:
        return None
    relation = entries.get(entry)
    if relation is None:
        return None
    return [(entry, relation, name) for name in relation.columns]


def _column_source(
    fields: list[Node], entries: dict[str, RuledTable | None]
) -> OutputSource | None:
    names = [f["String"]["sval"] for f in fields if "String" in f]
    if len(names) != len(fields) or not names:
        return None
    column = names[-1]
    if len(names) > 1:
        relation = entries.get(names[-2])
        if relation is None or column not in relation.columns:
            return None
        return names[-2], relation, column
    # An unqualified name resolves to an entry only if one entry has it.
    # With JOIN USING it is the merged column, which equals this entry's
    # column whenever this entry's row is present.
    holders = [
        (entry, relation)
        for entry, relation in entries.items()
        if relation is not None and column in relation.columns
    ]
    if len(holders) != 1:
        return None
    entry, relation = holders[0]
    return entry, relation, column
