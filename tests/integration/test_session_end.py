"""Sessions that end mid-statement: client disconnect, backend termination, restart.

Each case puts one session in a query, a COPY or an idle transaction, ends
it from one side, and checks three things: the client gets what a direct
client gets, other sessions go on, and the proxy keeps no resource of the
session once it ended.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.embedded import BinarySource, Cluster, find_bin_dir
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.live_state import proxy_state, wait_for_state, wait_until
from tests.integration.sealing import assert_sealed
from tests.integration.test_extended_protocol import (
    TOKEN,
    RawClient,
    Reply,
    _message,
    query,
    rows,
    status,
)

STATES = ("query", "copy", "idle_transaction")
# pg_stat_activity.state of the backend in each case.
BACKEND_STATES = {
    "query": "active",
    "copy": "active",
    "idle_transaction": "idle in transaction",
}


def _connect(server: PgServer, database: str, port: int | None = None) -> RawClient:
    """Open a raw session to the server, or to the proxy listening on `port`."""
    if port is None:
        return RawClient(
            server.host, server.port, server.superuser, server.password, database
        )
    return RawClient("127.0.0.1", port, server.superuser, server.password, database)


def _enter(client: RawClient, state: str) -> int:
    """Put the session into `state` and return its backend's process id."""
    # Without this check a backend in pg_sleep would not notice a closed
    # connection until the sleep ends.
    client.run(query("SET client_connection_check_interval = 100"))
    ((pid,),) = rows(client.run(query("SELECT pg_backend_pid()")))
    assert pid is not None
    if state == "query":
        client.send(query("SELECT pg_sleep(60)"))
    elif state == "copy":
        client.send(query("COPY oauth_tokens (user_id, access_token) FROM STDIN"))
        assert client.read().kind == "G"
        client.send(_message(b"d", f"1\t{TOKEN}\n".encode()))
    else:
        replies = client.run(
            query(
                "BEGIN; INSERT INTO oauth_tokens (user_id, access_token) "
                f"VALUES (1, '{TOKEN}')"
            )
        )
        assert status(replies) == "T"
    return int(pid)


def _backend_state(server: PgServer, pid: int) -> str | None:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return None if row is None else str(row[0])


def _wait_for_backend(server: PgServer, pid: int, state: str | None) -> None:
    reached = wait_until(lambda: _backend_state(server, pid) == state)
    assert reached, f"backend {pid} is {_backend_state(server, pid)!r}, not {state!r}"


def _terminate(server: PgServer, pid: int) -> None:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _replies_until_closed(client: RawClient) -> list[Reply]:
    """Read every message up to the end of the connection."""
    replies = []
    while True:
        try:
            replies.append(client.read())
        except ConnectionError:
            return replies


def _error_fields(replies: list[Reply]) -> list[dict[str, str]]:
    return [reply.error_fields() for reply in replies if reply.kind == "E"]


@pytest.mark.parametrize("state", STATES)
def test_client_disconnect_ends_session(oauth_proxy: RunningProxy, state: str) -> None:
    server = oauth_proxy.server
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as other:
        baseline = proxy_state(oauth_proxy)
        client = _connect(server, oauth_proxy.database, oauth_proxy.port)
        pid = _enter(client, state)
        _wait_for_backend(server, pid, BACKEND_STATES[state])

        # An abrupt close, without Terminate, as when a client process dies.
        client._sock.close()

        _wait_for_backend(server, pid, None)
        assert wait_for_state(oauth_proxy, baseline) == baseline
        assert other.execute("SELECT 'still served'").fetchall() == [("still served",)]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


@pytest.mark.parametrize("state", STATES)
def test_backend_termination_matches_direct(
    oauth_proxy: RunningProxy, state: str
) -> None:
    server = oauth_proxy.server
    direct = _connect(server, oauth_proxy.database)
    direct_pid = _enter(direct, state)
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as other:
        baseline = proxy_state(oauth_proxy)
        client = _connect(server, oauth_proxy.database, oauth_proxy.port)
        pid = _enter(client, state)
        for backend in (direct_pid, pid):
            _wait_for_backend(server, backend, BACKEND_STATES[state])
            _terminate(server, backend)

        expected = _replies_until_closed(direct)
        replies = _replies_until_closed(client)

        assert [reply.kind for reply in replies] == [reply.kind for reply in expected]
        assert _error_fields(replies) == _error_fields(expected)
        assert _error_fields(replies)[0]["C"] == "57P01"
        assert _error_fields(replies)[0]["S"] == "FATAL"
        assert wait_for_state(oauth_proxy, baseline) == baseline
        assert other.execute("SELECT 'still served'").fetchall() == [("still served",)]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


# Server restart, on a cluster of this test's own


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A throwaway cluster that the test may restart without disturbing others."""
    prefer: BinarySource = "system"
    if os.environ.get("PGSEAL_TEST_PG") == "embedded":
        prefer = "embedded"
    base = Path(tempfile.mkdtemp(prefix="pgseal-restart-"))
    # The postgres service user must be able to enter it when run as root.
    base.chmod(0o755)
    try:
        cluster = Cluster(
            find_bin_dir(prefer), base / "data", password=secrets.token_urlsafe(24)
        )
        with cluster:
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                conn.execute(OAUTH_TABLE)
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_server_restart_ends_sessions(
    own_cluster: Cluster, start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy("postgres", server=own_cluster)
    baseline = proxy_state(proxy)
    direct = {state: _connect(own_cluster, "postgres") for state in STATES}
    proxied = {state: _connect(own_cluster, "postgres", proxy.port) for state in STATES}
    for state in STATES:
        for client in (direct[state], proxied[state]):
            pid = _enter(client, state)
            _wait_for_backend(own_cluster, pid, BACKEND_STATES[state])

    own_cluster.stop()
    own_cluster.start()

    for state in STATES:
        expected = _replies_until_closed(direct[state])
        replies = _replies_until_closed(proxied[state])
        assert [reply.kind for reply in replies] == [reply.kind for reply in expected]
        assert _error_fields(replies) == _error_fields(expected)
        assert _error_fields(replies)[0]["C"] == "57P01"
    assert wait_for_state(proxy, baseline) == baseline
    _check_new_session(proxy)


def _check_new_session(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (2, %s)", (TOKEN,)
        )
        read = conn.execute("SELECT user_id, access_token FROM oauth_tokens").fetchall()
    assert read == [(2, TOKEN)]
    ((stored,),) = proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, TOKEN)
