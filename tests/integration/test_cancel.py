"""CancelRequest through the proxy: the right backend, no reply, no early close.

A client cancels with the process ID and secret key the server sent in
BackendKeyData. The proxy relays BackendKeyData unchanged and passes each
CancelRequest to the server on a connection of its own. A Forwarder in front
of the proxy records the key the client receives. A Forwarder between the
proxy and the server can delay a CancelRequest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from proxy.tls import SslMode
from tests.fixtures.postgres import ExternalServer, PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.forwarder import (
    Forwarder,
    backend_key,
    cancel_request,
    client_dsn,
    send_cancel,
    sleep_cancelled,
)

# Seconds by which the upstream Forwarder delays each CancelRequest.
CANCEL_DELAY = 1.5


def proxy_through(
    forwarder: Forwarder,
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
) -> RunningProxy:
    """Start a proxy whose upstream connections all pass through `forwarder`."""
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    server = ExternalServer(
        "127.0.0.1", forwarder.port, pg_cluster.superuser, pg_cluster.password
    )
    return start_proxy(
        fresh_db, server=server, upstream_options={"sslmode": SslMode.DISABLE}
    )


def test_cancel_reaches_own_session(oauth_proxy: RunningProxy) -> None:
    port = oauth_proxy.port
    with (
        Forwarder(port) as tap_a,
        Forwarder(port) as tap_b,
        psycopg.connect(client_dsn(oauth_proxy, tap_a.port), autocommit=True) as conn_a,
        psycopg.connect(client_dsn(oauth_proxy, tap_b.port), autocommit=True) as conn_b,
        ThreadPoolExecutor(1) as pool,
    ):
        pid_a, key_a = backend_key(tap_a)
        pid_b, _ = backend_key(tap_b)
        started = time.monotonic()
        other = pool.submit(
            lambda: conn_b.execute("SELECT 'finished' FROM pg_sleep(5)").fetchone()
        )
        replies: list[bytes] = []
        elapsed_a = sleep_cancelled(
            conn_a,
            lambda: replies.append(send_cancel(port, cancel_request(pid_a, key_a))),
        )
        # Raises QueryCanceled if the cancel reached the other session.
        row_b = other.result(30)
        elapsed_b = time.monotonic() - started

        # Both sessions go on after the cancel.
        assert conn_a.execute("SELECT 1").fetchone() == (1,)
        assert conn_b.execute("SELECT 2").fetchone() == (2,)
    assert pid_a != pid_b
    # The cancel arrived while the other session's query was still running.
    assert elapsed_a < elapsed_b
    assert row_b == ("finished",)
    assert elapsed_b >= 5
    assert replies == [b""]


def test_cancel_delivered_before_close(
    fresh_db: str, pg_cluster: PgServer, start_proxy: Callable[..., RunningProxy]
) -> None:
    with Forwarder(pg_cluster.port, cancel_delay=CANCEL_DELAY) as upstream:
        proxy = proxy_through(upstream, fresh_db, pg_cluster, start_proxy)
        with (
            Forwarder(proxy.port) as tap,
            psycopg.connect(client_dsn(proxy, tap.port), autocommit=True) as conn,
        ):
            pid, key = backend_key(tap)
            closed_at: list[float] = []

            def cancel() -> None:
                send_cancel(proxy.port, cancel_request(pid, key))
                closed_at.append(time.monotonic())

            sleep_cancelled(conn, cancel)
    (delivered,) = upstream.cancels()
    assert delivered.cancel_done_at is not None
    assert delivered.from_target == b""
    # The proxy closed the client's cancel connection only after the server
    # had received the cancel and closed its own.
    assert closed_at[0] >= delivered.cancel_done_at


@pytest.mark.parametrize("key_size", [0, 3, 257], ids=["none", "3-bytes", "257-bytes"])
def test_cancel_invalid_key_length_dropped(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    key_size: int,
) -> None:
    # A valid CancelRequest sent after the invalid one marks the point by
    # which the invalid one would have reached the server. Its process ID
    # matches no backend of this key, so it cancels nothing.
    marker = cancel_request(4243, b"mark")
    with Forwarder(pg_cluster.port) as upstream:
        proxy = proxy_through(upstream, fresh_db, pg_cluster, start_proxy)
        reply = send_cancel(proxy.port, cancel_request(4242, b"k" * key_size))
        send_cancel(proxy.port, marker)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(c.cancel_done_at for c in upstream.cancels()):
                break
            time.sleep(0.05)
    assert reply == b""
    assert [cancel.startup for cancel in upstream.cancels()] == [marker]


@pytest.mark.parametrize("key_size", [4, 32, 256])
def test_cancel_valid_key_length_forwarded(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    key_size: int,
) -> None:
    # The process ID matches no backend, so the server cancels nothing.
    packet = cancel_request(4244, bytes(range(256))[:key_size])
    with Forwarder(pg_cluster.port) as upstream:
        proxy = proxy_through(upstream, fresh_db, pg_cluster, start_proxy)
        reply = send_cancel(proxy.port, packet)
    (forwarded,) = upstream.cancels()
    assert reply == b""
    assert forwarded.startup == packet
    assert forwarded.cancel_done_at is not None
