"""Batch INSERT ... SELECT shapes whose stored values the proxy can seal.

ORMs insert many rows in one statement by selecting from a row source of
parameters: SQLAlchemy 2 selects from `(VALUES ($1, $2, 0), ...) AS v(p0, p1,
sen_counter)`, Django 5.2 from `UNNEST(($1)::integer[], ($2)::text[])`. Each
output column of such a SELECT is a plain reference to one column of the row
source. Every value that reaches an encrypted column is then a parameter or
a literal, and the proxy seals each VALUES cell or array element of it.

Any other SELECT could let the server compute a stored value from plaintext,
so it raises UnsealableSelect and the statement is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.catalog import EncryptedColumn, Storage

Node = dict[str, Any]

# Casts that leave the stored form of a sealed value unchanged, by storage.
_STORAGE_CASTS = {
    Storage.TEXT: frozenset({"text", "varchar", "bpchar"}),
    Storage.BYTEA: frozenset({"bytea"}),
}
_SELECT_KEYS = frozenset(
    {"targetList", "fromClause", "sortClause", "limitOption", "op"}
)
_VALUES_KEYS = frozenset({"valuesLists", "limitOption", "op"})
_CALL_KEYS = frozenset({"funcname", "args", "funcformat", "location"})


class UnsealableSelect(Exception):
    """A SELECT feeding an encrypted column is not a shape the proxy can seal."""

    def __init__(self, column: EncryptedColumn, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BatchValue:
    """A parameter or literal node that feeds an encrypted column.

    `array` is true for an UNNEST argument, whose elements are each sealed.
    """

    node: Node
    column: EncryptedColumn
    array: bool


@dataclass(frozen=True, slots=True)
class BatchInsert:
    """The values to seal in a batch INSERT ... SELECT."""

    values: tuple[BatchValue, ...]
    # ColumnRef bodies of the output columns, which only pass values on.
    refs: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class _RowSource:
    alias: str
    names: tuple[str, ...]
    # Per column of the row source, every node that supplies its values.
    cells: tuple[tuple[Node, ...], ...]
    array: bool


def plan_batch_insert(
    select: Node, targets: list[EncryptedColumn | None]
) -> BatchInsert:
    """Return what to seal in `select`, an INSERT's SELECT, or raise UnsealableSelect.

    `targets` lists, per inserted column, the encrypted column it is or None.
    """
    first = next(column for column in targets if column is not None)
    if set(select) - _SELECT_KEYS or select.get("op", "SETOP_NONE") != "SETOP_NONE":
        raise UnsealableSelect(
            first,
            "INSERT ... SELECT with clauses other than FROM and ORDER BY "
            "would let the server compute the stored value",
        )
    if "targetList" not in select:
        raise UnsealableSelect(
            first,
            "INSERT ... DEFAULT VALUES would let the server compute the stored value",
        )
    row_source = _row_source(select.get("fromClause", []), first)
    positions, refs = _output_positions(select["targetList"], row_source, first)
    used = [position for position, _ in positions]
    values: list[BatchValue] = []
    sealed: set[int] = set()
    for (position, cast), column in zip(positions, targets):
        if column is None:
            continue
        if used.count(position) > 1:
            # One sealed cell cannot feed a second column, sealed or not.
            raise UnsealableSelect(
                column, "INSERT ... SELECT uses its source column for several outputs"
            )
        if cast is not None:
            _check_cast(cast, column, array=False)
        sealed.add(position)
        for cell in row_source.cells[position]:
            node = _sealable(cell, column, row_source.array)
            values.append(BatchValue(node, column, row_source.array))
    _check_sort(select.get("sortClause", []), row_source, sealed, first)
    return BatchInsert(tuple(values), tuple(refs))


def _row_source(from_clause: list[Node], column: EncryptedColumn) -> _RowSource:
    if len(from_clause) == 1:
        ((kind, body),) = from_clause[0].items()
        if kind == "RangeSubselect":
            return _values_source(body, column)
        if kind == "RangeFunction":
            return _unnest_source(body, column)
    raise UnsealableSelect(
        column,
        "INSERT ... SELECT would let the server compute the stored value unless "
        "it selects from one VALUES list or UNNEST of parameters",
    )


def _values_source(body: Node, column: EncryptedColumn) -> _RowSource:
    """Read `(VALUES (...), ...) AS alias(names)`."""
    subquery = body.get("subquery", {}).get("SelectStmt", {})
    rows = subquery.get("valuesLists")
    if not rows or set(body) - {"subquery", "alias"} or set(subquery) - _VALUES_KEYS:
        raise UnsealableSelect(
            column,
            "INSERT ... SELECT from a subquery other than a plain VALUES list "
            "would let the server compute the stored value",
        )
    items = [row["List"]["items"] for row in rows]
    width = len(items[0])
    alias, names = _alias(body)
    defaults = tuple(f"column{i + 1}" for i in range(width))
    names = names + defaults[len(names) :]
    cells = tuple(tuple(row[i] for row in items if i < len(row)) for i in range(width))
    return _RowSource(alias, names, cells, array=False)


def _unnest_source(body: Node, column: EncryptedColumn) -> _RowSource:
    """Read `UNNEST(array, ...) AS alias(names)`, without ORDINALITY or ROWS FROM."""
    functions = body.get("functions", [])
    call: Node = {}
    if len(functions) == 1 and not set(body) - {"functions", "alias"}:
        pair = functions[0]["List"]["items"]
        if len(pair) == 2 and not pair[1]:
            call = pair[0].get("FuncCall", {})
    names = [item["String"]["sval"] for item in call.get("funcname", [])]
    if names not in (["unnest"], ["pg_catalog", "unnest"]) or set(call) - _CALL_KEYS:
        raise UnsealableSelect(
            column,
            "INSERT ... SELECT from a function other than UNNEST of parameters "
            "would let the server compute the stored value",
        )
    alias, colnames = _alias(body)
    args = call.get("args", [])
    return _RowSource(alias, colnames, tuple((arg,) for arg in args), array=True)


def _alias(body: Node) -> tuple[str, tuple[str, ...]]:
    alias = body.get("alias", {})
    names = tuple(item["String"]["sval"] for item in alias.get("colnames", []))
    return str(alias.get("aliasname", "")), names


def _output_positions(
    target_list: list[Node], source: _RowSource, column: EncryptedColumn
) -> tuple[list[tuple[int, Node | None]], list[Node]]:
    """Map each output column to the row source column it copies, and its cast."""
    values = [item["ResTarget"]["val"] for item in target_list]
    if len(values) == 1 and _is_star(values[0], source):
        return [(i, None) for i in range(len(source.cells))], [values[0]["ColumnRef"]]
    positions: list[tuple[int, Node | None]] = []
    refs = []
    for value in values:
        cast = value.get("TypeCast")
        ref = (cast["arg"] if cast else value).get("ColumnRef")
        position = _position(ref, source) if ref is not None else None
        if position is None:
            raise UnsealableSelect(
                column,
                "INSERT ... SELECT may only list the columns of its VALUES or "
                "UNNEST source, else the server computes the stored value",
            )
        assert ref is not None
        positions.append((position, cast))
        refs.append(ref)
    return positions, refs


def _is_star(value: Node, source: _RowSource) -> bool:
    fields = value.get("ColumnRef", {}).get("fields", [])
    if not fields or "A_Star" not in fields[-1]:
        return False
    qualifier = [item.get("String", {}).get("sval") for item in fields[:-1]]
    return qualifier in ([], [source.alias])


def _position(ref: Node, source: _RowSource) -> int | None:
    """Return the row source column that `ref` names, or None."""
    names = [item.get("String", {}).get("sval") for item in ref.get("fields", [])]
    if len(names) == 2 and names[0] == source.alias:
        names = names[1:]
    if len(names) != 1 or source.names.count(names[0]) != 1:
        return None
    return source.names.index(names[0])


def _sealable(node: Node, column: EncryptedColumn, array: bool) -> Node:
    """Return the parameter or literal under `node`'s storage casts, or raise."""
    while "TypeCast" in node:
        cast = node["TypeCast"]
        _check_cast(cast, column, array)
        node = cast["arg"]
    if "ParamRef" in node:
        return node
    const = node.get("A_Const")
    if const is not None and (const.get("isnull") or not array or "sval" in const):
        return node
    what = "a parameter or a literal array" if array else "a parameter or a literal"
    raise UnsealableSelect(
        column,
        f"INSERT ... SELECT can seal only {what} for it; the server would "
        "compute this value and store it in plaintext",
    )


