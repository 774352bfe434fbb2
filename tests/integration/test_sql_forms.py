"""Statement forms beyond INSERT ... VALUES and SELECT, through a real server."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

SECRET = "ghp_Sq5Yw8kD2fJ7Lm3Np0Rt6Vx9Zb1Cd4Eg"


def _connect(proxy: RunningProxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True)


def _stored(proxy: RunningProxy) -> list[str]:
    return [row[0] for row in proxy.direct("SELECT access_token FROM oauth_tokens ORDER BY id")]


def test_write_inside_cte_returning(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        rows = conn.execute(
            "WITH added AS (INSERT INTO oauth_tokens (user_id, access_token) "
            "VALUES (%s, %s) RETURNING user_id, access_token) SELECT * FROM added",
            (1, SECRET),
        ).fetchall()
    assert rows == [(1, SECRET)]
    assert_sealed(_stored(oauth_proxy)[0], SECRET)


def test_update_from_other_table(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("CREATE TABLE users (id int PRIMARY KEY, name text)")
    oauth_proxy.direct("INSERT INTO users VALUES (5, 'ada')")
    with _connect(oauth_proxy) as conn:
        conn.execute("INSERT INTO oauth_tokens (user_id, access_token) VALUES (5, 'old')")
        conn.execute(
            "UPDATE oauth_tokens t SET access_token = %s FROM users u "
            "WHERE u.id = t.user_id AND u.name = %s",
            (SECRET, "ada"),
        )
        (value,) = conn.execute("SELECT access_token FROM oauth_tokens").fetchone() or ()
    assert value == SECRET
    assert_sealed(_stored(oauth_proxy)[0], SECRET)


def test_multi_statement_simple_query(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            f"INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, '{SECRET}'); "
            f"INSERT INTO oauth_tokens (user_id, access_token) VALUES (2, 'second-{SECRET}'); "
            "UPDATE oauth_tokens SET refresh_token = 'r-literal' WHERE user_id = 2",
            prepare=False,
        )
        rows = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
    assert rows == [(SECRET, None), ("second-" + SECRET, "r-literal")]
    stored = _stored(oauth_proxy)
    assert_sealed(stored[0], SECRET)
    assert_sealed(stored[1], SECRET)


def test_view_resolves_to_base_column(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct(
        "CREATE VIEW active_tokens AS SELECT user_id, access_token AS token "
        "FROM oauth_tokens WHERE access_token IS NOT NULL"
    )
    oauth_proxy.direct("CREATE VIEW newest AS SELECT token FROM active_tokens")
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)", (3, SECRET)
        )
        viewed = conn.execute("SELECT token FROM active_tokens WHERE user_id = 3").fetchall()
        nested = conn.execute("SELECT * FROM newest").fetchall()
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT user_id FROM active_tokens WHERE token = %s", (SECRET,))
    assert viewed == [(SECRET,)]
    assert nested == [(SECRET,)]
    assert_sealed(_stored(oauth_proxy)[0], SECRET)


def test_union_all_unsealed(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            "VALUES (%s, %s, %s)",
            (1, SECRET, "refresh-" + SECRET),
        )
        rows = conn.execute(
            "SELECT access_token FROM oauth_tokens UNION ALL "
            "SELECT refresh_token FROM oauth_tokens"
        ).fetchall()
    assert sorted(rows) == [(SECRET,), ("refresh-" + SECRET,)]


@pytest.mark.parametrize(
    "expression",
    [
        "coalesce(access_token, 'no token')",
        "CASE WHEN access_token IS NULL THEN 'no token' ELSE access_token END",
    ],
    ids=["coalesce", "case"],
)
def test_pass_through_expressions(oauth_proxy: RunningProxy, expression: str) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s), (2, NULL)",
            (SECRET,),
        )
        extended = conn.execute(
            f"SELECT {expression} AS t FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
        simple = conn.execute(
            f"SELECT {expression} FROM oauth_tokens ORDER BY user_id", prepare=False
        ).fetchall()
    assert extended == [(SECRET,), ("no token",)]
    assert simple == extended


def test_server_side_cursor(oauth_proxy: RunningProxy) -> None:
    tokens = [f"{SECRET}-{i}" for i in range(25)]
    with _connect(oauth_proxy) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
                list(enumerate(tokens)),
            )
        with conn.transaction():
            with conn.cursor(name="tokens") as cur:
                cur.itersize = 7
                cur.execute("SELECT access_token FROM oauth_tokens ORDER BY user_id")
                fetched = [row[0] for row in cur]
        with conn.transaction():
            conn.execute(
                "DECLARE c CURSOR FOR SELECT access_token FROM oauth_tokens ORDER BY user_id"
            )
            first = conn.execute("FETCH 3 FROM c").fetchall()
    assert fetched == tokens
    assert first == [(t,) for t in tokens[:3]]
    for stored, token in zip(_stored(oauth_proxy), tokens):
        assert_sealed(stored, token)


def test_view_created_through_proxy_unseals(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)", (8, SECRET)
        )
        conn.execute("CREATE VIEW token_list AS SELECT access_token AS t FROM oauth_tokens")
        # The proxy reloads its catalog in the background after the DDL.
        deadline = time.monotonic() + 10
        while True:
            (value,) = conn.execute("SELECT t FROM token_list").fetchone() or ()
            if value == SECRET or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert value == SECRET


def test_sql_prepare_execute(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "PREPARE add_token(int, text) AS "
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2)",
            prepare=False,
        )
        conn.execute(f"EXECUTE add_token(1, '{SECRET}')", prepare=False)
        conn.execute(f"EXECUTE add_token(2, E'param-{SECRET}')")
        conn.execute(
            "PREPARE read_token(int) AS SELECT access_token FROM oauth_tokens "
            "WHERE user_id = $1",
            prepare=False,
        )
        first = conn.execute("EXECUTE read_token(1)", prepare=False).fetchall()
        second = conn.execute("EXECUTE read_token(2)").fetchall()
        conn.execute("DEALLOCATE add_token", prepare=False)
    assert first == [(SECRET,)]
    assert second == [("param-" + SECRET,)]
    stored = _stored(oauth_proxy)
    assert_sealed(stored[0], SECRET)
    assert_sealed(stored[1], SECRET)


def test_sql_execute_expression_rejected(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "PREPARE add_token(int, text) AS "
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2)",
            prepare=False,
        )
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("EXECUTE add_token(1, upper('plain'))", prepare=False)
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


def test_search_path_resolves_unqualified_names(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("CREATE SCHEMA staging")
    oauth_proxy.direct(
        "CREATE TABLE staging.oauth_tokens (id serial, user_id int, access_token text)"
    )
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    with _connect(oauth_proxy) as conn:
        conn.execute("SET search_path TO staging, public")
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)",
            ("staging-plain",),
        )
        conn.execute("SET search_path TO public")
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (2, %s)", (SECRET,)
        )
        conn.execute("RESET search_path")
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, %s)", (SECRET,)
        )
    assert oauth_proxy.direct("SELECT access_token FROM staging.oauth_tokens") == [
        ("staging-plain",)
    ]
    stored = _stored(oauth_proxy)
    assert len(stored) == 2
    for value in stored:
        assert_sealed(value, SECRET)


def test_failed_deallocate_keeps_sealing(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "PREPARE add_token(int, text) AS "
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2)",
            prepare=False,
        )
        conn.execute("BEGIN", prepare=False)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0", prepare=False)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("DEALLOCATE add_token", prepare=False)
        conn.execute("ROLLBACK", prepare=False)
        conn.execute(f"EXECUTE add_token(1, '{SECRET}')", prepare=False)
    assert_sealed(_stored(oauth_proxy)[0], SECRET)


def test_prepare_and_execute_in_one_query(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "PREPARE add_token(int, text) AS "
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2); "
            f"EXECUTE add_token(1, '{SECRET}')",
            prepare=False,
        )
        (value,) = conn.execute("SELECT access_token FROM oauth_tokens").fetchone() or ()
    assert value == SECRET
    assert_sealed(_stored(oauth_proxy)[0], SECRET)
