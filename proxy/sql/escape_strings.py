"""Statement text for a session whose standard_conforming_strings is off.

With the setting off, the server reads a backslash in a plain '...' string
constant as an escape, as in E'...'. pglast always parses with the setting
on, so the proxy first rewrites every such constant that contains a
backslash as an E'...' constant. The rewritten text has the same meaning to
the server, so pglast, the literals the proxy seals and the server agree.

The scanner follows PostgreSQL 15's scan.l: comments, quoted identifiers,
dollar quotes, string prefixes and the continuation of a string constant
across a newline.
"""

from __future__ import annotations

import re

from proxy.errors import StatementRejected

_WORD = re.compile(r"[A-Za-z0-9_$\u0080-\U0010ffff]+")
_DOLLAR_TAG = re.compile(
    r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$"
)
# Whitespace with a newline, which may hold -- comments, then the quote that
# continues the string constant before it.
_CONTINUATION = re.compile(
    r"(?:[ \t\f]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f]+|--[^\n\r]*[\n\r])*'"
)


def as_escape_strings(sql: str) -> str:
    """Rewrite plain string constants that hold a backslash as E'...' constants.

    Raises StatementRejected for a U&'...' constant, which the server rejects
    too while standard_conforming_strings is off. Text after an unterminated
    constant or comment stays as it is, for the server to report.
    """
    return _Rewriter(sql).run()


class _Rewriter:
    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.pieces: list[str] = []
        self.copied = 0

    def run(self) -> str:
        sql = self.sql
        i = 0
        while i < len(sql):
            if sql.startswith("--", i):
                end = sql.find("\n", i)
                i = len(sql) if end < 0 else end + 1
            elif sql.startswith("/*", i):
                i = _skip_block_comment(sql, i)
            elif sql[i] == '"':
                end = sql.find('"', i + 1)
                # A doubled quote inside is two adjacent quoted parts here,
                # which skips the same characters.
                i = len(sql) if end < 0 else end + 1
            elif sql[i] == "$" and (tag := _DOLLAR_TAG.match(sql, i)) is not None:
                end = sql.find(tag.group(), tag.end())
                i = len(sql) if end < 0 else end + len(tag.group())
            elif sql[i] == "'":
                i = self._plain_string(i, i, " E")
            elif (word := _WORD.match(sql, i)) is not None:
                i = self._after_word(word.group(), i, word.end())
            else:
                i += 1
        self.pieces.append(sql[self.copied :])
        return "".join(self.pieces)

    def _after_word(self, word: str, start: int, end: int) -> int:
        """Scan the string constant that `word` prefixes, if any."""
        sql = self.sql
        prefix = word.lower()
        if prefix == "u" and sql.startswith("&'", end):
            raise StatementRejected(
                "0A000",
                "unsafe use of string constant with Unicode escapes",
                "String constants with Unicode escapes cannot be used when "
                "standard_conforming_strings is off.",
            )
        if not sql.startswith("'", end):
            return end
        if prefix == "e":
            return _scan_string(sql, end, escapes=True)[0]
        if prefix in ("b", "x"):
            return _scan_string(sql, end, escapes=False)[0]
        if prefix == "n":
            # N'...' is the keyword NCHAR then a plain constant.
            return self._plain_string(end, start, "NCHAR E", replaces=1)
        # A word such as a type name followed by a plain constant.
        return self._plain_string(end, end, " E")

    def _plain_string(self, quote: int, at: int, insert: str, replaces: int = 0) -> int:
        """Scan a plain constant and, if it contains a backslash, put `insert` at `at`."""
        end, backslash = _scan_string(self.sql, quote, escapes=True)
        if backslash:
            self.pieces.append(self.sql[self.copied : at] + insert)
            self.copied = at + replaces
        return end


def _scan_string(sql: str, quote: int, escapes: bool) -> tuple[int, bool]:
    """Return the end of the string constant whose quote is at `quote`.

    Also return whether it contains a backslash. With `escapes`, a backslash
    escapes the next character, as the server reads it.
    """
    i = quote + 1
    backslash = False
    while i < len(sql):
        char = sql[i]
        if char == "\\":
            backslash = True
            i += 2 if escapes else 1
        elif char != "'":
            i += 1
        elif sql.startswith("''", i):
            i += 2
        elif (more := _CONTINUATION.match(sql, i + 1)) is not None:
            i = more.end()
        else:
            return i + 1, backslash
    return len(sql), backslash


def _skip_block_comment(sql: str, start: int) -> int:
    """Return the end of the /* */ comment at `start`; these comments nest."""
    depth = 0
    i = start
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)
