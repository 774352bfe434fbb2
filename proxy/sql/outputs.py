"""Trace a query's output columns back to encrypted columns.

The server names a result column's table and attribute in RowDescription only
when the column is a plain reference. For `UNION`, `coalesce` and `CASE` it
sends zeros, so the proxy traces those outputs itself. An output may trace to
several encrypted columns (`coalesce(a, b)`); a value then opens only under
the column whose associated data it carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn

Node = dict[str, Any]
Trace = tuple["EncryptedColumn", ...]
Resolver = Callable[[Node], "EncryptedColumn | None"]
StarExpander = Callable[[Node, Node], "list[Trace] | None"]
LiteralSealer = Callable[[Node, "EncryptedColumn"], None]

FEATURE_NOT_SUPPORTED = "0A000"

# Nodes that return one of their inputs unchanged, with the keys that hold
# those inputs. Anything else computes a new value.
_PASS_THROUGH = {
    "CoalesceExpr": ("args",),
    "CaseExpr": ("args", "defresult"),
    "CaseWhen": ("result",),
}


def passes_through(child: Node, parents: list[tuple[str, Node]]) -> int:
    """Return how many parents, innermost first, pass `child` through unchanged."""
    depth = 0
    for kind, node in reversed(parents):
        keys = _PASS_THROUGH.get(kind)
        if keys is None or not any(_holds(node.get(key), child) for key in keys):
            return depth
        child = node
        depth += 1
    return depth


def _holds(value: Any, child: Node) -> bool:
    if isinstance(value, list):
        return any(_holds(item, child) for item in value)
    if isinstance(value, dict):
        return any(body is child for body in value.values())
    return False


def trace_select(
    select: Node,
    resolve: Resolver,
    expand_star: StarExpander,
    seal_literal: LiteralSealer,
) -> tuple[Trace, ...] | None:
    """Return, per output column, the encrypted columns it may come from.

    Returns None when the output list cannot be traced, such as `*` over a
    relation that is not ruled; plain references still unseal by their
    RowDescription then. Raises StatementRejected for an output column
    that would mix sealed values with plain ones, such as a UNION of an
    encrypted column and a plain column.
    """
    columns = _trace_columns(select, resolve, expand_star, seal_literal)
    if columns is None:
        return None
    for trace, untraced in columns:
        if trace:
            for node in untraced:
                _seal_or_reject(node, trace, seal_literal)
    return tuple(trace for trace, _ in columns)


# Per output column: its trace, and the expressions of the set operation's
# branches that gave no trace (None for a plain column under `*`).
_Column = tuple[Trace, list["Node | None"]]


def _trace_columns(
    select: Node,
    resolve: Resolver,
    expand_star: StarExpander,
    seal_literal: LiteralSealer,
) -> list[_Column] | None:
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        left = _trace_columns(select["larg"], resolve, expand_star, seal_literal)
        right = _trace_columns(select["rarg"], resolve, expand_star, seal_literal)
        if left is None or right is None or len(left) != len(right):
            return None
        return [(_merge(a[0], b[0]), a[1] + b[1]) for a, b in zip(left, right)]
    if "valuesLists" in select:
        return None
    columns: list[_Column] = []
    for item in select.get("targetList", []):
        target = item["ResTarget"]
        value = target.get("val", {})
        ref = value.get("ColumnRef")
        if ref is not None and any("A_Star" in f for f in ref.get("fields", [])):
            expanded = expand_star(ref, select)
            if expanded is None:
                return None
            columns.extend((trace, [] if trace else [None]) for trace in expanded)
        else:
            trace = trace_expression(value, resolve, seal_literal)
            columns.append((trace, [] if trace else [value]))
    return columns


def trace_expression(node: Node, resolve: Resolver, seal_literal: LiteralSealer) -> Trace:
    """Return the encrypted columns whose values `node` may return unchanged.

    Raises StatementRejected when `node` passes an encrypted column through
    beside a plain value, as `coalesce(sealed, plain)` does.
    """
    if not node:
        return ()
    ((kind, body),) = node.items()
    if kind == "ColumnRef":
        column = resolve(body)
        return (column,) if column is not None else ()
    if kind == "CaseExpr":
        inputs = [when["CaseWhen"]["result"] for when in body.get("args", [])]
        inputs += _as_list(body.get("defresult"))
    elif kind == "CoalesceExpr":
        inputs = list(body.get("args", []))
    else:
        return ()
    traces = [trace_expression(item, resolve, seal_literal) for item in inputs]
    trace: Trace = ()
    for item_trace in traces:
        trace = _merge(trace, item_trace)
    if trace:
        for item, item_trace in zip(inputs, traces):
            if not item_trace:
                _seal_or_reject(item, trace, seal_literal)
    return trace


def _seal_or_reject(node: Node | None, trace: Trace, seal_literal: LiteralSealer) -> None:
    """Handle an untraced value returned in the same output column as `trace`.

    A literal is sealed like the encrypted column, so that every value of
    the output opens the same way, and NULL stays NULL. Anything else would
    come back in plaintext among sealed values, and fail to open.
    """
    const = _constant(node) if node is not None else None
    if const is None:
        raise StatementRejected(
            FEATURE_NOT_SUPPORTED,
            f"column {trace[0].identity} is encrypted: a result column mixes its "
            "sealed values with plain values, which cannot be told apart",
            "Return the encrypted column and the plain value as separate "
            "result columns, and combine them in the application.",
        )
    if not const.get("isnull"):
        seal_literal(const, trace[0])


def _constant(node: Node) -> Node | None:
    """Return the A_Const of a literal, or of NULL cast to a type."""
    const: Node | None = node.get("A_Const")
    if const is None and "TypeCast" in node:
        inner = node["TypeCast"].get("arg", {}).get("A_Const")
        if inner is not None and inner.get("isnull"):
            const = inner
    return const


def _as_list(value: Any) -> list[Node]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _merge(first: Trace, second: Trace) -> Trace:
    merged = list(first)
    for column in second:
        if column not in merged:
            merged.append(column)
    return tuple(merged)
