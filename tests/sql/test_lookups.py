"""Rewriting deterministic lookups for several live key versions, without a server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.catalog import Catalog
from proxy.errors import StatementRejected
from proxy.lookups import (
    check_versions,
    covered,
    lookup_edits,
    move_searches,
    statement_keys,
)
from proxy.sql.analyze import Analyzer, SearchValue
from proxy.sql.hidden_params import hide_randomized_literals
from proxy.sql.literals import replace_spans
from tests.sql.test_analyze import ACCOUNTS, EMAIL

TWO_LIVE = {EMAIL.key_name: ((1, 1), (1, 2))}
ONE_LIVE = {EMAIL.key_name: ((1, 2),)}


@pytest.fixture
def analyzer() -> Analyzer:
    return Analyzer(Catalog.build([ACCOUNTS]))


def _seal(search: SearchValue) -> list[str]:
    assert search.literal is not None
    return [f"'{search.literal.value}@v1'", f"'{search.literal.value}@v2'"]


def _rewrite(analyzer: Analyzer, sql: str, live: dict[str, tuple[tuple[int, int], ...]]) -> str:
    plan = analyzer.plan(sql)
    edits, _ = lookup_edits(plan, live, _seal)
    for slot in plan.literals:
        if not covered(slot.start, slot.end, edits):
            edits.append((slot.start, slot.end, "'sealed'"))
    return replace_spans(sql, edits)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT id FROM accounts WHERE email = $1",
            "SELECT id FROM accounts WHERE email = ANY($1::text[])",
        ),
        (
            "SELECT id FROM accounts WHERE email <> $1::varchar(40) AND id = 1",
            "SELECT id FROM accounts WHERE email <> ALL($1::text[]) AND id = 1",
        ),
        (
            "SELECT id FROM accounts WHERE email = CAST($2 AS text)",
            "SELECT id FROM accounts WHERE email = ANY($2::text[])",
        ),
        (
            "SELECT id FROM accounts WHERE email IN ($1, 'a')",
            (
                "SELECT id FROM accounts WHERE email IN "
                "(($1::text[])[1], ($1::text[])[2], 'a@v1', 'a@v2')"
            ),
        ),
        (
            "SELECT id FROM accounts WHERE email NOT IN ('a')",
            "SELECT id FROM accounts WHERE email NOT IN ('a@v1', 'a@v2')",
        ),
        (
            "SELECT id FROM accounts WHERE email = text 'żółw'",
            "SELECT id FROM accounts WHERE email = ANY(ARRAY['żółw@v1', 'żółw@v2']::text[])",
        ),
        (
            "SELECT id FROM accounts WHERE email <> 'a'::text",
            "SELECT id FROM accounts WHERE email <> ALL(ARRAY['a@v1', 'a@v2']::text[])",
        ),
        (
            "SELECT id FROM accounts WHERE $1 = email AND id = 2",
            "SELECT id FROM accounts WHERE email = ANY($1::text[]) AND id = 2",
        ),
        (
            "SELECT id FROM accounts WHERE 'a' <> accounts.\"email\"",
            (
                "SELECT id FROM accounts WHERE accounts.\"email\" <> "
                "ALL(ARRAY['a@v1', 'a@v2']::text[])"
            ),
        ),
    ],
)
def test_lookup_rewritten_for_two_versions(
    analyzer: Analyzer, sql: str, expected: str
) -> None:
    assert _rewrite(analyzer, sql, TWO_LIVE) == expected


def test_lookup_unchanged_for_one_version(analyzer: Analyzer) -> None:
    sql = "SELECT id FROM accounts WHERE email IN ($1, 'a') OR email = $2"
    assert _rewrite(analyzer, sql, ONE_LIVE) == sql.replace("'a'", "'sealed'")


def test_rewritten_parameters_listed(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT id FROM accounts WHERE email = $1 OR email IN ($3)")
    _, arrays = lookup_edits(plan, TWO_LIVE, _seal)
    assert arrays == {1, 3}
    assert statement_keys(plan) == (EMAIL.key_name,)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email, count(*) FROM accounts GROUP BY email",
        "SELECT email FROM accounts GROUP BY 1",
        "SELECT DISTINCT email FROM accounts",
        "SELECT email FROM accounts UNION SELECT email FROM accounts",
        "SELECT count(DISTINCT email) FROM accounts",
        "SELECT 1 FROM accounts a JOIN accounts b ON a.email = b.email",
        "SELECT 1 FROM accounts a JOIN accounts b USING (email)",
        "SELECT 1 FROM accounts NATURAL JOIN accounts",
        "UPDATE accounts SET email = $1 WHERE email = $1",
        "SELECT id FROM accounts WHERE email = $1 OR email = ANY($1)",
        "PREPARE p AS SELECT id FROM accounts WHERE email = $1",
    ],
)
def test_version_sensitive_rejected(analyzer: Analyzer, sql: str) -> None:
    plan = analyzer.plan(sql)
    check_versions(plan, ONE_LIVE)
    with pytest.raises(StatementRejected) as info:
        check_versions(plan, TWO_LIVE)
    assert info.value.sqlstate == "0A000"
    assert "2 data key versions" in info.value.message
    assert "pgseal reencrypt" in info.value.hint


def test_plain_lookup_has_no_version_check(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT email FROM accounts WHERE email = $1 AND email <> 'x'")
    assert plan.version_checks == ()


def test_any_parameter_is_lookup_array(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT id FROM accounts WHERE email = ANY($1)")
    assert plan.arrays == frozenset({1})
    assert plan.lookup_arrays == frozenset({1})


def test_batch_insert_array_not_lookup_array(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "INSERT INTO accounts (id, email) SELECT * FROM UNNEST($1::int[], $2::text[])"
    )
    assert plan.arrays == frozenset({2})
    assert plan.lookup_arrays == frozenset()


def test_lookup_moved_past_hidden_literal(analyzer: Analyzer) -> None:
    sql = "UPDATE accounts SET token = 'a long token' WHERE email IN ('a', $1)"
    plan = analyzer.plan(sql)
    hidden = hide_randomized_literals(sql, plan.literals, 1)
    assert hidden is not None
    assert hidden.sql == "UPDATE accounts SET token = $2 WHERE email IN ('a', $1)"

    searches = move_searches(plan.searches, hidden.position)
    moved = replace(plan, literals=hidden.sealed_at_parse, searches=searches)
    edits, arrays = lookup_edits(moved, TWO_LIVE, _seal)
    for slot in moved.literals:
        if not covered(slot.start, slot.end, edits):
            edits.append((slot.start, slot.end, "'sealed'"))

    assert replace_spans(hidden.sql, edits) == (
        "UPDATE accounts SET token = $2 WHERE email IN "
        "('a@v1', 'a@v2', ($1::text[])[1], ($1::text[])[2])"
    )
    assert arrays == frozenset({1})
