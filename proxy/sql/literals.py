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


def replace_spans(sql: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """Return `sql` with each (start, end, text) edit applied.

    The spans must not overlap.
    """
    pieces = []
    position = 0
    for start, end, text in sorted(edits):
        pieces.append(sql[position:start])
        pieces.append(text)
        position = end
    pieces.append(sql[position:])
    return "".join(pieces)


def value_span(
    sql: str, node: dict[str, Any], column: EncryptedColumn
) -> tuple[int, int]:
    """Return the character span of a parameter or constant, with a cast around it.

    The forms are `$1`, `'a'`, `$1::varchar(20)`, `CAST($1 AS text)` and
    `text 'a'`. Raises StatementRejected when the tokens do not match the node.
    """
    ((kind, body),) = node.items()
    tokens = parser.scan(sql)
    if kind != "TypeCast":
        return _token_span(sql, tokens, body["location"], column)
    inner_start, inner_end = value_span(sql, body["arg"], column)
    type_start = _char_offset(sql, body["typeName"]["location"])
    if type_start < inner_start:
        return type_start, inner_end
    cast_start = _char_offset(sql, body["location"])
    following = [token for token in tokens if token.start >= cast_start]
    if cast_start < inner_start and following and following[0].name == "CAST":
        return cast_start, _closing_paren(following, column)
    return inner_start, _type_name_end(tokens, type_start, column)


def column_ref_span(
    sql: str, ref: dict[str, Any], column: EncryptedColumn
) -> tuple[int, int]:
    """Return the character span of a column reference such as `a."email"`."""
    start = _char_offset(sql, ref["location"])
    following = [token for token in parser.scan(sql) if token.start >= start]
    # Each name is one token, quoted or not, with a dot between two names.
    count = 2 * len(ref.get("fields", [])) - 1
    if count < 1 or len(following) < count or following[0].start != start:
        raise _unlocatable(column)
    return start, int(following[count - 1].end) + 1


def _token_span(
    sql: str, tokens: Sequence[Any], byte_offset: int, column: EncryptedColumn
) -> tuple[int, int]:
    start = _char_offset(sql, byte_offset)
    following = [token for token in tokens if token.start >= start]
    if not following or following[0].start != start:
        raise _unlocatable(column)
    end = following[0].end + 1
    if following[0].name == "ASCII_45" and len(following) > 1:
        end = following[1].end + 1
    return start, end


def _closing_paren(tokens: Sequence[Any], column: EncryptedColumn) -> int:
    depth = 0
    for token in tokens:
        if token.name == "ASCII_40":
            depth += 1
        elif token.name == "ASCII_41":
            depth -= 1
            if depth == 0:
                return int(token.end) + 1
    raise _unlocatable(column)


def _type_name_end(tokens: Sequence[Any], start: int, column: EncryptedColumn) -> int:
    """Return where a type name such as `character varying(20)` or `text[]` ends."""
    end = None
    depth = 0
    for token in (token for token in tokens if token.start >= start):
        if token.name in ("ASCII_40", "ASCII_91"):
            depth += 1
        elif token.name in ("ASCII_41", "ASCII_93"):
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and not (
            token.name in ("IDENT", "ASCII_46")
            or token.kind in ("UNRESERVED_KEYWORD", "COL_NAME_KEYWORD")
        ):
            break
        end = token.end + 1
    if end is None:
        raise _unlocatable(column)
    return int(end)


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
