"""Statements the proxy rejects: the SQLSTATE, the message, and nothing written."""

from __future__ import annotations

import logging

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

SEED = "seed-token-7Hq2"

REJECTED = [
    ("SELECT id FROM oauth_tokens WHERE access_token LIKE 'gho%'", "LIKE"),
    ("SELECT id FROM oauth_tokens WHERE access_token > 'a'", "operator >"),
    ("SELECT id FROM oauth_tokens ORDER BY access_token", "ORDER BY"),
    ("SELECT access_token || 'x' FROM oauth_tokens", "ciphertext"),
    ("SELECT length(access_token) FROM oauth_tokens", "function length()"),
    ("SELECT id FROM oauth_tokens WHERE access_token = 'x'", "randomized"),
    ("SELECT DISTINCT access_token FROM oauth_tokens", "DISTINCT"),
    ("SELECT access_token FROM oauth_tokens GROUP BY access_token", "GROUP BY"),
    ("INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, upper('plain'))", "computed"),
    ("INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, 'a' || 'b')", "computed"),
    (
        "INSERT INTO oauth_tokens (user_id, access_token) SELECT 2, provider FROM oauth_tokens",
        "INSERT ... SELECT",
    ),
    (
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, 'plain'::varchar(8))",
        "length",
    ),
    ("UPDATE oauth_tokens SET access_token = 'plain'::char", "length"),
    ("UPDATE oauth_tokens SET access_token = provider", "computed"),
    ("UPDATE oauth_tokens SET access_token = access_token || 'x'", "computed"),
    (
        "WITH moved AS (UPDATE oauth_tokens SET refresh_token = lower('x') RETURNING id) "
        "SELECT * FROM moved",
        "computed",
    ),
    ("COPY oauth_tokens FROM '/tmp/pgseal-never.csv'", "server file"),
    ("DO $$ BEGIN UPDATE oauth_tokens SET access_token = 'plain'; END $$", "DO block"),
    (
        "CREATE TRIGGER plain_token BEFORE INSERT ON oauth_tokens "
        "FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "a trigger",
    ),
    (
        "CREATE RULE keep_plain AS ON INSERT TO oauth_tokens DO ALSO NOTIFY tokens",
        "a rewrite rule",
    ),
    (
        "MERGE INTO oauth_tokens t USING (VALUES (1)) v(x) ON t.user_id = v.x "
        "WHEN MATCHED THEN UPDATE SET access_token = 'plain'",
        "MERGE",
    ),
    (
        (
            "CREATE FUNCTION put_token(t text) RETURNS void LANGUAGE sql "
            "AS $$ INSERT INTO oauth_tokens (user_id, access_token) VALUES (9, t) $$"
        ),
        "function body",
    ),
    (
        (
            "CREATE FUNCTION put_token(t text) RETURNS void LANGUAGE sql "
            "BEGIN ATOMIC INSERT INTO oauth_tokens (user_id, access_token) VALUES (9, t); END"
        ),
        "function body",
    ),
    (
        (
            "CREATE PROCEDURE put_token(t text) LANGUAGE plpgsql "
            "AS $$ BEGIN UPDATE oauth_tokens SET access_token = t; END $$"
        ),
        "procedure body",
    ),
    ("SELECT * FROM oauth_tokens WHERE id < 5 ORDER BY 4", "ORDER BY"),
    ("SELECT count(DISTINCT access_token) FROM oauth_tokens", "count(DISTINCT)"),
    ("SELECT t FROM oauth_tokens t", "whole-row"),
    ("SELECT row_to_json(t) FROM oauth_tokens t", "whole-row"),
    ("SELECT to_jsonb(t.*) FROM oauth_tokens t", "whole-row"),
    ("SELECT (SELECT access_token FROM oauth_tokens LIMIT 1)", "subquery"),
    (
        (
            "SELECT u.t FROM (SELECT access_token AS t FROM oauth_tokens "
            "UNION ALL SELECT refresh_token FROM oauth_tokens) u"
        ),
        "subquery in FROM",
    ),
    ("SELECT coalesce(access_token, provider) FROM oauth_tokens", "mixes"),
    (
        "SELECT CASE WHEN id = 1 THEN access_token ELSE provider END FROM oauth_tokens",
        "mixes",
    ),
    (
        "SELECT access_token FROM oauth_tokens UNION ALL SELECT provider FROM oauth_tokens",
        "mixes",
    ),
]


@pytest.fixture
def seeded(oauth_proxy: RunningProxy) -> RunningProxy:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (SEED,)
        )
    return oauth_proxy


def _table(proxy: RunningProxy) -> list[tuple[object, ...]]:
    return proxy.direct("SELECT * FROM oauth_tokens ORDER BY id")


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(("sql", "reason"), REJECTED, ids=[r[1] for r in REJECTED])
def test_rejected_statement(seeded: RunningProxy, sql: str, reason: str, protocol: str) -> None:
    before = _table(seeded)
    with psycopg.connect(seeded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql, prepare=False if protocol == "simple" else None)
        # The connection stays usable after the rejection.
        (count,) = conn.execute("SELECT count(*) FROM oauth_tokens").fetchone() or ()
    assert info.value.sqlstate == "0A000"
    assert reason in info.value.diag.message_primary
    assert "oauth_tokens" in info.value.diag.message_primary
    assert info.value.diag.message_hint
    assert count == 1
    assert _table(seeded) == before


