"""Where a write carries the subject of each value sealed under a subject's key.

A column with `key_scope: subject` is sealed under the data key of the row's
subject, so every statement that stores a value in it must also carry the
row's subject value where the proxy can read it: a parameter or a literal in
the same row of an INSERT, the SET list of an UPDATE, or a top-level
`WHERE subject_column = $n` that pins the rows an UPDATE changes. Anything
else is rejected, because the proxy could not tell which key to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn

Node = dict[str, Any]

FEATURE_NOT_SUPPORTED = "0A000"


@dataclass(frozen=True, slots=True)
class SubjectSource:
    """The parameter number or the literal text that contains a row's subject value."""

    param: int | None = None
    literal: str | None = None


def value_subject(node: Node | None, column: EncryptedColumn, where: str) -> SubjectSource:
    """Return the subject source of a subject column's value node, or reject it.

    `where` names the place that lacks a usable subject, for the message.
    """
    subject = column.subject_column
    if node is None:
        raise missing_subject(column, where)
    kind, body = _only(node)
    if kind == "TypeCast":
        kind, body = _only(body["arg"])
    if kind == "ParamRef":
        return SubjectSource(param=body["number"])
    if kind == "A_Const" and not body.get("isnull"):
        return SubjectSource(literal=_constant_text(body))
    raise StatementRejected(
        FEATURE_NOT_SUPPORTED,
        f"column {column.identity} is keyed per subject, and the value of its "
        f"subject column {subject} in {where} is not a parameter or a "
        "non-null literal, so the proxy cannot choose the data key",
        f"Send {subject} as a parameter or a literal.",
    )


def where_subject(
    where: Node | None, column: EncryptedColumn, qualifiers: set[str]
) -> SubjectSource | None:
    """Return the source of `subject_column = $n` among the WHERE's top-level ANDs.

    `qualifiers` are the names that may qualify the column: the updated
    table's name and alias.
    """
    if where is None:
        return None
    kind, body = _only(where)
    terms = [where]
    if kind == "BoolExpr" and body.get("boolop") == "AND_EXPR":
        terms = body.get("args", [])
    for term in terms:
        source = _equality_subject(term, column, qualifiers)
        if source is not None:
            return source
    return None


def missing_subject(column: EncryptedColumn, where: str) -> StatementRejected:
    subject = column.subject_column
    return StatementRejected(
        FEATURE_NOT_SUPPORTED,
        f"column {column.identity} is keyed per subject, but {where} does not "
        f"set its subject column {subject}, so the proxy cannot choose the "
        "data key",
        f"Set {subject} with a parameter or a literal in the same row; an "
        f"UPDATE may instead pin it with WHERE {subject} = $n.",
    )


def _equality_subject(
    term: Node, column: EncryptedColumn, qualifiers: set[str]
) -> SubjectSource | None:
    kind, body = _only(term)
    if kind != "A_Expr" or body.get("kind") != "AEXPR_OP":
        return None
    names = [item["String"]["sval"] for item in body.get("name", []) if "String" in item]
    if names != ["="]:
        return None
    sides = (body.get("lexpr", {}), body.get("rexpr", {}))
    for ref, other in (sides, sides[::-1]):
        if _names_column(ref, column.subject_column, qualifiers):
            try:
                return value_subject(other, column, "the WHERE clause")
            except StatementRejected:
                return None
    return None


def _names_column(node: Node, name: str | None, qualifiers: set[str]) -> bool:
    ref = node.get("ColumnRef")
    if ref is None:
        return False
    names = [item.get("String", {}).get("sval") for item in ref.get("fields", [])]
    if len(names) == 1:
        return bool(names[0] == name)
    return len(names) == 2 and names[0] in qualifiers and names[1] == name


def _constant_text(const: Node) -> str:
    """Return the text of an A_Const as the server would read it."""
    for kind in ("ival", "fval", "sval", "bsval"):
        if kind in const:
            value = const[kind].get(kind, 0 if kind == "ival" else "")
            return str(value)
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    return ""


def _only(node: Node) -> tuple[str, Node]:
    ((kind, body),) = node.items()
    return kind, body