def _check_cast(cast: Node, column: EncryptedColumn, array: bool) -> None:
    """Accept a cast that leaves the sealed value unchanged, or raise."""
    type_name = cast["typeName"]
    names = [item["String"]["sval"] for item in type_name.get("names", [])]
    name = names[-1] if names else "?"
    if (
        names[:-1] not in ([], ["pg_catalog"])
        or name not in _STORAGE_CASTS[column.storage]
    ):
        raise UnsealableSelect(
            column,
            f"INSERT ... SELECT casts it to {name}, which would run on the "
            f"{column.storage.value} ciphertext",
        )
    if type_name.get("typmods"):
        raise UnsealableSelect(
            column,
            f"INSERT ... SELECT casts it to {name} with a length, which would "
            "cut the sealed value",
        )
    if bool(type_name.get("arrayBounds")) != array:
        raise UnsealableSelect(
            column,
            "INSERT ... SELECT casts an UNNEST argument to a non-array type, or "
            "a VALUES cell to an array type",
        )


def _check_sort(
    sort_clause: list[Node],
    source: _RowSource,
    sealed: set[int],
    column: EncryptedColumn,
) -> None:
    """Accept ORDER BY on row source columns that feed no encrypted column."""
    for item in sort_clause:
        ref = item["SortBy"].get("node", {}).get("ColumnRef")
        position = _position(ref, source) if ref is not None else None
        if position is None or position in sealed:
            raise UnsealableSelect(
                column,
                "INSERT ... SELECT may ORDER BY only source columns that are "
                "not stored in an encrypted column",
            )
