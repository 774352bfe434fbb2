"""Message framing through the proxy: split reads, batched reads, large messages."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from proxy.embedded import make_dsn
from proxy.wire.frames import Frame, FrameReader
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


@pytest.fixture
def read_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the reads that the proxy's frame readers get, in order."""
    sizes: list[int] = []
    feed = FrameReader.feed

    def recording_feed(reader: FrameReader, data: bytes) -> list[Frame]:
        sizes.append(len(data))
        return feed(reader, data)

    monkeypatch.setattr(FrameReader, "feed", recording_feed)
    return sizes


def _raw_client(proxy: RunningProxy, cls: type[RawClient] = RawClient) -> RawClient:
    server = proxy.server
    return cls(
        "127.0.0.1", proxy.port, server.superuser, server.password, proxy.database
    )


def _stored_tokens(proxy: RunningProxy) -> list[tuple[int, str | None]]:
    return proxy.direct("SELECT user_id, access_token FROM oauth_tokens ORDER BY id")


def test_one_byte_segments_through_proxy(
    oauth_proxy: RunningProxy, read_sizes: list[int]
) -> None:
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
    read_sizes.clear()
    client.dribble(batch)
    replies = client.read_until_ready()
    one_byte_reads = read_sizes.count(1)
    client.dribble(query("SELECT 'after the split batch'"))
    after = client.read_until_ready()
    client.close()

    # Most of the batch reached the proxy one byte per read.
    assert one_byte_reads > len(batch) // 2
    assert kinds(replies) == "12C12DCZ"
    assert rows(replies) == [["7", TOKEN, None]]
    assert rows(after) == [["after the split batch"]]
    ((user_id, access),) = _stored_tokens(oauth_proxy)
    assert user_id == 7
    assert_sealed(access, TOKEN)


class DribblingForwarder:
    """A TCP forwarder to a server that can pass the server's bytes one at a time.

    The proxy uses it as its upstream server. Client bytes pass in
    bulk, and while `dribble` is set each server byte leaves in a send of
    its own.
    """

    def __init__(self, target: PgServer) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.dribble = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    host = "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def superuser(self) -> str:
        return self._target.superuser

    @property
    def password(self) -> str:
        return self._target.password

    def dsn(self, dbname: str = "postgres") -> str:
        return make_dsn(self.host, self.port, self.superuser, self.password, dbname)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self._target.host, self._target.port))
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, sink, split in (
                (client, upstream, False),
                (upstream, client, True),
            ):
                thread = threading.Thread(
                    target=self._pipe, args=(source, sink, split), daemon=True
                )
                thread.start()

    def _pipe(self, source: socket.socket, sink: socket.socket, split: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not (split and self.dribble.is_set()):
                    sink.sendall(data)
                    continue
                for i in range(len(data)):
                    sink.send(data[i : i + 1])
                    time.sleep(0.0005)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def dribbling_proxy(
    fresh_db: str, pg_cluster: PgServer, start_proxy: Callable[..., RunningProxy]
) -> Iterator[tuple[RunningProxy, DribblingForwarder]]:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    forwarder = DribblingForwarder(pg_cluster)
    yield start_proxy(fresh_db, server=forwarder), forwarder
    forwarder.close()


def test_one_byte_server_segments(
    dribbling_proxy: tuple[RunningProxy, DribblingForwarder],
    pg_cluster: PgServer,
    read_sizes: list[int],
) -> None:
    proxy, forwarder = dribbling_proxy
    tokens = [f"{TOKEN}-{i}" for i in range(3)]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i, token in enumerate(tokens):
            conn.execute(
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
                (i, token),
            )
        forwarder.dribble.set()
        read_sizes.clear()
        read = conn.execute(
            "SELECT user_id, access_token FROM oauth_tokens WHERE user_id >= %s "
            "ORDER BY user_id",
            (0,),
        ).fetchall()
        forwarder.dribble.clear()
        one_byte_reads = read_sizes.count(1)
        bytes_read = sum(read_sizes)

    # Most of the replies reached the proxy one byte per read.
    assert one_byte_reads > bytes_read // 2
    assert read == list(enumerate(tokens))
    with psycopg.connect(pg_cluster.dsn(proxy.database)) as conn:
        stored = conn.execute(
            "SELECT access_token FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
    for (value,), token in zip(stored, tokens, strict=True):
        assert_sealed(value, token)


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


def test_oversized_message_fatal_without_rules(
    small_limit_proxy: RunningProxy, pg_cluster: PgServer
) -> None:
    # The postgres database has no rules, so its sessions forward reads
    # unsplit after authentication and only scan the message lengths.
    proxy = small_limit_proxy
    dsn = make_dsn(
        "127.0.0.1", proxy.port, pg_cluster.superuser, pg_cluster.password, "postgres"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT repeat('z', 1000)").fetchone() == ("z" * 1000,)
        with pytest.raises(psycopg.errors.ProtocolViolation) as failure:
            conn.execute("SELECT %s::text", ("x" * (2 * MIB),))
    assert failure.value.sqlstate == "08P01"
    message = failure.value.diag.message_primary or ""
    assert f"from the client exceeds the maximum message size of {MIB}" in message
