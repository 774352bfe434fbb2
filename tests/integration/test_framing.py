"""Message framing through the proxy: split reads, batched reads, large messages."""

from __future__ import annotations

import hashlib
import secrets
import socket
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.live_state import proxy_state, wait_for_state
from tests.integration.sealing import assert_sealed
from tests.integration.test_extended_protocol import (
    INSERT,
    SELECT_TOKENS,
    SYNC,
    TOKEN,
    RawClient,
    bind,
    errors,
    execute,
    kinds,
    parse,
    query,
    rows,
)

MIB = 1024 * 1024
HUNDRED_MIB = 100 * MIB


class DribblingClient(RawClient):
    """A raw client that can send each byte in a TCP segment of its own."""

    def dribble(self, data: bytes, pause: float = 0.001) -> None:
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            self._sock.send(data[i : i + 1])
            # The pause lets each byte leave before the next, so that the
            # proxy's reads see them one at a time.
            time.sleep(pause)


def _raw_client(proxy: RunningProxy, cls: type[RawClient] = RawClient) -> RawClient:
    server = proxy.server
    return cls(
        "127.0.0.1", proxy.port, server.superuser, server.password, proxy.database
    )


def _stored_tokens(proxy: RunningProxy) -> list[tuple[int, str | None]]:
    return proxy.direct("SELECT user_id, access_token FROM oauth_tokens ORDER BY id")


def test_one_byte_segments_through_proxy(oauth_proxy: RunningProxy) -> None:
    client = _raw_client(oauth_proxy, DribblingClient)
    assert isinstance(client, DribblingClient)
    batch = b"".join(
        [
            parse("", INSERT),
            bind("", "", ("7", TOKEN, None)),
            execute(),
            parse("", SELECT_TOKENS),
            bind("", ""),
            execute(),
            SYNC,
        ]
    )
    client.dribble(batch)
    replies = client.read_until_ready()
    client.dribble(query("SELECT 'after the split batch'"))
    after = client.read_until_ready()
    client.close()

    assert kinds(replies) == "12C12DCZ"
    assert rows(replies) == [["7", TOKEN, None]]
    assert rows(after) == [["after the split batch"]]
    ((user_id, access),) = _stored_tokens(oauth_proxy)
    assert user_id == 7
    assert_sealed(access, TOKEN)


def test_many_messages_in_one_read(oauth_proxy: RunningProxy) -> None:
    count = 1000
    client = _raw_client(oauth_proxy)
    messages = [parse("ins", INSERT)]
    for i in range(count):
        messages += [bind("", "ins", (str(i), f"{TOKEN}-{i}", None)), execute()]
    messages += [
        parse("", "SELECT count(*) FROM oauth_tokens"),
        bind("", ""),
        execute(),
    ]
    # One sendall of about 100 kB: the proxy reads many messages at a time.
    replies = client.run(*messages, SYNC)
    client.close()

    assert kinds(replies) == "1" + "2C" * count + "12DCZ"
    assert rows(replies) == [[str(count)]]
    stored = _stored_tokens(oauth_proxy)
    assert [user_id for user_id, _ in stored] == list(range(count))
    for user_id, access in stored:
        assert_sealed(access, f"{TOKEN}-{user_id}")


@pytest.fixture
def blob_proxy(oauth_proxy: RunningProxy) -> RunningProxy:
    oauth_proxy.direct("CREATE TABLE blobs (id integer, data bytea, note text)")
    return oauth_proxy


