"""Checks on DDL that would make a ruled table store plaintext or break its rule.

The proxy cannot undo DDL once the server has run it. A default on an
encrypted column stores plaintext in every row that omits the column, and a
renamed table or column no longer matches the rule that names it. So such
statements are rejected before they reach the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from proxy.catalog import RuledTable
from proxy.errors import StatementRejected

Node = dict[str, Any]
TableOf = Callable[[Node], RuledTable | None]

FEATURE_NOT_SUPPORTED = "0A000"

_RULE_FIRST_HINT = (
    "Change the rule file first and reload the rules, in a maintenance "
    "window, then run the DDL; see 'Changing a ruled table' in the README."
)
# ALTER TABLE subcommands that set how the server computes a column's value.
_COMPUTED = {
    "AT_ColumnDefault": "a default",
    "AT_AddIdentity": "an identity",
    "AT_SetIdentity": "an identity",
    "AT_AlterColumnType": "a new type",
}
_CONSTRAINT_WORDS = {
    "CONSTR_DEFAULT": "a default",
    "CONSTR_GENERATED": "a generated expression",
    "CONSTR_IDENTITY": "an identity",
    "CONSTR_CHECK": "a check constraint",
}


def check_ddl(stmt: Node, table_of: TableOf) -> None:
    """Reject DDL on a ruled table that would store plaintext or break its rule."""
    ((kind, body),) = stmt.items()
    if kind == "AlterTableStmt":
        _alter_table(body, table_of)
    elif kind == "RenameStmt":
        _rename(body, table_of)
    elif kind == "AlterObjectSchemaStmt" and body.get("objectType") == "OBJECT_TABLE":
        table = _ruled_table(body.get("relation"), table_of)
        if table is not None:
            raise _reject(f"moving ruled table {table.qualified_name} to another schema")
    elif kind == "CreateStmt":
        _create_child(body, table_of)


def _alter_table(body: Node, table_of: TableOf) -> None:
    relation = table_of(body["relation"])
    for item in body.get("cmds", []):
        cmd = item["AlterTableCmd"]
        subtype = cmd.get("subtype", "")
        if subtype == "AT_AddInherit":
            parent = _ruled_table(cmd["def"].get("RangeVar"), table_of)
            if parent is not None:
                raise _reject(
                    f"making a table an inheritance child of ruled table "
                    f"{parent.qualified_name}, because its rows may hold plaintext",
                    "Create the child with CREATE TABLE ... INHERITS through the "
                    "proxy, and copy the rows into it through the proxy.",
                )
        if relation is None:
            continue
        _alter_ruled(relation, cmd, subtype)


def _alter_ruled(table: RuledTable, cmd: Node, subtype: str) -> None:
    name = cmd.get("name", "")
    where = table.qualified_name
    if subtype == "AT_AttachPartition" and not table.is_view:
        raise _reject(
            f"attaching a partition to ruled table {where}, because its rows may "
            "hold plaintext",
            "Create the partition with CREATE TABLE ... PARTITION OF through the "
            "proxy, and copy the rows into it through the proxy.",
        )
    # DROP DEFAULT is AT_ColumnDefault without an expression.
    computed = subtype in _COMPUTED and (subtype != "AT_ColumnDefault" or "def" in cmd)
    if name in table.encrypted and computed:
        what = _COMPUTED[subtype]
        raise _reject(f"giving encrypted column {where}.{name} {what}")
    if subtype == "AT_DropColumn" and not table.is_view and name in _rule_columns(table):
        raise _reject(f"dropping column {where}.{name}, which a rule names")
    if subtype == "AT_AlterColumnType" and name in _rule_columns(table):
        # An associated or subject column's values are bound into sealed
        # values in their canonical text, which a new type may change.
        raise _reject(f"giving column {where}.{name}, which a rule names, a new type")
    if subtype in ("AT_AddConstraint", "AT_AddColumn"):
        _check_constraints(table, [cmd.get("def", {})])


def _rename(body: Node, table_of: TableOf) -> None:
    rename_type = body.get("renameType")
    table = _ruled_table(body.get("relation"), table_of)
    if table is None:
        return
    if rename_type in ("OBJECT_TABLE", "OBJECT_FOREIGN_TABLE"):
        raise _reject(f"renaming ruled table {table.qualified_name}")
    column = body.get("subname", "")
    if rename_type == "OBJECT_COLUMN" and column in _rule_columns(table):
        raise _reject(f"renaming column {table.qualified_name}.{column}, which a rule names")


def _create_child(body: Node, table_of: TableOf) -> None:
    """Check a new inheritance child or partition, which takes its parent's rules."""
    for parent_node in body.get("inhRelations", []):
        parent = _ruled_table(parent_node.get("RangeVar"), table_of)
        if parent is not None:
            _check_constraints(parent, body.get("tableElts", []))


def _check_constraints(table: RuledTable, elements: list[Node]) -> None:
    """Reject column or table constraints that compute an encrypted column's value."""
    for element in elements:
        if "ColumnDef" in element:
            column = element["ColumnDef"]
            for constraint in column.get("constraints", []):
                contype = constraint["Constraint"].get("contype", "")
                if column.get("colname") in table.encrypted and contype in _CONSTRAINT_WORDS:
                    raise _reject(
                        f"giving encrypted column {table.qualified_name}."
                        f"{column['colname']} {_CONSTRAINT_WORDS[contype]}"
                    )
                _check_expression(table, constraint["Constraint"])
        elif "Constraint" in element:
            _check_expression(table, element["Constraint"])


def _check_expression(table: RuledTable, constraint: Node) -> None:
    contype = constraint.get("contype", "")
    if contype not in ("CONSTR_CHECK", "CONSTR_GENERATED"):
        return
    for name in _column_names(constraint.get("raw_expr")):
        if name in table.encrypted:
            raise _reject(
                f"{_CONSTRAINT_WORDS[contype]} on encrypted column "
                f"{table.qualified_name}.{name}, which would compute on ciphertext",
                "Check or compute the value in the application, before the proxy "
                "seals it.",
            )


def _ruled_table(relation: Node | None, table_of: TableOf) -> RuledTable | None:
    if not relation:
        return None
    table = table_of(relation)
    return table if table is not None and not table.is_view else None


def _rule_columns(table: RuledTable) -> set[str]:
    """Return the columns a rule names: encrypted, associated and subject columns."""
    names = set(table.encrypted)
    for column in table.encrypted.values():
        names.update(associated.name for associated in column.associated)
        if column.subject_column is not None:
            names.add(column.subject_column)
    return names


def _column_names(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _column_names(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "ColumnRef":
                fields = value.get("fields", [])
                if fields and "String" in fields[-1]:
                    yield fields[-1]["String"]["sval"]
            else:
                yield from _column_names(value)


def _reject(action: str, hint: str = _RULE_FIRST_HINT) -> StatementRejected:
    return StatementRejected(
        FEATURE_NOT_SUPPORTED, f"{action} is not supported through the proxy", hint
    )
