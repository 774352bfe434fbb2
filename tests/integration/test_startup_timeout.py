"""The startup timeout: a client that stalls before its startup packet is dropped."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tls import TlsFiles
from tests.integration.live_state import proxy_state, wait_for_state

STARTUP_TIMEOUT = 0.5
SSL_REQUEST = struct.pack("!II", 8, 80877103)

# What each stalled client sends before it stops.
STALLED = {
    "nothing": b"",
    "partial_length": b"\0\0",
    "half_startup_packet": struct.pack("!II", 40, 196608) + b"user\0",
    "partial_ssl_request": SSL_REQUEST[:6],
}


@pytest.fixture
def quick_timeout_proxy(
    fresh_db: str, start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> RunningProxy:
    # An empty rules folder, so that the database needs no ruled tables.
    rules = tmp_path / "rules"
    rules.mkdir()
    return start_proxy(fresh_db, rules=rules, startup_timeout=STARTUP_TIMEOUT)


@pytest.mark.parametrize("sent", STALLED)
def test_stalled_client_dropped(quick_timeout_proxy: RunningProxy, sent: str) -> None:
    proxy = quick_timeout_proxy
    baseline = proxy_state(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(STALLED[sent])
        started = time.monotonic()
        # Closed without a message, as PostgreSQL closes on its
        # authentication_timeout. A proxy without the timeout never closes,
        # and recv raises TimeoutError after 10 s.
        assert sock.recv(1024) == b""
        waited = time.monotonic() - started

    assert waited >= STARTUP_TIMEOUT * 0.8
    assert wait_for_state(proxy, baseline) == baseline


@pytest.fixture
def quick_timeout_tls_proxy(
    fresh_db: str,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
    tls_files: TlsFiles,
) -> RunningProxy:
    rules = tmp_path / "rules"
    rules.mkdir()
    return start_proxy(
        fresh_db,
        rules=rules,
        startup_timeout=STARTUP_TIMEOUT,
        tls_cert=tls_files.proxy.cert,
        tls_key=tls_files.proxy.key,
    )


@pytest.mark.parametrize("direct_tls", [False, True], ids=["ssl_request", "direct"])
def test_stalled_tls_handshake_dropped(
    quick_timeout_tls_proxy: RunningProxy, direct_tls: bool
) -> None:
    proxy = quick_timeout_tls_proxy
    baseline = proxy_state(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        if direct_tls:
            # The first bytes of a TLS record header, and then nothing.
            sock.sendall(b"\x16\x03\x01")
        else:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
        assert sock.recv(1024) == b""

    assert wait_for_state(proxy, baseline) == baseline


def test_timeout_ends_after_startup(quick_timeout_proxy: RunningProxy) -> None:
    with psycopg.connect(quick_timeout_proxy.dsn(), autocommit=True) as conn:
        time.sleep(STARTUP_TIMEOUT * 3)
        assert conn.execute("SELECT 'still connected'").fetchall() == [
            ("still connected",)
        ]


def test_stalled_client_spares_others(quick_timeout_proxy: RunningProxy) -> None:
    proxy = quick_timeout_proxy
    address = ("127.0.0.1", proxy.port)
    with (
        socket.create_connection(address, timeout=10) as stalled,
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
    ):
        assert stalled.recv(1024) == b""
        assert conn.execute("SELECT 'served'").fetchall() == [("served",)]
