"""Literal constants bound for encrypted columns, and their replacement.

libpg_query reports a constant's position as a byte offset into the UTF-8
statement, while pglast's scanner reports tokens by character offset, so
positions are converted before the token under a constant is looked up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pglast import parser

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn
    from proxy.sql.associated import AssociatedValue
    from proxy.sql.subjects import SubjectSource

_NUMBER_TOKENS = {"ICONST", "FCONST"}


@dataclass(frozen=True, slots=True)
class LiteralSlot:
    """A literal in the statement text: where it is and what it holds."""

    start: int
    end: int
    value: str
    column: EncryptedColumn
    # True for an array literal whose elements are each sealed.
    array: bool = False
    # Where the statement gives the row's associated values, for a column
    # with associated columns; every one is a literal or NULL.
    associated: tuple[AssociatedValue, ...] = ()
    # Where the row's subject value is, for a column keyed per subject.
    subject: SubjectSource | None = None


def find_literal_span(
    sql: str, const: dict[str, Any], column: EncryptedColumn
) -> LiteralSlot:
    """Locate the tokens of the A_Const parse node `const` in `sql`."""
    value = _constant_text(const, column)
    start = _char_offset(sql, const["location"])
    tokens = [token for token in parser.scan(sql) if token.end >= start]
    if not tokens or tokens[0].start != start:
        raise _unlocatable(column)
    first = tokens[0]
    end = first.end + 1
    if first.name == "ASCII_45" and len(tokens) > 1:
        # A negative number is a minus sign token followed by the number.
        if tokens[1].name not in _NUMBER_TOKENS:
            raise _unlocatable(column)
        end = tokens[1].end + 1
    return LiteralSlot(start, end, value, column)


def replace_literals(
    sql: str, slots: Sequence[LiteralSlot], render: Callable[[LiteralSlot], str]
) -> str:
    """Return `sql` with every slot replaced by `render(slot)`."""
    pieces = []
    position = 0
    for slot in sorted(slots, key=lambda s: s.start):
        pieces.append(sql[position : slot.start])
        pieces.append(render(slot))
        position = slot.end
    pieces.append(sql[position:])
    return "".join(pieces)


def quote_literal(text: str) -> str:
    """Quote `text` as an escape-string literal, whatever standard_conforming_strings is."""
    escaped = text.replace("\\", "\\\\").replace("'", "''")
    return f"E'{escaped}'"


def _constant_text(const: dict[str, Any], column: EncryptedColumn) -> str:
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "fval" in const:
        return str(const["fval"]["fval"])
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    raise StatementRejected(
        "0A000",
        f"column {column.identity} is encrypted: a bit-string constant cannot "
        "be sealed",
        "Send the value as a text parameter.",
    )


def _char_offset(sql: str, byte_offset: int) -> int:
    if sql.isascii():
        return byte_offset
    return len(sql.encode("utf-8")[:byte_offset].decode("utf-8", "ignore"))


def _unlocatable(column: EncryptedColumn) -> StatementRejected:
    return StatementRejected(
        "0A000",
        f"column {column.identity} is encrypted: a literal for it could not be "
        "located in the statement text",
        "Send the value as a parameter.",
    )