@pytest.mark.slow
def test_hundred_mib_bytea_plain_column(blob_proxy: RunningProxy) -> None:
    data = secrets.token_bytes(HUNDRED_MIB)
    with psycopg.connect(blob_proxy.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO blobs (id, data) VALUES (1, %b)", (data,))
        # Text format sends the value as hex, a 200 MiB DataRow.
        (text_read,) = conn.execute("SELECT data FROM blobs").fetchone() or (None,)
        binary = conn.cursor(binary=True)
        (binary_read,) = binary.execute("SELECT data FROM blobs").fetchone() or (None,)

    assert text_read == data
    assert binary_read == data
    digest = hashlib.md5(data).hexdigest()
    assert blob_proxy.direct("SELECT md5(data) FROM blobs") == [(digest,)]


@pytest.mark.slow
def test_hundred_mib_text_plain_column(blob_proxy: RunningProxy) -> None:
    note = secrets.token_hex(HUNDRED_MIB // 2)
    with psycopg.connect(blob_proxy.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO blobs (id, note) VALUES (1, %s)", (note,))
        (read,) = conn.execute("SELECT note FROM blobs").fetchone() or (None,)

    assert read == note
    assert blob_proxy.direct("SELECT length(note) FROM blobs") == [(HUNDRED_MIB,)]


@pytest.mark.slow
def test_hundred_mib_encrypted_column(oauth_proxy: RunningProxy) -> None:
    token = secrets.token_hex(HUNDRED_MIB // 2)
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (token,)
        )
        (read,) = conn.execute("SELECT access_token FROM oauth_tokens").fetchone() or (
            None,
        )

    assert read == token
    ((user_id, stored),) = _stored_tokens(oauth_proxy)
    assert user_id == 1
    assert_sealed(stored, token)
    assert stored is not None
    # The armoured ciphertext is about 4/3 of the value, over 100 MiB.
    assert len(stored) > HUNDRED_MIB


# The maximum message size


@pytest.fixture
def small_limit_proxy(
    fresh_db: str, pg_cluster: PgServer, start_proxy: Callable[..., RunningProxy]
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
        conn.execute("CREATE TABLE notes (id integer, note text)")
    return start_proxy(fresh_db, max_message=MIB)


def test_oversized_client_message_fatal(small_limit_proxy: RunningProxy) -> None:
    proxy = small_limit_proxy
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        baseline = proxy_state(proxy)
        conn = psycopg.connect(proxy.dsn(), autocommit=True)
        with pytest.raises(psycopg.errors.ProtocolViolation) as failure:
            conn.execute("INSERT INTO notes VALUES (1, %s)", ("x" * (2 * MIB),))

        assert failure.value.sqlstate == "08P01"
        assert failure.value.diag.severity == "FATAL"
        message = failure.value.diag.message_primary or ""
        assert f"from the client exceeds the maximum message size of {MIB}" in message
        assert "--max-message-size" in (failure.value.diag.message_hint or "")
        assert conn.closed
        conn.close()
        assert proxy.direct("SELECT count(*) FROM notes") == [(0,)]
        assert other.execute("SELECT 'still served'").fetchall() == [("still served",)]
        assert wait_for_state(proxy, baseline) == baseline


def test_oversized_server_message_fatal(small_limit_proxy: RunningProxy) -> None:
    proxy = small_limit_proxy
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        baseline = proxy_state(proxy)
        conn = psycopg.connect(proxy.dsn(), autocommit=True)
        with pytest.raises(psycopg.errors.ProtocolViolation) as failure:
            conn.execute("SELECT repeat('x', %s)", (2 * MIB,))

        message = failure.value.diag.message_primary or ""
        assert "from the server exceeds the maximum message size" in message
        assert failure.value.diag.severity == "FATAL"
        assert conn.closed
        conn.close()
        assert other.execute("SELECT 'still served'").fetchall() == [("still served",)]
        assert wait_for_state(proxy, baseline) == baseline


def test_message_at_limit_accepted(small_limit_proxy: RunningProxy) -> None:
    # A DataRow of one text value carries 11 bytes besides the value:
    # type, length, field count and field length.
    value = "y" * (MIB - 11)
    with psycopg.connect(small_limit_proxy.dsn(), autocommit=True) as conn:
        (read,) = conn.execute("SELECT repeat('y', %s)", (len(value),)).fetchone() or (
            None,
        )
    assert read == value


def test_oversized_message_sent_whole(small_limit_proxy: RunningProxy) -> None:
    client = _raw_client(small_limit_proxy)
    # The client sends all 32 MiB before it reads. Had the proxy closed the
    # socket with that input unread, the TCP reset would fail this send and
    # could destroy the error before the client reads it.
    client.send(query("SELECT '" + "z" * (32 * MIB) + "'"))
    reply = client.read()
    assert reply.kind == "E"
    assert errors([reply]) == ["08P01"]
    with pytest.raises(ConnectionError):
        client.read()
