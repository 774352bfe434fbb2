"""TLS on both legs: the client's TLS ends at the proxy, which opens its own.

Client-leg cases run against the session's cluster, which has no TLS. Cases
that need TLS to the server use `tls_cluster`, whose pg_hba.conf rejects
plaintext TCP, so a working connection there proves the server leg is TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.embedded import Cluster, make_dsn
from proxy.server import Listener, Relay, Upstream
from proxy.tls import SSL_REQUEST, ClientTls, SslMode, load_client_tls
from proxy.wire.messages import decode_error_fields
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.fixtures.tls import TlsFiles
from tests.integration.sealing import assert_sealed

TOKEN = "gho_tls_" + "Hq7mZ" * 8
GSSENC_REQUEST = 80877104
SSL_REQUEST_PACKET = struct.pack("!II", 8, SSL_REQUEST)
DIRECT_TLS_LIBPQ = 170000


# Helpers


def _create_table(server: PgServer, database: str) -> None:
    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)


def _write_and_read(proxy: RunningProxy, conn: psycopg.Connection[Any]) -> None:
    """Write a token through the proxy, read it back, and check it is stored sealed."""
    conn.execute(
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)", (1, TOKEN)
    )
    row = conn.execute("SELECT access_token FROM oauth_tokens").fetchone()
    assert row == (TOKEN,)
    ((stored,),) = proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, TOKEN)


def _server_ssl_in_use(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server's end of this session, behind the proxy, is TLS."""
    row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return bool((row.fetchone() or (False,))[0])


def _startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", 3 << 16)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def _read_until_eof(sock: socket.socket | ssl.SSLSocket) -> bytes:
    sock.settimeout(10)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data
        if not chunk:
            return data
        data += chunk


def _error_fields(data: bytes) -> dict[str, str]:
    """Decode the ErrorResponse that data starts with."""
    assert data[:1] == b"E"
    (length,) = struct.unpack_from("!I", data, 1)
    return decode_error_fields(data[5 : 1 + length])


