"""Statement analysis against a hand-built catalog, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.catalog import (
    AssociatedColumn,
    Catalog,
    EncryptedColumn,
    RuledTable,
    Storage,
)
from proxy.errors import StatementRejected
from proxy.rules import ColumnRule, Encryption, Source
from proxy.sql.analyze import Analyzer
from proxy.sql.associated import AssociatedValue
from proxy.types import TYPES

SOURCE = Source(Path("rules/test.yaml"), 1)


def _column(name: str, attnum: int, encryption: Encryption) -> EncryptedColumn:
    rule = ColumnRule("public", "accounts", name, encryption, SOURCE)
    return EncryptedColumn(rule, attnum, Storage.TEXT)


TOKEN = _column("token", 3, Encryption.RANDOMIZED)
EMAIL = _column("email", 4, Encryption.DETERMINISTIC)
ACCOUNTS = RuledTable(
    oid=16400,
    schema="public",
    name="accounts",
    columns=("id", "owner", "token", "email"),
    encrypted={"token": TOKEN, "email": EMAIL},
)


@pytest.fixture
def analyzer() -> Analyzer:
    return Analyzer(Catalog.build([ACCOUNTS]))


def _rejected(analyzer: Analyzer, sql: str) -> StatementRejected:
    with pytest.raises(StatementRejected) as info:
        analyzer.plan(sql)
    return info.value


def test_unruled_statement_skips_parser(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT * FROM pgbench_accounts WHERE aid = $1")
    assert plan.is_empty


def test_syntax_error_on_ruled_table_rejected(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "INSERT INTO accounts (token) VALUES ('s3cret'")
    assert exc.sqlstate == "42601"
    assert "syntax error at end of input" in exc.message
    assert "public.accounts.token" in exc.message
    assert "s3cret" not in exc.message
    assert exc.hint
    assert exc.position is None


def test_syntax_error_position_given(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "SELEC token FROM accounts")
    assert exc.sqlstate == "42601"
    assert exc.position == 1


def test_syntax_error_unruled_table_passes(analyzer: Analyzer) -> None:
    assert analyzer.plan("SELEC id FROM orders").is_empty


def test_insert_params_mapped(analyzer: Analyzer) -> None:
    plan = analyzer.plan("INSERT INTO accounts (owner, token, email) VALUES ($1, $2, $3)")
    assert plan.params == {2: TOKEN, 3: EMAIL}
    assert plan.literals == ()


def test_insert_without_column_list(analyzer: Analyzer) -> None:
    plan = analyzer.plan("INSERT INTO public.accounts VALUES (1, 'bob', $1, $2)")
    assert plan.params == {1: TOKEN, 2: EMAIL}


def test_insert_literals_located(analyzer: Analyzer) -> None:
    sql = "INSERT INTO accounts (token, email) VALUES ('żółw', E'a\\'b'), (NULL, -5)"
    plan = analyzer.plan(sql)
    spans = [(sql[slot.start : slot.end], slot.value) for slot in plan.literals]
    assert spans == [("'żółw'", "żółw"), ("E'a\\'b'", "a'b"), ("-5", "-5")]


def test_update_and_returning(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "UPDATE accounts a SET token = $1 WHERE id = $2 RETURNING a.token, email"
    )
    assert plan.params == {1: TOKEN}


def test_on_conflict_excluded_allowed(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "INSERT INTO accounts (id, token) VALUES ($1, $2) "
        "ON CONFLICT (id) DO UPDATE SET token = EXCLUDED.token"
    )
    assert plan.params == {2: TOKEN}


def test_write_inside_cte_sealed(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "WITH new AS (INSERT INTO accounts (token) VALUES ($1) RETURNING id, token) "
        "SELECT * FROM new"
    )
    assert plan.params == {1: TOKEN}


def test_update_from_sealed(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "UPDATE accounts SET token = $1 FROM accounts other "
        "WHERE other.id = accounts.id AND other.owner = $2"
    )
    assert plan.params == {1: TOKEN}


def test_deterministic_equality_params(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT id FROM accounts WHERE email = $1 OR email IN ($2, 'x')")
    assert plan.params == {1: EMAIL, 2: EMAIL}
    assert [slot.value for slot in plan.literals] == ["x"]


def test_deterministic_group_by_allowed(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT email, count(*) FROM accounts GROUP BY email")
    assert plan.params == {}
    assert plan.outputs == ((EMAIL,), ())


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT * FROM accounts WHERE token = $1", "randomized"),
        ("SELECT * FROM accounts WHERE email LIKE 'a%'", "LIKE"),
        ("SELECT * FROM accounts WHERE email < $1", "operator <"),
        ("SELECT * FROM accounts ORDER BY token", "ORDER BY"),
        ("SELECT upper(token) FROM accounts", "function upper()"),
        ("SELECT DISTINCT token FROM accounts", "DISTINCT"),
        ("SELECT token FROM accounts GROUP BY token", "GROUP BY"),
        ("INSERT INTO accounts (token) VALUES (upper($1))", "computed by the server"),
        ("INSERT INTO accounts (token) SELECT owner FROM accounts", "INSERT ... SELECT"),
        ("UPDATE accounts SET token = token || 'x'", "computed by the server"),
        ("INSERT INTO accounts (token) VALUES ($1::varchar(10))", "with a length"),
        ("COPY accounts FROM '/srv/accounts.csv'", "COPY FROM a server file"),
        ("MERGE INTO accounts a USING (VALUES (1)) v(x) ON a.id = v.x "
         "WHEN MATCHED THEN UPDATE SET token = 'x'", "MERGE"),
        ("PREPARE p AS INSERT INTO accounts (token) VALUES (upper($1))", "computed"),
        ("SELECT * FROM accounts WHERE email = upper($1)", "compared"),
        ("SELECT id, email FROM accounts ORDER BY 2", "ORDER BY"),
        ("SELECT token AS t FROM accounts GROUP BY t", "GROUP BY"),
        ("SELECT email AS e FROM accounts ORDER BY e DESC", "ORDER BY"),
        ("SELECT * FROM accounts WHERE id < 5 ORDER BY 3", "ORDER BY"),
        ("SELECT a.* FROM accounts a ORDER BY 4", "ORDER BY"),
        ("SELECT * FROM accounts a JOIN orders o USING (id) ORDER BY 2", "ORDER BY by position"),
        ("SELECT coalesce(email, token) AS e FROM accounts ORDER BY e", "ORDER BY"),
        ("SELECT email FROM accounts UNION ALL SELECT email FROM accounts ORDER BY 1", "ORDER BY"),
        ("SELECT * FROM accounts GROUP BY 3", "GROUP BY"),
        ("SELECT count(DISTINCT token) FROM accounts", "count(DISTINCT)"),
        ("SELECT a FROM accounts a WHERE id = 1", "whole-row"),
        ("SELECT row_to_json(a) FROM accounts a WHERE id = 1", "whole-row"),
        ("SELECT row_to_json(accounts) FROM accounts", "whole-row"),
        ("SELECT to_json(a.*) FROM accounts a", "whole-row"),
        ("SELECT (a).token FROM accounts a", "whole-row"),
        ("SELECT row_to_json(s) FROM (SELECT * FROM accounts) s", "whole-row"),
        ("SELECT (SELECT email FROM accounts WHERE id = 1)", "subquery"),
        (
            "SELECT id, (SELECT b.token FROM accounts b WHERE b.id = a.id) FROM accounts a",
            "subquery",
        ),
        ("SELECT ARRAY(SELECT token FROM accounts)", "subquery"),
        ("SELECT id FROM accounts WHERE owner IN (SELECT email FROM accounts)", "subquery"),
        (
            (
                "SELECT u.e FROM (SELECT email AS e FROM accounts UNION ALL "
                "SELECT email FROM accounts) u"
            ),
            "subquery in FROM or WITH",
        ),
        (
            "WITH u AS (SELECT coalesce(token, email) AS t FROM accounts) SELECT t FROM u",
            "subquery in FROM or WITH",
        ),
        ("SELECT coalesce(token, owner) FROM accounts", "mixes"),
        ("SELECT coalesce(email, upper(owner)) FROM accounts", "mixes"),
        ("SELECT CASE WHEN id = 1 THEN email ELSE owner END FROM accounts", "mixes"),
        ("SELECT token FROM accounts UNION ALL SELECT owner FROM accounts", "mixes"),
        ("SELECT owner FROM accounts UNION ALL SELECT email FROM accounts", "mixes"),
        (
            (
                "SELECT * FROM accounts a JOIN orders o USING (id) "
                "UNION ALL SELECT * FROM accounts a JOIN orders o USING (id)"
            ),
            "UNION",
        ),
        (
            (
                "CREATE FUNCTION f(t text) RETURNS void LANGUAGE sql "
                "AS $$ INSERT INTO accounts (owner, token) VALUES ('x', t) $$"
            ),
            "function body that names table public.accounts",
        ),
        (
            (
                "CREATE OR REPLACE FUNCTION f(t text) RETURNS void LANGUAGE sql "
                "BEGIN ATOMIC INSERT INTO accounts (token) VALUES (t); END"
            ),
            "function body",
        ),
        (
            (
                "CREATE FUNCTION f() RETURNS text LANGUAGE sql "
                "RETURN (SELECT token FROM accounts LIMIT 1)"
            ),
            "function body",
        ),
        (
            (
                "CREATE PROCEDURE p(t text) LANGUAGE plpgsql "
                "AS 'BEGIN UPDATE Accounts SET token = t; END'"
            ),
            "procedure body",
        ),
    ],
)
def test_rejections(analyzer: Analyzer, sql: str, reason: str) -> None:
    exc = _rejected(analyzer, sql)
    assert exc.sqlstate == "0A000"
    assert reason in exc.message
    assert "public.accounts" in exc.message
    assert exc.hint


def test_null_test_allowed(analyzer: Analyzer) -> None:
    sql = "SELECT count(token) FROM accounts WHERE token IS NOT NULL"
    assert analyzer.plan(sql).is_empty


def test_rejection_cached(analyzer: Analyzer) -> None:
    sql = "SELECT * FROM accounts WHERE token = 'a'"
    first = _rejected(analyzer, sql)
    second = _rejected(analyzer, sql)
    assert first is second


def test_union_all_traced(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "SELECT token, id FROM accounts UNION ALL SELECT email, id FROM accounts"
    )
    assert plan.outputs == ((TOKEN, EMAIL), ())


def test_union_distinct_randomized_rejected(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "SELECT token FROM accounts UNION SELECT token FROM accounts")
    assert "UNION" in exc.message


def test_coalesce_literal_sealed(analyzer: Analyzer) -> None:
    sql = "SELECT coalesce(token, 'none') AS t FROM accounts"
    plan = analyzer.plan(sql)
    assert plan.outputs == ((TOKEN,),)
    assert [(sql[s.start : s.end], s.column) for s in plan.literals] == [("'none'", TOKEN)]


def test_case_passes_column(analyzer: Analyzer) -> None:
    plan = analyzer.plan(
        "SELECT CASE WHEN token IS NULL THEN 'n/a' ELSE token END FROM accounts"
    )
    assert plan.outputs == ((TOKEN,),)
    assert [s.value for s in plan.literals] == ["n/a"]


def test_case_condition_on_column_rejected(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "SELECT CASE token WHEN 'a' THEN 1 END FROM accounts")
    assert "public.accounts.token" in exc.message


def test_coalesce_in_where_rejected(analyzer: Analyzer) -> None:
    _rejected(analyzer, "SELECT id FROM accounts WHERE coalesce(email, 'x') = $1")


def test_star_traced_for_single_table(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT * FROM accounts UNION ALL SELECT * FROM accounts")
    assert plan.outputs == ((), (), (TOKEN,), (EMAIL,))


def test_copy_in_plan(analyzer: Analyzer) -> None:
    plan = analyzer.plan("COPY accounts (email, id) FROM STDIN WITH (FORMAT csv, HEADER)")
    assert plan.copy is not None
    assert plan.copy.direction == "in"
    assert plan.copy.fields == {0: (EMAIL,)}
    assert plan.copy.options.format == "csv"
    assert plan.copy.options.header


def test_copy_out_query_plan(analyzer: Analyzer) -> None:
    plan = analyzer.plan("COPY (SELECT id, token FROM accounts) TO STDOUT")
    assert plan.copy is not None
    assert plan.copy.direction == "out"
    assert plan.copy.fields == {1: (TOKEN,)}


def test_search_path_shadowing() -> None:
    catalog = Catalog.build([ACCOUNTS], {"accounts": frozenset({"public", "audit"})})
    analyzer = Analyzer(catalog)
    sql = "INSERT INTO accounts (token) VALUES ($1)"
    assert analyzer.plan(sql, ("audit", "public")).is_empty
    assert analyzer.plan(sql, ("public", "audit")).params == {1: TOKEN}
    assert analyzer.plan(sql, None).params == {1: TOKEN}


def test_set_search_path_recorded(analyzer: Analyzer) -> None:
    plan = analyzer.plan('SET search_path TO "My Schema", public')
    assert plan.search_path is not None
    assert plan.search_path.value == ("My Schema", "public")
    local = analyzer.plan("SET LOCAL search_path TO x")
    assert local.search_path is not None
    assert local.search_path.value is None
    other = analyzer.plan("SELECT set_config('search_path', 'x', false)")
    assert other.search_path is not None
    assert other.search_path.value is None


# Associated columns


def _bound_table() -> tuple[RuledTable, EncryptedColumn, AssociatedColumn]:
    owner = AssociatedColumn("owner", 2, TYPES["int4"])
    rule = ColumnRule(
        "public", "keys", "secret", Encryption.RANDOMIZED, SOURCE, associated_columns=("owner",)
    )
    secret = EncryptedColumn(rule, 3, Storage.TEXT, (owner,))
    table = RuledTable(16500, "public", "keys", ("id", "owner", "secret"), {"secret": secret})
    return table, secret, owner


@pytest.fixture
def bound() -> Analyzer:
    table, _, _ = _bound_table()
    return Analyzer(Catalog.build([table]))


def test_insert_binds_parameter_and_literal(bound: Analyzer) -> None:
    _, _, owner = _bound_table()
    plan = bound.plan("INSERT INTO keys (id, owner, secret) VALUES (1, $1, $2), (2, 7, $3)")
    assert plan.bindings == {
        2: (AssociatedValue(owner, param=1),),
        3: (AssociatedValue(owner, literal="7"),),
    }


def test_insert_literal_binds_null(bound: Analyzer) -> None:
    _, _, owner = _bound_table()
    (slot,) = bound.plan("INSERT INTO keys VALUES (1, NULL, 'x')").literals
    assert slot.associated == (AssociatedValue(owner),)


def test_update_pinned_by_where(bound: Analyzer) -> None:
    _, _, owner = _bound_table()
    plan = bound.plan("UPDATE keys k SET secret = $1 WHERE k.id = $2 AND $3 = owner")
    assert plan.bindings == {1: (AssociatedValue(owner, param=3),)}


def test_update_set_wins_over_pin(bound: Analyzer) -> None:
    _, _, owner = _bound_table()
    plan = bound.plan("UPDATE keys SET secret = $1, owner = $2 WHERE owner = $3")
    assert plan.bindings == {1: (AssociatedValue(owner, param=2),)}


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE keys SET secret = $1 WHERE id = $2",
        "UPDATE keys SET secret = $1 WHERE owner = $2 OR id = 1",
        "UPDATE keys SET secret = $1 WHERE NOT owner = $2",
        "UPDATE keys SET secret = $1 WHERE owner = $2::int8",
        "UPDATE keys SET owner = $1",
        "INSERT INTO keys (id, secret) VALUES (1, $1)",
        "INSERT INTO keys (id, owner, secret) VALUES (1, $1 + 1, $2)",
        "SELECT secret FROM keys",
        "SELECT k.secret, j.owner FROM keys k, keys j",
        "SELECT secret, owner FROM keys; SELECT 1",
        "COPY keys (id, secret) FROM STDIN",
        "PREPARE p AS INSERT INTO keys (owner, secret) VALUES ($1, $2)",
    ],
)
def test_bound_column_rejected(bound: Analyzer, sql: str) -> None:
    rejection = _rejected(bound, sql)
    assert rejection.sqlstate == "0A000"
    assert "public.keys.secret" in rejection.message
    assert rejection.hint


def test_select_maps_associated_output(bound: Analyzer) -> None:
    plan = bound.plan("SELECT id, secret AS s, k.owner FROM keys k")
    assert plan.associations == {1: (2,)}
    assert bound.plan("SELECT * FROM keys").associations == {2: (1,)}


def test_copy_maps_associated_field(bound: Analyzer) -> None:
    plan = bound.plan("COPY keys (secret, id, owner) FROM STDIN")
    assert plan.copy is not None
    assert plan.copy.associated == {0: (2,)}


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO U&\"acc\\006Funts\" (owner, token) VALUES ('x', 's3cret')",
        "INSERT INTO U&\"!0061ccounts\" UESCAPE '!' (owner, token) VALUES ('x', 's3cret')",
        "INSERT INTO public.u&\"accounts\" (owner, token) VALUES ('x', 's3cret')",
        "UPDATE U&\"acc\\+00006Funts\" SET token = 's3cret' WHERE id = 1",
    ],
)
def test_unicode_escape_table_sealed(analyzer: Analyzer, sql: str) -> None:
    plan = analyzer.plan(sql)
    assert [slot.value for slot in plan.literals] == ["s3cret"]
    assert plan.literals[0].column == TOKEN


def test_unicode_escape_copy_sealed(analyzer: Analyzer) -> None:
    plan = analyzer.plan('COPY U&"acc\\006Funts" (owner, token) FROM STDIN')
    assert plan.copy is not None
    assert plan.copy.fields == {1: (TOKEN,)}


def test_unicode_escape_unruled_table_empty(analyzer: Analyzer) -> None:
    assert analyzer.plan('INSERT INTO U&"ord\\0065rs" (note) VALUES (1)').is_empty


def test_unicode_escape_syntax_error_rejected(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "INSERT INTO U&\"acc\\006Funts\" VALUES ('s3cret'")
    assert exc.sqlstate == "42601"
    assert "may name a table with encrypted columns" in exc.message
    assert exc.hint


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM accounts ORDER BY 2",
        "SELECT count(DISTINCT email) FROM accounts",
        "SELECT count(a) FROM accounts a WHERE a IS NOT NULL",
        "SELECT a.*, b.* FROM accounts a JOIN accounts b USING (id)",
        "SELECT id FROM accounts a WHERE EXISTS (SELECT * FROM accounts b WHERE b.id = a.id)",
        "SELECT id FROM accounts WHERE id IN (SELECT id FROM accounts)",
        "SELECT token FROM accounts UNION ALL SELECT NULL",
        "SELECT coalesce(token, NULL::text) FROM accounts",
        "SELECT s.email FROM (SELECT email, id FROM accounts) s",
        "SELECT * FROM orders o WHERE o.id IN (SELECT id FROM accounts) ORDER BY 1",
        "WITH moved AS (UPDATE accounts SET owner = 'x' RETURNING id) SELECT * FROM moved",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 FROM orders $$",
    ],
)
def test_allowed_forms_not_rejected(analyzer: Analyzer, sql: str) -> None:
    analyzer.plan(sql)


def test_function_body_unicode_escape_rejected(analyzer: Analyzer) -> None:
    sql = (
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql "
        "AS $$ DELETE FROM U&\"\\0061ccounts\" $$"
    )
    exc = _rejected(analyzer, sql)
    assert exc.sqlstate == "0A000"
    assert "Unicode escape" in exc.message
    assert exc.hint


def test_do_block_names_used_column(analyzer: Analyzer) -> None:
    exc = _rejected(analyzer, "DO $$ BEGIN UPDATE accounts SET email = 'x'; END $$")
    assert "public.accounts.email" in exc.message


def test_union_all_literal_sealed(analyzer: Analyzer) -> None:
    plan = analyzer.plan("SELECT token FROM accounts UNION ALL SELECT 'none'")
    assert plan.outputs == ((TOKEN,),)
    assert [(slot.value, slot.column) for slot in plan.literals] == [("none", TOKEN)]


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("DO $$ BEGIN UPDATE accounts SET owner = 'x'; END $$", "a DO block"),
        (
            (
                "MERGE INTO accounts a USING (VALUES (1)) v(x) ON a.id = v.x "
                "WHEN MATCHED THEN UPDATE SET owner = 'x'"
            ),
            "MERGE",
        ),
    ],
)
def test_unsupported_statement_names_no_column(
    analyzer: Analyzer, sql: str, kind: str
) -> None:
    exc = _rejected(analyzer, sql)
    assert exc.sqlstate == "0A000"
    assert exc.message.startswith(f"{kind} on table public.accounts")
    assert "column public.accounts." not in exc.message
    assert exc.hint
