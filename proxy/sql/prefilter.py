"""The check that lets statements naming no ruled relation skip the parser.

Parsing costs far more than a substring search, so a statement is parsed
only when its text may name a ruled table or view. The search must never
miss a name that the server would resolve to one, because a statement that
is not parsed passes through unchecked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pglast import parser

from proxy.errors import StatementRejected

if TYPE_CHECKING:
    from proxy.catalog import RuledTable

SYNTAX_ERROR = "42601"
# The start of a Unicode escape identifier, U&"d\0061ta", which the server
# decodes, so a ruled table's name need not appear in the text.
UNICODE_IDENTIFIER = 'u&"'
# Words that make a statement worth parsing even when it names no ruled table.
_PARSE_ANYWAY = ("execute", "deallocate", "search_path")
_SYNTAX_HINT = (
    "Correct the statement. The proxy does not send a statement that may name "
    "a table with encrypted columns unless it can parse it, so that its values "
    "never reach the server or its log in plaintext."
)
# PostgreSQL folds unquoted identifiers to lower case in ASCII only when the
# database encoding is multibyte, such as UTF8.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_case(text: str) -> str:
    """Lower-case ASCII letters only, as the server folds unquoted identifiers."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


class NameFilter:
    """Find the ruled relations whose names a statement text may contain.

    Quoted identifiers that differ in case name other relations, and a
    comment between two words ends an identifier, so a search for the
    case-folded name finds every plain or quoted spelling. Only a Unicode
    escape identifier can spell the name with other characters.
    """

    def __init__(self, tables: Iterable[RuledTable], broken: Iterable[str] = ()) -> None:
        self._names = {fold_case(table.name): table for table in tables}
        # Tables that no longer match their rule: statements on them are
        # parsed so that the analysis can reject them.
        self._broken = frozenset(fold_case(name) for name in broken)

    def named(self, folded: str) -> list[RuledTable]:
        """Return the ruled relations whose names occur in the folded text."""
        return [table for name, table in self._names.items() if name in folded]

    def should_parse(self, folded: str, named: list[RuledTable]) -> bool:
        return (
            bool(named)
            or any(name in folded for name in self._broken)
            or UNICODE_IDENTIFIER in folded
            or any(word in folded for word in _PARSE_ANYWAY)
        )


def syntax_error(exc: parser.ParseError, named: list[RuledTable]) -> StatementRejected:
    """Build the rejection of a statement that may name a ruled relation but does not parse.

    pglast reports the error position as a 0-based character index, and the
    ErrorResponse position field is 1-based.
    """
    message, location = (list(exc.args) + [None, None])[:2]
    if named:
        columns = ", ".join(c.identity for t in named for c in t.encrypted.values())
        reason = f"the statement names encrypted columns ({columns})"
    else:
        reason = "the statement may name a table with encrypted columns"
    return StatementRejected(
        SYNTAX_ERROR,
        f"{message}: {reason}, and the proxy cannot check a statement it cannot parse",
        _SYNTAX_HINT,
        location + 1 if isinstance(location, int) else None,
    )