def _client_context(tls_files: TlsFiles, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


# Fixtures


@pytest.fixture
def tls_proxy(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tls_files: TlsFiles,
) -> RunningProxy:
    """A proxy with client TLS over the session's cluster, which has no TLS."""
    _create_table(pg_cluster, fresh_db)
    return start_proxy(
        fresh_db, tls_cert=tls_files.proxy.cert, tls_key=tls_files.proxy.key
    )


@pytest.fixture
def start_tls_proxy(
    tls_db: str,
    tls_cluster: Cluster,
    start_proxy: Callable[..., RunningProxy],
    tls_files: TlsFiles,
) -> Callable[..., RunningProxy]:
    """Return a function that starts a proxy over the TLS cluster."""
    _create_table(tls_cluster, tls_db)

    def start(
        identity: str = "proxy", upstream_options: dict[str, Any] | None = None
    ) -> RunningProxy:
        pair = tls_files.proxy if identity == "proxy" else tls_files.server
        return start_proxy(
            tls_db,
            server=tls_cluster,
            upstream_options=upstream_options or {"sslmode": SslMode.REQUIRE},
            tls_cert=pair.cert,
            tls_key=pair.key,
        )

    return start


@pytest.fixture
def start_relay(
    proxy_loop: asyncio.AbstractEventLoop,
) -> Iterator[Callable[[Upstream, ClientTls | None], int]]:
    """Return a function that starts a bare relay, with no rules, and its port.

    A whole proxy would not start where its own connections fail, but the
    relay shows what a client sees when the server leg fails.
    """
    listeners: list[Listener] = []

    def start(upstream: Upstream, client_tls: ClientTls | None = None) -> int:
        async def listen() -> Listener:
            relay = Relay(upstream, {}, client_tls=client_tls)
            return await Listener.start(relay.accept, "127.0.0.1", 0)

        listener = asyncio.run_coroutine_threadsafe(listen(), proxy_loop).result(30)
        listeners.append(listener)
        port: int = listener.sockets[0].getsockname()[1]
        return port

    yield start
    for listener in listeners:
        proxy_loop.call_soon_threadsafe(listener.close)


async def _relay_error(
    port: int, server: PgServer, database: str
) -> asyncpg.PostgresError:
    """Connect to a relay in plaintext and return the error it fails with."""
    dsn = make_dsn("127.0.0.1", port, server.superuser, server.password, database)
    with pytest.raises(asyncpg.PostgresError) as failure:
        await asyncpg.connect(dsn, ssl=False, timeout=20)
    return failure.value


# Client leg


def test_client_tls_seals_columns(tls_proxy: RunningProxy) -> None:
    with psycopg.connect(tls_proxy.dsn(), sslmode="require", autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        _write_and_read(tls_proxy, conn)


def test_client_verify_full(tls_proxy: RunningProxy, tls_files: TlsFiles) -> None:
    with psycopg.connect(
        tls_proxy.dsn(),
        sslmode="verify-full",
        sslrootcert=str(tls_files.ca_cert),
        autocommit=True,
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_verify_full_wrong_ca(
    tls_proxy: RunningProxy, tls_files: TlsFiles
) -> None:
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(
            tls_proxy.dsn(),
            sslmode="verify-full",
            sslrootcert=str(tls_files.other_ca_cert),
        )


def test_client_direct_tls(tls_proxy: RunningProxy) -> None:
    if psycopg.pq.version() < DIRECT_TLS_LIBPQ:
        pytest.skip(f"libpq {psycopg.pq.version()} has no sslnegotiation=direct")
    with psycopg.connect(
        tls_proxy.dsn(), sslmode="require", sslnegotiation="direct", autocommit=True
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        _write_and_read(tls_proxy, conn)


async def test_client_direct_tls_asyncpg(
    tls_proxy: RunningProxy, tls_files: TlsFiles
) -> None:
    context = _client_context(tls_files, alpn=["postgresql"])
    conn = await asyncpg.connect(tls_proxy.dsn(), ssl=context, direct_tls=True)
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http"])
def test_direct_tls_without_postgresql_alpn(
    tls_proxy: RunningProxy, tls_files: TlsFiles, alpn: list[str] | None
) -> None:
    context = _client_context(tls_files, alpn)
    address = ("127.0.0.1", tls_proxy.port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        fields = _error_fields(_read_until_eof(conn))
    assert fields["C"] == "08P01"
    assert "ALPN" in fields["M"]


def test_direct_tls_without_certificate(
    oauth_proxy: RunningProxy, tls_files: TlsFiles
) -> None:
    context = _client_context(tls_files, ["postgresql"])
    address = ("127.0.0.1", oauth_proxy.port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_ssl_request_without_certificate(oauth_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", oauth_proxy.port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST_PACKET)
        assert sock.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(oauth_proxy.dsn(), sslmode="require")


def test_plaintext_after_ssl_request(tls_proxy: RunningProxy) -> None:
    startup = _startup_packet(tls_proxy.server.superuser, tls_proxy.database)
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST_PACKET + startup)
        data = _read_until_eof(sock)
    fields = _error_fields(data)
    assert fields["C"] == "08P01"
    assert fields["M"] == "received unencrypted data after SSL request"


def test_gssenc_then_ssl_request(tls_proxy: RunningProxy, tls_files: TlsFiles) -> None:
    context = _client_context(tls_files, ["postgresql"])
    startup = _startup_packet(tls_proxy.server.superuser, tls_proxy.database)
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as raw:
        raw.sendall(struct.pack("!II", 8, GSSENC_REQUEST))
        assert raw.recv(1) == b"N"
        raw.sendall(SSL_REQUEST_PACKET)
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.selected_alpn_protocol() == "postgresql"
            conn.sendall(startup)
            # The server's first message is its authentication request.
            assert conn.recv(1) == b"R"


def test_ssl_request_inside_tls(tls_proxy: RunningProxy, tls_files: TlsFiles) -> None:
    context = _client_context(tls_files, ["postgresql"])
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST_PACKET)
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(SSL_REQUEST_PACKET)
            fields = _error_fields(_read_until_eof(conn))
    assert fields["C"] == "08P01"
    assert "unsupported frontend protocol 1234.5679" in fields["M"]


# Channel binding, with TLS on both legs


def test_channel_binding_prefer_fails_clearly(
    start_tls_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_tls_proxy()
    with pytest.raises(psycopg.OperationalError) as failure:
        psycopg.connect(proxy.dsn(), sslmode="require", channel_binding="prefer")
    assert "channel binding cannot pass through pgseal" in str(failure.value)


def test_channel_binding_disable(start_tls_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_tls_proxy()
    with psycopg.connect(
        proxy.dsn(), sslmode="require", channel_binding="disable", autocommit=True
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert _server_ssl_in_use(conn)
        _write_and_read(proxy, conn)


def test_channel_binding_require_fails(
    start_tls_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_tls_proxy()
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(proxy.dsn(), sslmode="require", channel_binding="require")


@pytest.mark.parametrize("binding", ["prefer", "require"])
def test_channel_binding_same_certificate(
    start_tls_proxy: Callable[..., RunningProxy], binding: str
) -> None:
    proxy = start_tls_proxy(identity="server")
    with psycopg.connect(
        proxy.dsn(), sslmode="require", channel_binding=binding, autocommit=True
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        _write_and_read(proxy, conn)


def test_plaintext_client_tls_server(
    start_tls_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_tls_proxy()
    with psycopg.connect(proxy.dsn(), sslmode="disable", autocommit=True) as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert _server_ssl_in_use(conn)


def test_cancel_request_tls_both_legs(
    start_tls_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_tls_proxy()
    with psycopg.connect(
        proxy.dsn(), sslmode="require", channel_binding="disable", autocommit=True
    ) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
    assert time.monotonic() - started < 15


async def test_asyncpg_client_tls_both_legs(
    start_tls_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_tls_proxy()
    conn = await asyncpg.connect(proxy.dsn(), ssl="require")
    try:
        assert await conn.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()


# Server leg


async def test_upstream_require_without_server_tls(
    pg_cluster: PgServer,
    fresh_db: str,
    start_relay: Callable[[Upstream, ClientTls | None], int],
) -> None:
    upstream = replace(
        Upstream.parse(pg_cluster.dsn(fresh_db)), sslmode=SslMode.REQUIRE
    )
    port = start_relay(upstream, None)
    error = await _relay_error(port, pg_cluster, fresh_db)
    assert error.sqlstate == "08006"
    assert "server does not support SSL" in str(error)


def test_upstream_require_proxy_start_fails(
    pg_cluster: PgServer, fresh_db: str, start_proxy: Callable[..., RunningProxy]
) -> None:
    _create_table(pg_cluster, fresh_db)
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        start_proxy(fresh_db, upstream_options={"sslmode": SslMode.REQUIRE})


def test_upstream_verify_full(
    start_tls_proxy: Callable[..., RunningProxy], tls_files: TlsFiles
) -> None:
    # The server's certificate names only localhost.
    proxy = start_tls_proxy(
        upstream_options={
            "host": "localhost",
            "sslmode": SslMode.VERIFY_FULL,
            "sslrootcert": str(tls_files.ca_cert),
        }
    )
    with psycopg.connect(proxy.dsn(), sslmode="disable", autocommit=True) as conn:
        assert _server_ssl_in_use(conn)
        _write_and_read(proxy, conn)


def test_upstream_verify_full_wrong_ca_start_fails(
    start_tls_proxy: Callable[..., RunningProxy], tls_files: TlsFiles
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        start_tls_proxy(
            upstream_options={
                "host": "localhost",
                "sslmode": SslMode.VERIFY_FULL,
                "sslrootcert": str(tls_files.other_ca_cert),
            }
        )


@pytest.mark.parametrize(
    ("host", "mode", "rootcert", "reason"),
    [
        ("localhost", SslMode.VERIFY_FULL, "other", "unable to get local issuer"),
        ("127.0.0.1", SslMode.VERIFY_FULL, "ca", "IP address mismatch"),
        ("localhost", SslMode.REQUIRE, "other", "unable to get local issuer"),
    ],
    ids=["wrong-ca", "wrong-host", "require-with-root"],
)
async def test_upstream_verification_fails(
    tls_cluster: Cluster,
    tls_db: str,
    tls_files: TlsFiles,
    start_relay: Callable[[Upstream, ClientTls | None], int],
    host: str,
    mode: SslMode,
    rootcert: str,
    reason: str,
) -> None:
    cafile = tls_files.ca_cert if rootcert == "ca" else tls_files.other_ca_cert
    upstream = replace(
        Upstream.parse(tls_cluster.dsn(tls_db)),
        host=host,
        sslmode=mode,
        sslrootcert=str(cafile),
    )
    port = start_relay(upstream, None)
    error = await _relay_error(port, tls_cluster, tls_db)
    assert error.sqlstate == "08006"
    assert "certificate verification failed" in str(error)
    assert reason in str(error)


async def test_upstream_verify_ca_ignores_host(
    tls_cluster: Cluster,
    tls_db: str,
    tls_files: TlsFiles,
    start_relay: Callable[[Upstream, ClientTls | None], int],
) -> None:
    upstream = replace(
        Upstream.parse(tls_cluster.dsn(tls_db)),
        sslmode=SslMode.VERIFY_CA,
        sslrootcert=str(tls_files.ca_cert),
    )
    port = start_relay(upstream, None)
    dsn = make_dsn(
        "127.0.0.1", port, tls_cluster.superuser, tls_cluster.password, tls_db
    )
    conn = await asyncpg.connect(dsn, ssl=False)
    try:
        assert await conn.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()


async def test_upstream_disable_sends_no_ssl_request(
    tls_cluster: Cluster,
    tls_db: str,
    start_relay: Callable[[Upstream, ClientTls | None], int],
) -> None:
    upstream = replace(Upstream.parse(tls_cluster.dsn(tls_db)), sslmode=SslMode.DISABLE)
    port = start_relay(upstream, None)
    error = await _relay_error(port, tls_cluster, tls_db)
    # pg_hba.conf of the TLS cluster rejects plaintext TCP.
    assert error.sqlstate == "28000"
    assert "no encryption" in str(error)


async def test_relay_client_tls_over_tls_server(
    tls_cluster: Cluster,
    tls_db: str,
    tls_files: TlsFiles,
    start_relay: Callable[[Upstream, ClientTls | None], int],
) -> None:
    client_tls = load_client_tls(tls_files.proxy.cert, tls_files.proxy.key)
    upstream = replace(Upstream.parse(tls_cluster.dsn(tls_db)), sslmode=SslMode.REQUIRE)
    port = start_relay(upstream, client_tls)
    dsn = make_dsn(
        "127.0.0.1", port, tls_cluster.superuser, tls_cluster.password, tls_db
    )
    context = _client_context(tls_files, ["postgresql"])
    conn = await asyncpg.connect(dsn, ssl=context)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
