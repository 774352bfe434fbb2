"""psycopg 3 through the proxy: pipeline mode, COPY, server-side cursors,
LISTEN/NOTIFY, query cancellation and prepared statements.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import errors

from tests.compat.clients import ServedProxy
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_psycopg_compat_" + "Qw3rT" * 8
INSERT = "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) VALUES (%s, %s, %s)"


def _token(user_id: int) -> str:
    return f"{TOKEN}-{user_id}"


def _connect(proxy: RunningProxy, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=autocommit)


def _assert_stored(proxy: RunningProxy, user_ids: list[int]) -> None:
    stored = proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _ in stored] == user_ids
    for user_id, access in stored:
        assert_sealed(access, _token(user_id))


def test_pipeline_inserts_and_selects(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with conn.pipeline():
            for user_id in range(5):
                conn.execute(INSERT, (user_id, _token(user_id), None))
            first = conn.execute(
                "SELECT access_token FROM oauth_tokens WHERE user_id = %s", (0,)
            )
            returned = conn.execute(
                INSERT + " RETURNING access_token", (5, _token(5), "refresh-5")
            )
            everything = conn.execute(
                "SELECT user_id, access_token, refresh_token FROM oauth_tokens"
            )
        # Results are read after the pipeline has been synced.
        assert first.fetchall() == [(_token(0),)]
        assert returned.fetchall() == [(_token(5),)]
        assert sorted(everything.fetchall()) == [
            (i, _token(i), "refresh-5" if i == 5 else None) for i in range(6)
        ]
    _assert_stored(oauth_proxy, list(range(6)))


def test_pipeline_executemany(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with conn.pipeline():
            conn.cursor().executemany(
                INSERT, [(i, _token(i), f"refresh-{i}") for i in range(20)]
            )
        rows = conn.execute(
            "SELECT user_id, refresh_token FROM oauth_tokens"
        ).fetchall()
    assert sorted(rows) == [(i, f"refresh-{i}") for i in range(20)]
    _assert_stored(oauth_proxy, list(range(20)))


def test_pipeline_rejected_statement(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy, autocommit=False) as conn:
        with pytest.raises(errors.FeatureNotSupported) as rejected, conn.pipeline():
            conn.execute(INSERT, (1, _token(1), None))
            conn.execute(
                "SELECT id FROM oauth_tokens WHERE access_token LIKE %s", ("gho%",)
            )
            conn.execute(INSERT, (2, _token(2), None))
        assert "access_token" in str(rejected.value)
        conn.rollback()

        # The connection is usable again: a new transaction works.
        conn.execute(INSERT, (3, _token(3), None))
        conn.commit()
        rows = conn.execute("SELECT user_id, access_token FROM oauth_tokens").fetchall()
    assert rows == [(3, _token(3))]
    _assert_stored(oauth_proxy, [3])


def test_copy_round_trip(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        cursor = conn.cursor()
        with cursor.copy(
            "COPY oauth_tokens (user_id, access_token) FROM STDIN"
        ) as copy:
            for user_id in range(3):
                copy.write_row((user_id, _token(user_id)))
        with cursor.copy(
            "COPY (SELECT user_id, access_token FROM oauth_tokens) TO STDOUT"
        ) as copy:
            copied = sorted(copy.rows())
    assert copied == [(str(i), _token(i)) for i in range(3)]
    _assert_stored(oauth_proxy, [0, 1, 2])


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_server_side_cursor(oauth_proxy: RunningProxy, binary: bool) -> None:
    with _connect(oauth_proxy) as conn:
        conn.cursor().executemany(INSERT, [(i, _token(i), None) for i in range(100)])
    # DECLARE ... CURSOR, then FETCH FORWARD in batches of itersize rows.
    with (
        _connect(oauth_proxy, autocommit=False) as conn,
        conn.cursor(name="tokens", binary=binary) as cursor,
    ):
        cursor.itersize = 7
        cursor.execute(
            "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
        )
        first = cursor.fetchone()
        some = cursor.fetchmany(10)
        rest = list(cursor)
    assert first == (0, _token(0))
    assert some == [(i, _token(i)) for i in range(1, 11)]
    assert rest == [(i, _token(i)) for i in range(11, 100)]
    _assert_stored(oauth_proxy, list(range(100)))


def test_scrollable_cursor_with_hold(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.cursor().executemany(INSERT, [(i, _token(i), None) for i in range(10)])
        with conn.cursor(name="held", scrollable=True, withhold=True) as cursor:
            cursor.execute(
                "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
            )
            cursor.scroll(5, mode="absolute")
            fifth = cursor.fetchone()
            cursor.scroll(-3)
            third = cursor.fetchone()
    assert fifth == (5, _token(5))
    assert third == (3, _token(3))


def test_notify_reaches_idle_listener(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as listener, _connect(oauth_proxy) as writer:
        listener.execute("LISTEN token_events")
        writer.execute(INSERT, (1, _token(1), None))
        writer.execute("SELECT pg_notify('token_events', 'user 1 rotated')")

        # The listener sends nothing: the notification arrives on its own.
        received = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, n.payload) for n in received] == [
        ("token_events", "user 1 rotated")
    ]
    _assert_stored(oauth_proxy, [1])


def test_notify_during_query(oauth_proxy: RunningProxy) -> None:
    received: list[psycopg.Notify] = []
    with _connect(oauth_proxy) as listener, _connect(oauth_proxy) as writer:
        listener.add_notify_handler(received.append)
        listener.execute("LISTEN token_events")
        writer.execute("NOTIFY token_events, 'batch'")
        writer.execute(INSERT, (2, _token(2), None))

        # The listener reads the pending notification while it runs its next query.
        rows = listener.execute(
            "SELECT user_id, access_token FROM oauth_tokens"
        ).fetchall()
    assert rows == [(2, _token(2))]
    assert [(n.channel, n.payload) for n in received] == [("token_events", "batch")]


def _cancel_after(conn: psycopg.Connection, cancel: Callable[[], None]) -> float:
    """Run pg_sleep(10), cancel it after half a second; return the seconds taken."""
    timer = threading.Timer(0.5, cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
    finally:
        timer.cancel()
    return time.monotonic() - started


def test_cancel_safe_long_query(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        conn.execute(INSERT, (1, _token(1), None))
        elapsed = _cancel_after(conn, conn.cancel_safe)

        # The session goes on after the cancelled statement.
        (read,) = (
            conn.execute(
                "SELECT access_token FROM oauth_tokens WHERE user_id = %s", (1,)
            ).fetchone()
            or ()
        )
    assert elapsed < 5
    assert read == _token(1)


def test_cancel_long_query(served_proxy: ServedProxy) -> None:
    # cancel() blocks in libpq until the proxy closes the cancel connection,
    # so the proxy runs in a process of its own here.
    with psycopg.connect(served_proxy.dsn(), autocommit=True) as conn:
        conn.execute(INSERT, (1, _token(1), None))
        elapsed = _cancel_after(conn, conn.cancel)

        (read,) = (
            conn.execute(
                "SELECT access_token FROM oauth_tokens WHERE user_id = %s", (1,)
            ).fetchone()
            or ()
        )
    assert elapsed < 5
    assert read == _token(1)
    ((stored,),) = served_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, _token(1))


def test_prepared_statement_reused(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        for user_id in range(10):
            conn.execute(INSERT, (user_id, _token(user_id), None), prepare=True)
        select = "SELECT access_token FROM oauth_tokens WHERE user_id = %s"
        read = [conn.execute(select, (i,), prepare=True).fetchone() for i in range(10)]
    assert read == [(_token(i),) for i in range(10)]
    _assert_stored(oauth_proxy, list(range(10)))


def test_prepared_literal_fresh_ciphertext(oauth_proxy: RunningProxy) -> None:
    # Parse("_pg3_0", "... VALUES ($1, 'literal')") once, then Bind and
    # Execute five times on the same statement.
    with _connect(oauth_proxy) as conn:
        for user_id in range(5):
            conn.execute(
                "INSERT INTO oauth_tokens (user_id, access_token) "
                "VALUES (%s, 'same-literal-token')",
                (user_id,),
                prepare=True,
            )
        read = conn.execute("SELECT DISTINCT user_id FROM oauth_tokens").fetchall()
    assert len(read) == 5
    stored = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
    for (access,) in stored:
        assert_sealed(access, "same-literal-token")
    assert len({access for (access,) in stored}) == 5


def _describe_parameter_types(dsn: str) -> list[int]:
    """Parse with declared types int4, varchar, varchar; return the described ones."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgconn = conn.pgconn
        parsed = pgconn.prepare(
            b"insert_token",
            b"INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            b"VALUES ($1, $2, $3)",
            [23, 1043, 1043],
        )
        assert parsed.status == psycopg.pq.ExecStatus.COMMAND_OK, parsed.error_message
        described = pgconn.describe_prepared(b"insert_token")
        return [described.param_type(i) for i in range(described.nparams)]


def test_describe_keeps_declared_parameter_types(served_proxy: ServedProxy) -> None:
    # Low-level libpq calls hold the GIL while they block, so the proxy runs
    # in a process of its own here.
    direct = _describe_parameter_types(served_proxy.server.dsn(served_proxy.database))
    proxied = _describe_parameter_types(served_proxy.dsn())

    assert direct == [23, 1043, 1043]
    assert proxied == direct
