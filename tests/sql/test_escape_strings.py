"""The rewrite of plain string constants for standard_conforming_strings off."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.errors import StatementRejected
from proxy.sql.escape_strings import as_escape_strings

CASES = [
    ("SELECT 'a\\b'", "SELECT  E'a\\b'"),
    ("SELECT 'plain', 'x''y'", "SELECT 'plain', 'x''y'"),
    ("SELECT E'a\\'b', 'c'", "SELECT E'a\\'b', 'c'"),
    # The escaped quote keeps the constant open up to the next quote.
    ("VALUES ('\\', ', 'secret')", "VALUES ( E'\\', ', 'secret')"),
    ("SELECT n'a\\b'", "SELECT NCHAR E'a\\b'"),
    ("SELECT date'x\\y'", "SELECT date E'x\\y'"),
    ("SELECT B'01', X'ff'", "SELECT B'01', X'ff'"),
    ("SELECT $$a\\b$$, $t$'\\'$t$", "SELECT $$a\\b$$, $t$'\\'$t$"),
    ('SELECT "i\'d\\" FROM t', 'SELECT "i\'d\\" FROM t'),
    ("SELECT 1 -- 'c\\d\n", "SELECT 1 -- 'c\\d\n"),
    ("SELECT /* '\\ /* */ */ 'z'", "SELECT /* '\\ /* */ */ 'z'"),
    # A constant continued across a newline is one constant.
    ("SELECT 'a'\n  'b\\c'", "SELECT  E'a'\n  'b\\c'"),
    ("SELECT 'a' -- note\n'b\\c'", "SELECT  E'a' -- note\n'b\\c'"),
    ("SELECT 'a' 'b\\c'", "SELECT 'a'  E'b\\c'"),
    ("SELECT x$y, $1, 'a\\b'", "SELECT x$y, $1,  E'a\\b'"),
    ("SELECT 'open\\", "SELECT  E'open\\"),
]


@pytest.mark.parametrize(("sql", "expected"), CASES)
def test_rewrite(sql: str, expected: str) -> None:
    assert as_escape_strings(sql) == expected


def test_unicode_escape_constant_rejected() -> None:
    with pytest.raises(StatementRejected) as raised:
        as_escape_strings("SELECT U&'d\\0061t'")
    assert raised.value.sqlstate == "0A000"


@given(st.text(alphabet=st.characters(blacklist_characters="\\")))
def test_text_without_backslash_unchanged(sql: str) -> None:
    assume("&'" not in sql)
    assert as_escape_strings(sql) == sql
