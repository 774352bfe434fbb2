"""Associated columns: where a statement gives the row values a sealed value binds.

A column with `associated_columns` is sealed with the values of those columns
in the same row bound into its associated data. A write must therefore give
them in the same statement (as parameters, literals or NULL), and a read must
return them from the same row beside the sealed value. This module finds those
values in parse trees; the analyzer decides what to reject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import AssociatedColumn, EncryptedColumn, RuledTable
    from proxy.sql.outputs import Trace

Node = dict[str, Any]
TableOf = Callable[[Node], "RuledTable | None"]
Tracer = Callable[[Node], "tuple[Trace, ...] | None"]

FEATURE_NOT_SUPPORTED = "0A000"
_TEXT_TYPES = ("text", "varchar")
_TEXT_CASTS = ("text", "varchar", "bpchar")


@dataclass(frozen=True, slots=True)
class AssociatedValue:
    """The value a statement gives an associated column: a parameter, a literal or NULL.

    `param` is the parameter number; `literal` is the constant's text. Both
    None means NULL.
    """

    column: AssociatedColumn
    param: int | None = None
    literal: str | None = None


Sources = tuple[AssociatedValue, ...]
# An output column's origin: the range entry's name, its relation, the column name.
OutputSource = tuple[str, "RuledTable", str]


def reject_bound(column: EncryptedColumn, reason: str, hint: str) -> StatementRejected:
    return StatementRejected(
        FEATURE_NOT_SUPPORTED, f"column {column.identity} is encrypted: {reason}", hint
    )


def value_source(node: Node, column: AssociatedColumn) -> AssociatedValue | None:
    """Return where `node` gives the associated column's value, None if computed.

    A cast is looked through only when it is to the column's own type (or
    to text for a text column), because any other cast may change the value.
    """
    ((kind, body),) = node.items()
    if kind == "TypeCast":
        names = body.get("typeName", {}).get("names", [])
        cast = str(names[-1]["String"]["sval"]) if names else ""
        if cast != column.type.name and not (
            column.type.name in _TEXT_TYPES and cast in _TEXT_CASTS
        ):
            return None
        ((kind, body),) = body["arg"].items()
    if kind == "ParamRef":
        return AssociatedValue(column, param=body["number"])
    if kind != "A_Const":
        return None
    if body.get("isnull"):
        return AssociatedValue(column)
    text = constant_text(body)
    return None if text is None else AssociatedValue(column, literal=text)


def constant_text(const: Node) -> str | None:
    """Return the text of an A_Const as the server reads it, None for bit strings."""
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "fval" in const:
        return str(const["fval"]["fval"])
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    return None


def row_sources(
    column: EncryptedColumn, values: dict[str, Node], statement: str
) -> Sources | str:
    """Return the associated values a row gives, or the reason they are unknown.

    `values` maps the column names the statement sets to their value nodes.
    """
    sources = []
    for associated in column.associated:
        node = values.get(associated.name)
        if node is None:
            return f"{statement} does not give its associated column {associated.name}"
        source = value_source(node, associated)
        if source is None:
            return (
                f"the value of its associated column {associated.name} would be "
                "computed by the server"
            )
        sources.append(source)
    return tuple(sources)


def set_values(targets: list[Node]) -> dict[str, Node]:
    """Map the columns an UPDATE or DO UPDATE sets to their value nodes.

    `SET (a, b) = (...)` gives a column no node that can be read here, so
    such a column maps to an empty node, which no value source accepts.
    """
    result: dict[str, Node] = {}
    for item in targets:
        target = item["ResTarget"]
        value = target.get("val", {})
        result[target["name"]] = {} if "MultiAssignRef" in value else value
    return result


def where_pins(where: Node | None, names: tuple[str, ...]) -> dict[str, Node]:
    """Map columns pinned by a top-level `col = value` in WHERE to the value node.

    Only conjuncts joined by AND at the top count: a pin under OR or NOT
    would not fix the column's value in every updated row. `names` are the
    names the target table goes by (its alias, or its name).
    """
    pins: dict[str, Node] = {}
    for conjunct in _conjuncts(where):
        expr = conjunct.get("A_Expr")
        if expr is None or expr.get("kind") != "AEXPR_OP":
            continue
        operator = [item["String"]["sval"] for item in expr.get("name", [])]
        if operator != ["="]:
            continue
        left, right = expr.get("lexpr", {}), expr.get("rexpr", {})
        for ref, value in ((left, right), (right, left)):
            column = _target_column(ref.get("ColumnRef"), names)
            if column is not None and "ColumnRef" not in value:
                pins.setdefault(column, value)
    return pins


def _conjuncts(node: Node | None) -> Iterator[Node]:
    if not node:
        return
    boolean = node.get("BoolExpr")
    if boolean is not None:
        if boolean.get("boolop") == "AND_EXPR":
            for arg in boolean.get("args", []):
                yield from _conjuncts(arg)
        return
    yield node


def _target_column(ref: Node | None, names: tuple[str, ...]) -> str | None:
    if ref is None:
        return None
    fields = [item["String"]["sval"] for item in ref.get("fields", []) if "String" in item]
    if len(fields) != len(ref.get("fields", [])) or not fields:
        return None
    if len(fields) == 1 or fields[-2] in names:
        return str(fields[-1])
    return None


def inference_columns(conflict: Node) -> frozenset[str]:
    """Return the plain columns named in `ON CONFLICT (...)`."""
    names = set()
    for item in conflict.get("infer", {}).get("indexElems", []):
        name = item.get("IndexElem", {}).get("name")
        if name:
            names.add(name)
    return frozenset(names)


def is_excluded(node: Node, name: str) -> bool:
    """Tell whether `node` is `EXCLUDED.name`."""
    ref = node.get("ColumnRef")
    if ref is None:
        return False
    fields = [item.get("String", {}).get("sval") for item in ref.get("fields", [])]
    return fields == ["excluded", name]


# Reads


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
