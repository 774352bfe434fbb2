"""DDL on ruled tables: views, defaults, renames and inheritance children."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

SECRET = "ghp_ddlSecret4Kq9Wm2Xz"
NOT_SUPPORTED = psycopg.errors.FeatureNotSupported
VIEW = "CREATE VIEW token_view AS SELECT id, user_id, access_token FROM oauth_tokens"


def _connect(proxy: RunningProxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True)


def _stored(proxy: RunningProxy, table: str = "oauth_tokens") -> list[str]:
    rows = proxy.direct(f"SELECT access_token FROM ONLY {table} ORDER BY id")
    return [row[0] for row in rows]


def _count(proxy: RunningProxy, table: str = "oauth_tokens") -> int:
    ((count,),) = proxy.direct(f"SELECT count(*) FROM {table}")
    return int(count)


# Writes through views


def test_materialized_view_read_same_session(oauth_proxy: RunningProxy) -> None:
    # CREATE MATERIALIZED VIEW completes with a SELECT tag, not a DDL one.
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (SECRET,)
        )
        conn.execute(
            "CREATE MATERIALIZED VIEW token_copies AS "
            "SELECT id, access_token FROM oauth_tokens"
        )
        rows = conn.execute("SELECT access_token FROM token_copies").fetchall()
    assert rows == [(SECRET,)]
    ((stored,),) = oauth_proxy.direct("SELECT access_token FROM token_copies")
    assert_sealed(stored, SECRET)


def test_view_write_same_session(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(VIEW)
        conn.execute(
            f"INSERT INTO token_view (user_id, access_token) VALUES (1, '{SECRET}')",
            prepare=False,
        )
        conn.execute(
            "INSERT INTO token_view (user_id, access_token) VALUES (2, %s)", (SECRET,)
        )
        read = conn.execute("SELECT access_token FROM token_view ORDER BY id").fetchall()
    assert read == [(SECRET,), (SECRET,)]
    stored = _stored(oauth_proxy)
    assert len(stored) == 2
    for value in stored:
        assert_sealed(value, SECRET)


def test_view_write_new_connection(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(VIEW)
    with _connect(oauth_proxy) as conn:
        conn.execute(
            f"INSERT INTO token_view (user_id, access_token) VALUES (1, '{SECRET}')",
            prepare=False,
        )
    (stored,) = _stored(oauth_proxy)
    assert_sealed(stored, SECRET)


def test_view_created_on_server(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute("SELECT 1")
        oauth_proxy.direct(VIEW)
        conn.execute(
            f"INSERT INTO token_view (user_id, access_token) VALUES (1, '{SECRET}')",
            prepare=False,
        )
        oauth_proxy.direct("CREATE VIEW refresh_view AS SELECT * FROM oauth_tokens")
        conn.execute("UPDATE refresh_view SET refresh_token = %s", ("r-" + SECRET,))
        read = conn.execute("SELECT access_token, refresh_token FROM refresh_view").fetchall()
    assert read == [(SECRET, "r-" + SECRET)]
    ((access, refresh),) = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens"
    )
    assert_sealed(access, SECRET)
    assert_sealed(refresh, SECRET)


def test_view_committed_in_transaction(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with conn.transaction():
            conn.execute(VIEW)
        conn.execute(
            f"INSERT INTO token_view (user_id, access_token) VALUES (1, '{SECRET}')",
            prepare=False,
        )
    (stored,) = _stored(oauth_proxy)
    assert_sealed(stored, SECRET)


def test_view_in_open_transaction_rejected(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute("BEGIN")
        conn.execute(VIEW)
        with pytest.raises(NOT_SUPPORTED) as raised:
            conn.execute(
                f"INSERT INTO token_view (user_id, access_token) VALUES (1, '{SECRET}')",
                prepare=False,
            )
        conn.execute("ROLLBACK")
    assert "token_view" in str(raised.value)
    assert raised.value.diag.message_hint is not None
    assert _count(oauth_proxy) == 0


def test_table_created_in_transaction_writable(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn, conn.transaction():
        conn.execute("CREATE TABLE plain_notes (id int, body text)")
        conn.execute("INSERT INTO plain_notes VALUES (1, 'plain body')")
    assert oauth_proxy.direct("SELECT body FROM plain_notes") == [("plain body",)]


def test_untraced_view_write_rejected(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct(
        "CREATE VIEW odd_tokens AS SELECT id, user_id, access_token FROM oauth_tokens "
        "WHERE access_token LIKE 'x%'"
    )
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED) as raised:
        conn.execute(
            "INSERT INTO odd_tokens (user_id, access_token) VALUES (1, %s)", (SECRET,)
        )
    assert "odd_tokens" in str(raised.value)
    assert _count(oauth_proxy) == 0


def test_rewrite_rule_write_rejected(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("CREATE TABLE inbox (user_id int, token text)")
    oauth_proxy.direct(
        "CREATE RULE forward AS ON INSERT TO inbox DO INSTEAD "
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES (NEW.user_id, NEW.token)"
    )
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED) as raised:
        conn.execute("INSERT INTO inbox VALUES (1, %s)", (SECRET,))
    assert "inbox" in str(raised.value)
    assert _count(oauth_proxy) == 0


# DDL that would store plaintext or break a rule

REJECTED_DDL = [
    "ALTER TABLE oauth_tokens ALTER COLUMN access_token SET DEFAULT 'plain-default'",
    "ALTER TABLE oauth_tokens ALTER COLUMN access_token TYPE varchar(20)",
    "ALTER TABLE oauth_tokens ADD CONSTRAINT prefix CHECK (access_token <> 'x')",
    "ALTER TABLE oauth_tokens RENAME COLUMN access_token TO token",
    "ALTER TABLE oauth_tokens RENAME TO tokens_renamed",
    "ALTER TABLE oauth_tokens DROP COLUMN refresh_token",
    (
        "ALTER TABLE oauth_tokens ADD COLUMN upper_token text "
        "GENERATED ALWAYS AS (upper(access_token)) STORED"
    ),
    "CREATE TABLE child_tokens (access_token text DEFAULT 'plain') INHERITS (oauth_tokens)",
]


@pytest.mark.parametrize("ddl", REJECTED_DDL)
def test_ddl_on_ruled_table_rejected(oauth_proxy: RunningProxy, ddl: str) -> None:
    before = oauth_proxy.direct(
        "SELECT attname, atthasdef, atttypid FROM pg_attribute "
        "WHERE attrelid = 'oauth_tokens'::regclass ORDER BY attnum"
    )
    with _connect(oauth_proxy) as conn:
        with pytest.raises(NOT_SUPPORTED) as raised:
            conn.execute(ddl)
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (SECRET,)
        )
    after = oauth_proxy.direct(
        "SELECT attname, atthasdef, atttypid FROM pg_attribute "
        "WHERE attrelid = 'oauth_tokens'::regclass ORDER BY attnum"
    )
    assert raised.value.diag.message_hint is not None
    assert after == before
    assert oauth_proxy.direct("SELECT to_regclass('child_tokens')") == [(None,)]
    (stored,) = _stored(oauth_proxy)
    assert_sealed(stored, SECRET)


def test_drop_default_allowed(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute("ALTER TABLE oauth_tokens ALTER COLUMN access_token DROP DEFAULT")
        conn.execute("ALTER TABLE oauth_tokens ADD COLUMN note text DEFAULT 'n'")


def test_rename_on_server_fails_closed(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("ALTER TABLE oauth_tokens RENAME COLUMN access_token TO token")
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED) as raised:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, token) VALUES (1, %s)", (SECRET,)
        )
    assert "no longer matches" in str(raised.value)
    assert raised.value.diag.message_hint is not None
    assert _count(oauth_proxy) == 0


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT id FROM oauth_tokens WHERE token = %s",
        "DELETE FROM oauth_tokens WHERE token = %s",
    ],
)
def test_broken_table_reads_rejected(oauth_proxy: RunningProxy, statement: str) -> None:
    # A search value for a broken table must not reach the server either.
    oauth_proxy.direct("ALTER TABLE oauth_tokens RENAME COLUMN access_token TO token")
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED) as raised:
        conn.execute(statement, (SECRET,))
    assert "no longer matches" in str(raised.value)


def test_table_rename_on_server_fails_closed(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("ALTER TABLE oauth_tokens RENAME TO tokens_moved")
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED) as raised:
        conn.execute(
            "INSERT INTO tokens_moved (user_id, access_token) VALUES (1, %s)",
            (SECRET,),
        )
    assert "tokens_moved" in str(raised.value)
    assert _count(oauth_proxy, "tokens_moved") == 0


def test_dropped_table_recreated_is_ruled(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("DROP TABLE oauth_tokens")
    oauth_proxy.run(oauth_proxy.proxy.reload_catalogs())
    oauth_proxy.direct(
        "CREATE TABLE oauth_tokens (id serial PRIMARY KEY, user_id int, "
        "access_token text, refresh_token text)"
    )
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (SECRET,)
        )
    (stored,) = _stored(oauth_proxy)
    assert_sealed(stored, SECRET)


# Inheritance children and partitions


def test_inherited_child_is_sealed(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute("CREATE TABLE child_tokens () INHERITS (oauth_tokens)")
        conn.execute(
            f"INSERT INTO child_tokens (user_id, access_token) VALUES (1, '{SECRET}')",
            prepare=False,
        )
        conn.execute(
            "INSERT INTO child_tokens (user_id, access_token) VALUES (2, %s)", (SECRET,)
        )
        through_parent = conn.execute(
            "SELECT access_token FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
        through_child = conn.execute(
            "SELECT access_token FROM child_tokens ORDER BY user_id"
        ).fetchall()
    assert through_parent == [(SECRET,), (SECRET,)]
    assert through_child == through_parent
    stored = _stored(oauth_proxy, "child_tokens")
    assert len(stored) == 2
    for value in stored:
        assert_sealed(value, SECRET)


def test_child_created_on_server_sealed(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct("CREATE TABLE child_tokens () INHERITS (oauth_tokens)")
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO child_tokens (user_id, access_token) VALUES (1, %s)", (SECRET,)
        )
        (read,) = conn.execute("SELECT access_token FROM oauth_tokens").fetchone() or ()
    assert read == SECRET
    (stored,) = _stored(oauth_proxy, "child_tokens")
    assert_sealed(stored, SECRET)


def test_inherit_existing_table_rejected(oauth_proxy: RunningProxy) -> None:
    oauth_proxy.direct(
        "CREATE TABLE loose_tokens (id int, user_id int, provider text, "
        "access_token text, refresh_token text)"
    )
    oauth_proxy.direct("INSERT INTO loose_tokens VALUES (1, 1, 'gh', 'plain', NULL)")
    with _connect(oauth_proxy) as conn, pytest.raises(NOT_SUPPORTED):
        conn.execute("ALTER TABLE loose_tokens INHERIT oauth_tokens")
    inherits = oauth_proxy.direct(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'oauth_tokens'::regclass"
    )
    assert inherits == [(0,)]


@pytest.fixture
def events_proxy(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE events (id int, region text, body text) PARTITION BY LIST (region)"
        )
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "events.yaml").write_text(
        "tables:\n  - name: public.events\n    columns:\n      - name: body\n"
    )
    return start_proxy(fresh_db, rules)


def test_partition_is_sealed(events_proxy: RunningProxy) -> None:
    with _connect(events_proxy) as conn:
        conn.execute("CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu')")
        conn.execute("INSERT INTO events_eu VALUES (1, 'eu', %s)", (SECRET,))
        conn.execute(f"INSERT INTO events VALUES (2, 'eu', '{SECRET}')", prepare=False)
        read = conn.execute("SELECT body FROM events ORDER BY id").fetchall()
    assert read == [(SECRET,), (SECRET,)]
    stored = [row[0] for row in events_proxy.direct("SELECT body FROM events_eu")]
    assert len(stored) == 2
    for value in stored:
        assert_sealed(value, SECRET)


def test_detached_partition_fails_closed(events_proxy: RunningProxy) -> None:
    with _connect(events_proxy) as conn:
        conn.execute("CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu')")
        conn.execute("INSERT INTO events_eu VALUES (1, 'eu', %s)", (SECRET,))
        conn.execute("ALTER TABLE events DETACH PARTITION events_eu")
        with pytest.raises(NOT_SUPPORTED) as raised:
            conn.execute("INSERT INTO events_eu VALUES (2, 'eu', %s)", (SECRET,))
    assert "detached" in str(raised.value)
    ((count,),) = events_proxy.direct("SELECT count(*) FROM events_eu")
    assert count == 1
