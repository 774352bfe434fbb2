"""Associated columns: where a statement gives the row values a sealed value binds.

A column with `associated_columns`, a bound column here, is sealed with the
values of those columns in the same row bound into its associated data. A write must therefore give
them in the same statement (as parameters, literals or NULL), and a read must
return them from the same row beside the sealed value. This module finds those
values in parse trees; the analyzer decides what to reject.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import AssociatedColumn, EncryptedColumn, RuledTable
    from proxy.sql.outputs import Trace

Node = dict[str, Any]

FEATURE_NOT_SUPPORTED = "0A000"
BOUND_HINT = (
    "Give the associated columns' values in the same statement: in INSERT as "
    "parameters or literals, in UPDATE by setting them or by a top-level "
    "`col = value` in WHERE."
)
_TEXT_TYPES = ("text", "varchar")
_TEXT_CASTS = ("text", "varchar", "bpchar")


@dataclass(frozen=True, slots=True)
class AssociatedValue:
    """The value a statement gives an associated column: a parameter, a literal or NULL.

    `param` is the parameter number, and `literal` is the constant's text.
    Both None means NULL.
    """

    column: AssociatedColumn
    param: int | None = None
    literal: str | None = None


Sources = tuple[AssociatedValue, ...]


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


class ConflictUpdate:
    """The DO UPDATE of an INSERT, whose sealed values take the inserted row's.

    A value sealed there binds the inserted row's associated values, so the
    updated row must end with those: each associated column is in the
    conflict target, or DO UPDATE sets it from EXCLUDED. `inserted` maps
    column names to the inserted row's value nodes, or is None for an INSERT
    of several rows.
    """

    def __init__(self, conflict: Node, inserted: dict[str, Node] | None) -> None:
        self.updates = set_values(conflict["targetList"])
        self._inferred = inference_columns(conflict)
        self._inserted = inserted

    def sources(self, column: EncryptedColumn) -> Sources | str:
        """Return the associated values a value set by DO UPDATE binds, or why unknown."""
        reason = self._unkept(column)
        if reason is not None:
            return reason
        if self._inserted is None:
            return (
                "DO UPDATE of an INSERT of several rows cannot tell which row's "
                "values to bind"
            )
        return row_sources(column, self._inserted, "the INSERT")

    def check(self, table: RuledTable) -> None:
        """Reject a DO UPDATE that leaves a bound value with other row values."""
        for name, column in table.encrypted.items():
            node = self.updates.get(name)
            if node is not None and is_excluded(node, name):
                # EXCLUDED carries the value sealed with the inserted row's values.
                reason = self._unkept(column)
                if reason is not None:
                    raise reject_bound(column, reason, BOUND_HINT)
                continue
            changed = [
                a.name
                for a in column.associated
                if a.name in self.updates and a.name not in self._inferred
            ]
            _check_changed(column, node, changed)

    def _keeps_inserted(self, name: str) -> bool:
        return name in self._inferred or is_excluded(self.updates.get(name, {}), name)

    def _unkept(self, column: EncryptedColumn) -> str | None:
        for associated in column.associated:
            if not self._keeps_inserted(associated.name):
                return (
                    f"DO UPDATE would seal it with the inserted row's "
                    f"{associated.name}, but the updated row may keep another; "
                    f"name {associated.name} in the conflict target or set it "
                    "from EXCLUDED"
                )
        return None


def check_update(table: RuledTable, updates: dict[str, Node]) -> None:
    """Reject an UPDATE that changes an associated column but keeps the bound value."""
    for name, column in table.encrypted.items():
        changed = [a.name for a in column.associated if a.name in updates]
        _check_changed(column, updates.get(name), changed)


def _check_changed(column: EncryptedColumn, node: Node | None, changed: list[str]) -> None:
    # A bound column left alone, or set to itself, keeps the value sealed
    # with the old associated values.
    if changed and (node is None or "ColumnRef" in node):
        raise reject_bound(
            column,
            f"the statement changes its associated column {changed[0]} without "
            f"sealing {column.name} again, so the stored value would no longer open",
            BOUND_HINT,
        )


def check_view_write(table: RuledTable) -> None:
    """Reject a write through a view to a bound column."""
    # TODO: map a view's column names to the base table's to check writes
    # through updatable views. Until then they are rejected.
    bound = [c for c in table.encrypted.values() if c.associated]
    if table.is_view and bound:
        raise reject_bound(
            bound[0],
            f"writes through view {table.qualified_name} to a column bound to "
            "associated columns are not supported yet",
            f"Write to table {bound[0].rule.schema}.{bound[0].rule.table} itself.",
        )


def copy_associated(
    fields: dict[int, Trace], names: list[str]
) -> dict[int, tuple[int, ...]]:
    """Map each field of a bound column in a COPY column list to its associated fields."""
    result = {}
    for index, (column,) in fields.items():
        missing = [a.name for a in column.associated if a.name not in names]
        if missing:
            raise reject_bound(
                column,
                f"the COPY column list lacks its associated column {missing[0]}, "
                "whose value its sealed values bind",
                f"Add {', '.join(missing)} to the COPY column list.",
            )
        result[index] = tuple(names.index(a.name) for a in column.associated)
    return result


def check_bindings(bindings: dict[int, Sources], params: dict[int, EncryptedColumn]) -> None:
    """Reject a parameter that is both sealed and bound as an associated value.

    The server would store the sealed value in the associated column, so its
    stored value would differ from the one bound into the seal.
    """
    for number, sources in bindings.items():
        for source in sources:
            column = params.get(source.param or 0)
            if column is not None:
                raise reject_bound(
                    params[number],
                    f"parameter ${source.param} is both sealed for {column.identity} "
                    f"and the value of associated column {source.column.name}",
                    "Pass the associated column's value as its own parameter.",
                )


def check_single_bound_result(
    associations: list[dict[int, tuple[int, ...]]],
    outputs: list[tuple[Trace, ...] | None],
) -> None:
    """Reject a text of several statements that returns a bound column.

    Outputs are traced for a text of one statement only, so without this
    check such values would fail to open when the rows arrive.
    """
    # TODO: keep one output trace per statement and follow the session
    # through the results of a multi-statement query.
    if len(associations) < 2:
        return
    for mapping, traces in zip(associations, outputs):
        if mapping and traces is not None:
            column = traces[next(iter(mapping))][0]
            raise reject_bound(
                column,
                "a query of several statements returns it, and only a query of "
                "one statement can open a column bound to associated columns",
                "Send the statement that reads it on its own.",
            )
