"""Batch INSERT ... SELECT over VALUES or UNNEST, analysed without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.catalog import Catalog, EncryptedColumn, RuledTable, Storage
from proxy.errors import StatementRejected
from proxy.rules import ColumnRule, Encryption, Source
from proxy.sql.analyze import Analyzer

SOURCE = Source(Path("rules/test.yaml"), 1)


def _column(name: str, attnum: int, storage: Storage) -> EncryptedColumn:
    rule = ColumnRule("public", "accounts", name, Encryption.RANDOMIZED, SOURCE)
    return EncryptedColumn(rule, attnum, storage)


TOKEN = _column("token", 3, Storage.TEXT)
PHOTO = _column("photo", 4, Storage.BYTEA)
ACCOUNTS = RuledTable(
    oid=16400,
    schema="public",
    name="accounts",
    columns=("id", "owner", "token", "photo"),
    encrypted={"token": TOKEN, "photo": PHOTO},
)

# The statement SQLAlchemy 2 sends for session.add_all() with insertmanyvalues.
SQLALCHEMY = (
    "INSERT INTO accounts (owner, token) SELECT p0::INTEGER, p1::VARCHAR "
    "FROM (VALUES ($1::INTEGER, $2::VARCHAR, 0), ($3::INTEGER, $4::VARCHAR, 1)) "
    "AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING accounts.id"
)
# The statement Django 5.2 sends for bulk_create() of several rows.
DJANGO = (
    "INSERT INTO accounts (owner, token, photo) SELECT * FROM "
    "UNNEST(($1)::integer[], ($2)::text[], ($3)::bytea[]) RETURNING accounts.id"
)


@pytest.fixture
def analyzer() -> Analyzer:
    return Analyzer(Catalog.build([ACCOUNTS]))


def _rejected(analyzer: Analyzer, sql: str) -> StatementRejected:
    with pytest.raises(StatementRejected) as info:
        analyzer.plan(sql)
    return info.value


def test_values_select_params_sealed(analyzer: Analyzer) -> None:
    plan = analyzer.plan(SQLALCHEMY)
    assert plan.params == {2: TOKEN, 4: TOKEN}
    assert plan.arrays == frozenset()


def test_values_select_literals_sealed(analyzer: Analyzer) -> None:
    sql = (
        "INSERT INTO accounts (owner, token) SELECT v.a, v.b "
        "FROM (VALUES (1, 'first'), (2, NULL), (3, 'third'::text)) AS v(a, b)"
    )
    plan = analyzer.plan(sql)
    spans = [(sql[slot.start : slot.end], slot.value) for slot in plan.literals]
    assert spans == [("'first'", "first"), ("'third'", "third")]
    assert not any(slot.array for slot in plan.literals)


def test_values_select_star(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "INSERT INTO accounts (owner, token) SELECT * FROM (VALUES ($1, $2)) v"
    )
    assert plan.params == {2: TOKEN}


def test_values_select_default_column_names(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "INSERT INTO accounts (token, owner) "
        "SELECT column2, column1 FROM (VALUES ($1, $2)) AS v"
    )
    assert plan.params == {2: TOKEN}


def test_unnest_params_sealed_as_arrays(analyzer: Analyzer) -> None:
    plan = analyzer.plan(DJANGO)
    assert plan.params == {2: TOKEN, 3: PHOTO}
    assert plan.arrays == frozenset({2, 3})


def test_unnest_array_literal_sealed(analyzer: Analyzer) -> None:
    sql = (
        "INSERT INTO accounts (owner, token) SELECT * FROM "
        "UNNEST(('{1,2}'::int2[])::integer[], ('{a,NULL}'::text[])::varchar[])"
    )
    plan = analyzer.plan(sql)
    (slot,) = plan.literals
    assert sql[slot.start : slot.end] == "'{a,NULL}'"
    assert slot.array


def test_unnest_alias_columns(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "INSERT INTO accounts (owner, token) "
        "SELECT u.o, u.t FROM pg_catalog.unnest($1::int[], $2::text[]) AS u(o, t)"
    )
    assert plan.params == {2: TOKEN}
    assert plan.arrays == frozenset({2})


def test_select_into_plain_columns_untouched(analyzer: Analyzer) -> None:
    plan = analyzer.plan("INSERT INTO accounts (owner) SELECT id FROM accounts")
    assert plan.params == {}


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "INSERT INTO accounts (owner, token) SELECT 1, owner::text FROM accounts",
            "VALUES list or UNNEST",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, upper(b) "
                "FROM (VALUES (1, $1)) v(a, b)"
            ),
            "may only list the columns",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b "
                "FROM (VALUES (1, upper($1))) v(a, b)"
            ),
            "can seal only a parameter or a literal",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b "
                "FROM (VALUES (1, $1 || 'x')) v(a, b)"
            ),
            "can seal only a parameter or a literal",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b "
                "FROM (VALUES (1, $1)) v(a, b) WHERE a > 0"
            ),
            "clauses other than FROM and ORDER BY",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b "
                "FROM (VALUES (1, $1)) v(a, b) ORDER BY b"
            ),
            "ORDER BY only source columns",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b::varchar(20) "
                "FROM (VALUES (1, $1)) v(a, b)"
            ),
            "with a length",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b::integer "
                "FROM (VALUES (1, $1)) v(a, b)"
            ),
            "casts it to int4",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b "
                "FROM (VALUES (1, $1::bytea)) v(a, b)"
            ),
            "casts it to bytea",
        ),
        (
            "INSERT INTO accounts (owner, token) SELECT b, b FROM (VALUES ($1)) v(b)",
            "for several outputs",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b FROM "
                "(VALUES (1, $1)) v(a, b), accounts"
            ),
            "VALUES list or UNNEST",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b FROM "
                "(SELECT id, token FROM accounts) v(a, b)"
            ),
            "plain VALUES list",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT a, b FROM "
                "(VALUES (1, $1)) v(a, b) UNION ALL SELECT 2, 'plain'"
            ),
            "clauses other than FROM",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "generate_series(1, 2), UNNEST($1::text[])"
            ),
            "VALUES list or UNNEST",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "UNNEST($1::int[], upper($2)::text[])"
            ),
            "can seal only a parameter or a literal array",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "UNNEST($1::int[], ARRAY[$2])"
            ),
            "can seal only a parameter or a literal array",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "UNNEST($1::int[], $2::integer[])"
            ),
            "casts it to int4",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) "
                "SELECT * FROM UNNEST($1::int[], $2::text)"
            ),
            "non-array type",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "UNNEST($1::int[], $2::text[]) WITH ORDINALITY"
            ),
            "other than UNNEST",
        ),
        (
            (
                "INSERT INTO accounts (owner, token) SELECT * FROM "
                "string_to_array($1, ',')"
            ),
            "other than UNNEST",
        ),
        ("INSERT INTO accounts DEFAULT VALUES", "DEFAULT VALUES"),
    ],
)
def test_near_miss_rejected(analyzer: Analyzer, sql: str, reason: str) -> None:
    rejected = _rejected(analyzer, sql)
    assert rejected.sqlstate == "0A000"
    assert reason in rejected.message
    assert "public.accounts." in rejected.message
    assert "UNNEST" in rejected.hint
