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

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn

Node = dict[str, Any]
Trace = tuple["EncryptedColumn", ...]
Resolver = Callable[[Node], "EncryptedColumn | None"]
StarExpander = Callable[[Node, Node], "list[Trace] | None"]
LiteralSealer = Callable[[Node, "EncryptedColumn"], None]

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
    RowDescription then.
    """
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        left = trace_select(select["larg"], resolve, expand_star, seal_literal)
        right = trace_select(select["rarg"], resolve, expand_star, seal_literal)
        if left is None or right is None or len(left) != len(right):
            return None
        return tuple(_merge(a, b) for a, b in zip(left, right))
    if "valuesLists" in select:
        return None
    traces: list[Trace] = []
    for item in select.get("targetList", []):
        target = item["ResTarget"]
        value = target.get("val", {})
        ref = value.get("ColumnRef")
        if ref is not None and any("A_Star" in f for f in ref.get("fields", [])):
            expanded = expand_star(ref, select)
            if expanded is None:
                return None
            traces.extend(expanded)
        else:
            traces.append(trace_expression(value, resolve, seal_literal))
    return tuple(traces)


def trace_expression(node: Node, resolve: Resolver, seal_literal: LiteralSealer) -> Trace:
    """Return the encrypted columns whose values `node` may return unchanged."""
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
    trace: Trace = ()
    for item in inputs:
        trace = _merge(trace, trace_expression(item, resolve, seal_literal))
    if trace:
        # A literal returned beside an encrypted column is sealed like it,
        # so that every value of the output opens the same way.
        for item in inputs:
            const = item.get("A_Const")
            if const is not None and not const.get("isnull"):
                seal_literal(const, trace[0])
    return trace


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
