"""COPY as the protocol runs it: CopyFail, server errors mid-copy, the extended
protocol, and large copies that stream through the proxy's bounded buffers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.live_state import buffered_bytes
from tests.integration.sealing import assert_sealed
from tests.integration.test_extended_protocol import (
    SYNC,
    RawClient,
    _message,
    bind,
    execute,
    kinds,
    parse,
)

COPY_IN = "COPY oauth_tokens (user_id, access_token) FROM STDIN"


class _Abort(Exception):
    """Raised inside a COPY block so that psycopg sends CopyFail."""


def _direct_dsn(proxy: RunningProxy) -> str:
    return proxy.server.dsn(proxy.database)


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_client_copy_fail_writes_nothing(oauth_proxy: RunningProxy, path: str) -> None:
    dsn = oauth_proxy.dsn() if path == "proxy" else _direct_dsn(oauth_proxy)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # psycopg sends CopyFail for the exception, takes the server's
        # error for it, and raises the exception again.
        with pytest.raises(_Abort), conn.cursor().copy(COPY_IN) as copy:
            copy.write_row((1, "copy-fail-secret"))
            raise _Abort()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 'after'").fetchall() == [("after",)]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_server_error_before_copy_done(oauth_proxy: RunningProxy, path: str) -> None:
    # The second row has no user_id, which is NOT NULL: the server raises
    # while the client is still sending rows.
    dsn = oauth_proxy.dsn() if path == "proxy" else _direct_dsn(oauth_proxy)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.NotNullViolation) as info:
            with conn.cursor().copy(COPY_IN) as copy:
                copy.write_row((1, "first-row-secret"))
                copy.write_row((None, "second-row-secret"))
                for number in range(2, 2000):
                    copy.write_row((number, f"later-row-secret-{number}"))
        assert info.value.sqlstate == "23502"
        assert conn.execute("SELECT 'after'").fetchall() == [("after",)]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


@pytest.fixture
def raw_client(oauth_proxy: RunningProxy) -> Iterator[RawClient]:
    server = oauth_proxy.server
    client = RawClient(
        "127.0.0.1", oauth_proxy.port, server.superuser, server.password, oauth_proxy.database
    )
    yield client
    client.close()


def test_copy_in_extended_protocol(oauth_proxy: RunningProxy, raw_client: RawClient) -> None:
    raw_client.send(parse("", COPY_IN), bind("", ""), execute())
    # The server replies to Execute with CopyInResponse before it reads rows.
    assert [raw_client.read().kind for _ in range(3)] == ["1", "2", "G"]
    rows = b"7\textended-copy-secret\n8\t\\N\n"
    raw_client.send(_message(b"d", rows), _message(b"c", b""), SYNC)
    assert kinds(raw_client.read_until_ready()) == "CZ"

    stored = oauth_proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert stored[1] == (8, None)
    assert stored[0][0] == 7
    assert_sealed(stored[0][1], "extended-copy-secret")


def test_copy_out_extended_protocol(
    oauth_proxy: RunningProxy, raw_client: RawClient
) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, %s)",
            ("copy-out-secret",),
        )
    replies = raw_client.run(
        parse("", "COPY (SELECT user_id, access_token FROM oauth_tokens) TO STDOUT"),
        bind("", ""),
        execute(),
        SYNC,
    )
    assert kinds(replies) == "12HdcCZ"
    data = next(reply for reply in replies if reply.kind == "d")
    assert data.payload == b"3\tcopy-out-secret\n"


def test_large_copy_in_streams_bounded(oauth_proxy: RunningProxy) -> None:
    # About 40 MB of rows pass through the proxy while a sampler reads how
    # many bytes it buffers. A proxy that gathered the whole COPY would
    # buffer tens of megabytes at once.
    token = "t" * 2000
    rows = 20_000
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, buffered_bytes(oauth_proxy))
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
            with conn.cursor().copy(COPY_IN) as copy:
                for number in range(rows):
                    copy.write_row((number, f"{number}-{token}"))
    finally:
        done.set()
        sampler.join()

    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(rows,)]
    assert peak < 8 * 1024 * 1024
    ((stored,),) = oauth_proxy.direct(
        "SELECT access_token FROM oauth_tokens WHERE user_id = 12345"
    )
    assert_sealed(stored, f"12345-{token}")