def test_rejected_function_not_created(seeded: RunningProxy) -> None:
    sql = (
        "CREATE FUNCTION put_token(t text) RETURNS void LANGUAGE sql "
        "AS $$ INSERT INTO oauth_tokens (user_id, access_token) VALUES (9, t) $$"
    )
    with (
        psycopg.connect(seeded.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported),
    ):
        conn.execute(sql)
    assert seeded.direct("SELECT proname FROM pg_proc WHERE proname = 'put_token'") == []


SYNTAX_ERRORS = [
    ("INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, 'synerrSECRET1'", None),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "VALUES (3, 'synerrSECRET2' 'continued')"
        ),
        77,
    ),
    ("INSERT INTO U&\"oauth_t\\006Fkens\" VALUES (3, 'synerrSECRET3'", None),
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(
    ("sql", "position"), SYNTAX_ERRORS, ids=["end", "adjacent literals", "unicode escape"]
)
def test_syntax_error_kept_from_server(
    seeded: RunningProxy, sql: str, position: int | None, protocol: str
) -> None:
    before = _table(seeded)
    with psycopg.connect(seeded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.execute(sql, prepare=False if protocol == "simple" else None)
        (count,) = conn.execute("SELECT count(*) FROM oauth_tokens").fetchone() or ()
    diag = info.value.diag
    secret = sql.split("'")[1]
    assert info.value.sqlstate == "42601"
    assert diag.message_primary is not None
    assert diag.message_primary.startswith("syntax error")
    assert "encrypted columns" in diag.message_primary
    assert secret not in diag.message_primary
    assert diag.message_hint
    assert diag.statement_position == (None if position is None else str(position))
    assert count == 1
    assert _table(seeded) == before
    log_path = getattr(seeded.server, "log_path", None)
    if log_path is not None:
        assert secret not in log_path.read_text(errors="replace")


def test_syntax_error_value_kept_from_proxy_log(
    seeded: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # pglast names the token where parsing failed, here the secret itself.
    sql = "INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, 'x' 'synerrSECRET4')"
    with (
        caplog.at_level(logging.DEBUG),
        psycopg.connect(seeded.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.SyntaxError),
    ):
        conn.execute(sql)
    assert "rejected a statement that does not parse" in caplog.text
    assert "synerrSECRET4" not in caplog.text


def test_syntax_error_named_table_names_column(seeded: RunningProxy) -> None:
    sql = "INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, 'x'"
    with (
        psycopg.connect(seeded.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.SyntaxError) as info,
    ):
        conn.execute(sql)
    assert "public.oauth_tokens.access_token" in (info.value.diag.message_primary or "")


def test_syntax_error_unruled_table_reaches_server(seeded: RunningProxy) -> None:
    with (
        psycopg.connect(seeded.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.SyntaxError) as info,
    ):
        conn.execute("SELEC 1 FROM pg_class")
    assert info.value.diag.message_primary == 'syntax error at or near "SELEC"'
    assert info.value.diag.message_hint is None


UNICODE_WRITES = [
    "INSERT INTO U&\"oauth_t\\006Fkens\" (user_id, access_token) VALUES (5, 'leakUE1')",
    (
        "INSERT INTO U&\"!006Fauth_tokens\" UESCAPE '!' (user_id, access_token) "
        "VALUES (5, 'leakUE2')"
    ),
    "INSERT INTO public.U&\"oauth_t\\006Fkens\" (user_id, access_token) VALUES (5, %s)",
]


@pytest.mark.parametrize("sql", UNICODE_WRITES, ids=["escape", "uescape", "parameter"])
def test_unicode_escape_table_sealed(oauth_proxy: RunningProxy, sql: str) -> None:
    plaintext = "leakUE3" if "%s" in sql else sql.split("'")[-2]
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(sql, (plaintext,) if "%s" in sql else None)
        read = conn.execute("SELECT access_token FROM oauth_tokens").fetchall()
    (stored,) = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")[0]
    assert read == [(plaintext,)]
    assert_sealed(stored, plaintext)


def test_unicode_escape_update_and_copy_sealed(oauth_proxy: RunningProxy) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        with conn.cursor().copy(
            'COPY U&"oauth_t\\006Fkens" (user_id, access_token) FROM STDIN'
        ) as copy:
            copy.write_row((6, "leakUE5 copy"))
        conn.execute(
            "UPDATE U&\"oauth_t\\006Fkens\" SET refresh_token = 'leakUE4 update' "
            "WHERE user_id = 6"
        )
        read = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens"
        ).fetchall()
    ((access, refresh),) = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens"
    )
    assert read == [("leakUE5 copy", "leakUE4 update")]
    assert_sealed(access, "leakUE5 copy")
    assert_sealed(refresh, "leakUE4 update")


def test_rejection_in_transaction_aborts_it(seeded: RunningProxy) -> None:
    with psycopg.connect(seeded.dsn()) as conn:
        conn.execute("INSERT INTO oauth_tokens (user_id, access_token) VALUES (2, 'in-tx')")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT id FROM oauth_tokens WHERE access_token = 'x'")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
    assert seeded.direct("SELECT count(*) FROM oauth_tokens") == [(1,)]
