"""The extended query protocol through the proxy, message by message.

Most cases drive the protocol with a small raw client written here, so that
each test controls where the Syncs go and receives every message.
The same batches run against the server directly, and the proxy must answer
with the same sequence of message types.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_extended_" + "Xy7" * 20

INSERT = "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) VALUES ($1, $2, $3)"
SELECT_TOKENS = (
    "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY id"
)


# A raw protocol client: startup, SCRAM-SHA-256 and message codecs.


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def parse(statement: str, sql: str) -> bytes:
    return _message(b"P", _cstr(statement) + _cstr(sql) + b"\0\0")


def bind(
    portal: str,
    statement: str,
    params: tuple[str | None, ...] = (),
    binary: bool = False,
) -> bytes:
    body = [_cstr(portal), _cstr(statement), b"\0\0", struct.pack("!H", len(params))]
    for value in params:
        if value is None:
            body.append(struct.pack("!i", -1))
        else:
            data = value.encode()
            body.append(struct.pack("!i", len(data)) + data)
    # One result format code applies to every column.
    body.append(struct.pack("!Hh", 1, 1 if binary else 0))
    return _message(b"B", b"".join(body))


def describe(kind: str, name: str) -> bytes:
    return _message(b"D", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _message(b"E", _cstr(portal) + struct.pack("!i", max_rows))


def close(kind: str, name: str) -> bytes:
    return _message(b"C", kind.encode() + _cstr(name))


def query(sql: str) -> bytes:
    return _message(b"Q", _cstr(sql))


SYNC = _message(b"S", b"")


@dataclass(frozen=True)
class Reply:
    """One server message: its type letter and payload."""

    kind: str
    payload: bytes

    def row(self) -> list[str | None]:
        (count,) = struct.unpack_from("!H", self.payload)
        values: list[str | None] = []
        pos = 2
        for _ in range(count):
            (size,) = struct.unpack_from("!i", self.payload, pos)
            pos += 4
            if size < 0:
                values.append(None)
            else:
                values.append(self.payload[pos : pos + size].decode())
                pos += size
        return values

    def error_fields(self) -> dict[str, str]:
        fields = {}
        for part in self.payload.rstrip(b"\0").split(b"\0"):
            fields[chr(part[0])] = part[1:].decode()
        return fields


class RawClient:
    """A v3 protocol client that sends prepared bytes and reads every reply."""

    def __init__(self, host: str, port: int, user: str, password: str, database: str):
        self._sock = socket.create_connection((host, port), timeout=20)
        params = _cstr("user") + _cstr(user) + _cstr("database") + _cstr(database)
        startup = struct.pack("!I", 196608) + params + b"\0"
        self._sock.sendall(struct.pack("!I", len(startup) + 4) + startup)
        self._authenticate(password)
        self.read_until_ready()

    def close(self) -> None:
        self._sock.sendall(_message(b"X", b""))
        self._sock.close()

    def send(self, *messages: bytes) -> None:
        self._sock.sendall(b"".join(messages))

    def read(self) -> Reply:
        header = self._exactly(5)
        (length,) = struct.unpack("!I", header[1:])
        return Reply(chr(header[0]), self._exactly(length - 4))

    def read_until_ready(self) -> list[Reply]:
        replies = []
        while True:
            reply = self.read()
            if reply.kind in ("N", "S"):
                continue
            replies.append(reply)
            if reply.kind == "Z":
                return replies

    def run(self, *messages: bytes, syncs: int = 1) -> list[Reply]:
        """Send a batch and read the replies up to its `syncs` ReadyForQuery."""
        self.send(*messages)
        replies = []
        for _ in range(syncs):
            replies.extend(self.read_until_ready())
        return replies

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    def _authenticate(self, password: str) -> None:
        reply = self.read()
        assert reply.kind == "R"
        (code,) = struct.unpack_from("!I", reply.payload)
        assert code == 10, f"expected SASL authentication, got code {code}"
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first_bare = f"n=,r={nonce}"
        first = ("n,," + first_bare).encode()
        self.send(
            _message(
                b"p", _cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first
            )
        )

        reply = self.read()
        server_first = reply.payload[4:].decode()
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        final_bare = f"c=biws,r={attrs['r']}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.digest(
            hashlib.sha256(client_key).digest(), auth_message, "sha256"
        )
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        final = f"{final_bare},p={base64.b64encode(proof).decode()}"
        self.send(_message(b"p", final.encode()))

        for expected in (12, 0):
            reply = self.read()
            assert reply.kind == "R", (
                reply.error_fields() if reply.kind == "E" else reply
            )
            assert struct.unpack_from("!I", reply.payload)[0] == expected


def kinds(replies: list[Reply]) -> str:
    return "".join(reply.kind for reply in replies)


def rows(replies: list[Reply]) -> list[list[str | None]]:
    return [reply.row() for reply in replies if reply.kind == "D"]


def errors(replies: list[Reply]) -> list[str]:
    return [reply.error_fields()["C"] for reply in replies if reply.kind == "E"]


def status(replies: list[Reply]) -> str:
    assert replies[-1].kind == "Z"
    return replies[-1].payload.decode()


@pytest.fixture
def through_proxy(oauth_proxy: RunningProxy) -> Iterator[RawClient]:
    server = oauth_proxy.server
    client = RawClient(
        "127.0.0.1",
        oauth_proxy.port,
        server.superuser,
        server.password,
        oauth_proxy.database,
    )
    yield client
    client.close()


@pytest.fixture
def direct(oauth_proxy: RunningProxy) -> Iterator[RawClient]:
    server = oauth_proxy.server
    client = RawClient(
        server.host,
        server.port,
        server.superuser,
        server.password,
        oauth_proxy.database,
    )
    yield client
    client.close()


def _stored(proxy: RunningProxy) -> list[tuple[int, str | None, str | None]]:
    return proxy.direct(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY id"
    )


# Cases


def test_pipeline_many_statements_one_sync(oauth_proxy: RunningProxy) -> None:
    tokens = [f"{TOKEN}-{i}" for i in range(30)]
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            cursors = []
            for i, token in enumerate(tokens):
                conn.execute(
                    INSERT.replace("$1, $2, $3", "%s, %s, %s"), (i, token, token[::-1])
                )
                if i % 10 == 9:
                    cursors.append(conn.execute(SELECT_TOKENS))
        results = [cursor.fetchall() for cursor in cursors]

    expected = [(i, token, token[::-1]) for i, token in enumerate(tokens)]
    assert results[0] == expected[:10]
    assert results[1] == expected[:20]
    assert results[2] == expected
    for (user_id, access, refresh), (_, token, reverse) in zip(
        _stored(oauth_proxy), expected
    ):
        assert_sealed(access, token)
        assert_sealed(refresh, reverse)


def test_pipeline_low_level_prepared(oauth_proxy: RunningProxy) -> None:
    # PGconn.connect() would hold the GIL that the proxy's thread needs.
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        pgconn.nonblocking = 1
        pgconn.enter_pipeline_mode()
        pgconn.send_prepare(b"ins", INSERT.encode())
        pgconn.send_prepare(b"sel", SELECT_TOKENS.encode())
        for i in range(5):
            pgconn.send_query_prepared(
                b"ins", [str(i).encode(), f"{TOKEN}{i}".encode(), None]
            )
        pgconn.send_describe_prepared(b"sel")
        pgconn.send_query_prepared(b"sel", [], result_format=1)
        pgconn.pipeline_sync()
        results = _drain_pipeline(pgconn)
        pgconn.exit_pipeline_mode()

    selected = results[-1]
    assert selected.status == psycopg.pq.ExecStatus.TUPLES_OK
    assert selected.ntuples == 5
    for i in range(5):
        assert selected.get_value(i, 1) == f"{TOKEN}{i}".encode()
        assert selected.get_value(i, 2) is None
    for user_id, access, refresh in _stored(oauth_proxy):
        assert_sealed(access, f"{TOKEN}{user_id}")
        assert refresh is None


def _drain_pipeline(pgconn: psycopg.pq.PGconn) -> list[psycopg.pq.PGresult]:
    """Read results up to the pipeline's Sync; fail on any error result."""
    import select

    results = []
    for _ in range(1000):
        assert pgconn.status == psycopg.pq.ConnStatus.OK, pgconn.get_error_message()
        pgconn.flush()
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [], 10)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            continue
        if result.status == psycopg.pq.ExecStatus.PIPELINE_SYNC:
            return results
        assert result.status != psycopg.pq.ExecStatus.FATAL_ERROR, result.error_message
        results.append(result)
    raise AssertionError("the pipeline's Sync never arrived")


# The server folds 1 / 0 while planning, so it fails at Bind; the second
# division fails only when the portal runs.
FAILS_AT_BIND = "SELECT 1 / 0"
FAILS_AT_EXECUTE = "SELECT 1 / (random() * 0)::int"


def _error_batch(failing: str = FAILS_AT_EXECUTE) -> list[bytes]:
    return [
        parse("", INSERT),
        bind("", "", ("1", TOKEN + "-first", None)),
        execute(),
        parse("", failing),
        bind("", ""),
        execute(),
        parse("", INSERT),
        bind("", "", ("2", TOKEN + "-skipped", None)),
        execute(),
        SYNC,
    ]


@pytest.mark.parametrize(
    ("failing", "sequence"),
    [(FAILS_AT_BIND, "12C1EZ"), (FAILS_AT_EXECUTE, "12C12EZ")],
    ids=["bind", "execute"],
)
def test_error_mid_pipeline_matches_server(
    oauth_proxy: RunningProxy,
    through_proxy: RawClient,
    direct: RawClient,
    failing: str,
    sequence: str,
) -> None:
    expected = direct.run(*_error_batch(failing))
    replies = through_proxy.run(*_error_batch(failing))

    assert kinds(replies) == kinds(expected) == sequence
    assert errors(replies) == ["22012"]
    assert status(replies) == "I"
    # The implicit transaction rolled back the first insert too.
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


def test_statement_after_pipeline_error_sealed(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    through_proxy.run(*_error_batch())
    replies = through_proxy.run(
        parse("", INSERT),
        bind("", "", ("3", TOKEN + "-after", "refresh-after")),
        execute(),
        parse("", SELECT_TOKENS),
        bind("", ""),
        execute(),
        SYNC,
    )

    assert kinds(replies) == "12C12DCZ"
    assert rows(replies) == [["3", TOKEN + "-after", "refresh-after"]]
    ((_, access, refresh),) = _stored(oauth_proxy)
    assert_sealed(access, TOKEN + "-after")
    assert_sealed(refresh, "refresh-after")


def test_error_before_sync_arrives(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    # The error comes back while the rest of the batch is still unsent, so
    # the proxy receives the skipped messages only after the error.
    through_proxy.send(
        parse("", FAILS_AT_EXECUTE), bind("", ""), execute(), _message(b"H", b"")
    )
    assert through_proxy.read().kind == "1"
    assert through_proxy.read().kind == "2"
    assert through_proxy.read().kind == "E"
    replies = through_proxy.run(
        parse("", INSERT), bind("", "", ("4", "skipped-token", None)), execute(), SYNC
    )
    assert kinds(replies) == "Z"

    replies = through_proxy.run(
        parse("", INSERT), bind("", "", ("5", TOKEN, None)), execute(), SYNC
    )
    assert kinds(replies) == "12CZ"
    replies = through_proxy.run(
        parse("", SELECT_TOKENS), bind("", ""), describe("P", ""), execute(), SYNC
    )
    assert kinds(replies) == "12TDCZ"
    assert rows(replies) == [["5", TOKEN, None]]
    ((user_id, access, _),) = _stored(oauth_proxy)
    assert user_id == 5
    assert_sealed(access, TOKEN)


def test_unnamed_statement_reparsed_in_batch(
    oauth_proxy: RunningProxy, through_proxy: RawClient, direct: RawClient
) -> None:
    batch = [
        parse("", INSERT),
        bind("", "", ("1", "access-one", "refresh-one")),
        execute(),
        parse("", "INSERT INTO oauth_tokens (refresh_token, user_id) VALUES ($1, $2)"),
        bind("", "", ("refresh-two", "2")),
        execute(),
        parse("", "SELECT refresh_token, user_id FROM oauth_tokens ORDER BY id"),
        bind("", ""),
        execute(),
        parse("", "SELECT user_id, access_token FROM oauth_tokens ORDER BY id"),
        bind("", "", binary=True),
        describe("P", ""),
        execute(),
        parse("", "SELECT provider, access_token FROM oauth_tokens ORDER BY id"),
        bind("", ""),
        execute(),
        SYNC,
    ]
    replies = through_proxy.run(*batch)

    assert kinds(replies) == "12C12C12DDC12TDDC12DDCZ"
    selected = rows(replies)
    assert selected[0:2] == [["refresh-one", "1"], ["refresh-two", "2"]]
    # Binary format: user_id arrives as 4 raw bytes, the token as its text.
    assert selected[3][1] is None
    assert selected[2][1] == "access-one"
    assert selected[4:6] == [["github", "access-one"], ["github", None]]
    stored = _stored(oauth_proxy)
    assert_sealed(stored[0][1], "access-one")
    assert_sealed(stored[0][2], "refresh-one")
    assert_sealed(stored[1][2], "refresh-two")
    assert stored[1][1] is None

    # The select-only part of the batch gets the same message types directly.
    select_only = batch[6:]
    assert kinds(through_proxy.run(*select_only)) == kinds(direct.run(*select_only))


def test_named_statement_closed_and_reparsed(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    replies = through_proxy.run(
        parse("ins", INSERT),
        parse("sel", "SELECT access_token, user_id FROM oauth_tokens ORDER BY id"),
        describe("S", "sel"),
        SYNC,
    )
    assert kinds(replies) == "11tTZ"
    through_proxy.run(
        bind("", "ins", ("1", "first-access", "first-refresh")), execute(), SYNC
    )
    replies = through_proxy.run(bind("", "sel"), execute(), SYNC)
    assert rows(replies) == [["first-access", "1"]]

    # Same names, new SQL: parameters and result columns move.
    replies = through_proxy.run(
        close("S", "ins"),
        close("S", "sel"),
        parse(
            "ins", "INSERT INTO oauth_tokens (refresh_token, user_id) VALUES ($1, $2)"
        ),
        parse("sel", "SELECT user_id, refresh_token FROM oauth_tokens ORDER BY id"),
        describe("S", "sel"),
        SYNC,
    )
    assert kinds(replies) == "3311tTZ"
    replies = through_proxy.run(
        bind("", "ins", ("second-refresh", "2")),
        execute(),
        bind("", "sel"),
        execute(),
        SYNC,
    )

    assert kinds(replies) == "2C2DDCZ"
    assert rows(replies) == [["1", "first-refresh"], ["2", "second-refresh"]]
    stored = _stored(oauth_proxy)
    assert stored[1][0] == 2
    assert_sealed(stored[1][2], "second-refresh")


def test_skipped_close_and_parse_keep_old_statement(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    through_proxy.run(parse("ins", INSERT), SYNC)
    # The division fails, so the server skips the Close and the Parse: "ins"
    # is still the old INSERT, and its parameter $2 must still be sealed.
    replies = through_proxy.run(
        parse("", FAILS_AT_EXECUTE),
        bind("", ""),
        execute(),
        close("S", "ins"),
        parse("ins", "SELECT $1::int, $2, $3"),
        SYNC,
    )
    assert kinds(replies) == "12EZ"

    replies = through_proxy.run(
        bind("", "ins", ("7", TOKEN, "refresh")), execute(), SYNC
    )

    assert kinds(replies) == "2CZ"
    ((user_id, access, refresh),) = _stored(oauth_proxy)
    assert user_id == 7
    assert_sealed(access, TOKEN)
    assert_sealed(refresh, "refresh")


def test_skipped_unnamed_parse_keeps_statement(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    # The NULL user_id fails the INSERT at Execute, after its Parse took
    # effect. The server skips the second Parse, so the unnamed statement
    # is still the INSERT.
    replies = through_proxy.run(
        parse("", INSERT),
        bind("", "", (None, "failed-insert", None)),
        execute(),
        parse("", "SELECT $1::int, $2, $3"),
        SYNC,
    )
    assert kinds(replies) == "12EZ"
    assert errors(replies) == ["23502"]

    replies = through_proxy.run(bind("", "", ("8", TOKEN, None)), execute(), SYNC)

    assert kinds(replies) == "2CZ"
    ((user_id, access, _),) = _stored(oauth_proxy)
    assert user_id == 8
    assert_sealed(access, TOKEN)


def test_failed_unnamed_parse_drops_statement(
    through_proxy: RawClient, direct: RawClient
) -> None:
    batch = [parse("", INSERT), SYNC]
    failing = [parse("", "SELEC 1"), SYNC]
    reuse = [bind("", "", ("1", TOKEN, None)), execute(), SYNC]
    replies = through_proxy.run(*batch) + through_proxy.run(*failing)
    replies += through_proxy.run(*reuse)
    expected = direct.run(*batch) + direct.run(*failing) + direct.run(*reuse)

    assert kinds(replies) == kinds(expected) == "1ZEZEZ"
    assert errors(replies) == errors(expected) == ["42601", "26000"]


REJECTED = "SELECT * FROM oauth_tokens WHERE access_token = $1"


def test_rejected_statement_fails_transaction(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    assert status(through_proxy.run(query("BEGIN"))) == "T"
    through_proxy.run(
        parse("", INSERT), bind("", "", ("1", "in-transaction", None)), execute(), SYNC
    )

    replies = through_proxy.run(
        parse("", REJECTED), bind("", "", ("x",)), execute(), SYNC
    )
    assert kinds(replies) == "EZ"
    assert errors(replies) == ["0A000"]
    assert "access_token" in replies[0].error_fields()["M"]
    assert status(replies) == "E"

    replies = through_proxy.run(parse("", SELECT_TOKENS), bind("", ""), execute(), SYNC)
    assert errors(replies) == ["25P02"]
    assert status(replies) == "E"

    assert status(through_proxy.run(query("ROLLBACK"))) == "I"
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]

    replies = through_proxy.run(
        parse("", INSERT),
        bind("", "", ("2", "after-rollback", None)),
        execute(),
        parse("", SELECT_TOKENS),
        bind("", ""),
        execute(),
        SYNC,
    )
    assert rows(replies) == [["2", "after-rollback", None]]
    ((_, access, _),) = _stored(oauth_proxy)
    assert_sealed(access, "after-rollback")


def test_rejected_simple_query_fails_transaction(through_proxy: RawClient) -> None:
    assert status(through_proxy.run(query("BEGIN"))) == "T"

    replies = through_proxy.run(
        query("SELECT id FROM oauth_tokens ORDER BY access_token")
    )
    assert kinds(replies) == "EZ"
    assert errors(replies) == ["0A000"]
    assert status(replies) == "E"

    replies = through_proxy.run(query("SELECT 1"))
    assert errors(replies) == ["25P02"]
    assert status(through_proxy.run(query("ROLLBACK"))) == "I"


def test_rejected_statement_mid_batch(
    oauth_proxy: RunningProxy, through_proxy: RawClient, direct: RawClient
) -> None:
    batch = [
        parse("", INSERT),
        bind("", "", ("1", "before-rejected", None)),
        execute(),
        parse("", REJECTED),
        bind("", "", ("x",)),
        execute(),
        parse("", INSERT),
        bind("", "", ("2", "after-rejected", None)),
        execute(),
        SYNC,
    ]
    replies = through_proxy.run(*batch)
    # The server replies the same way to a statement that it cannot parse.
    server_batch = batch[:3] + [parse("", "SELEC 1")] + batch[4:]
    expected = direct.run(*server_batch)

    assert kinds(replies) == kinds(expected) == "12CEZ"
    assert errors(replies) == ["0A000"]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


def _fill(client: RawClient, count: int) -> list[str]:
    tokens = [f"{TOKEN}-row{i}" for i in range(count)]
    messages = [parse("ins", INSERT)]
    for i, token in enumerate(tokens):
        messages += [bind("", "ins", (str(i), token, f"r{i}")), execute()]
    client.run(*messages, SYNC)
    return tokens


def test_execute_row_limit_portal_suspended(
    oauth_proxy: RunningProxy, through_proxy: RawClient, direct: RawClient
) -> None:
    tokens = _fill(through_proxy, 5)
    batch = [
        query("BEGIN"),
        parse("", SELECT_TOKENS),
        bind("cur", ""),
        execute("cur", 2),
        execute("cur", 2),
        SYNC,
    ]
    replies = through_proxy.run(*batch, syncs=2)
    more = through_proxy.run(execute("cur", 2), execute("cur", 2), SYNC)
    through_proxy.run(query("COMMIT"))

    # Without any Describe from the client, no RowDescription reaches it.
    assert kinds(replies) == "CZ12DDsDDsZ"
    assert kinds(more) == "DCCZ"
    fetched = rows(replies) + rows(more)
    assert fetched == [[str(i), token, f"r{i}"] for i, token in enumerate(tokens)]
    expected = direct.run(*batch, syncs=2)
    expected_more = direct.run(execute("cur", 2), execute("cur", 2), SYNC)
    direct.run(query("COMMIT"))
    assert kinds(expected) + kinds(expected_more) == kinds(replies) + kinds(more)
    for (_, access, _), token in zip(_stored(oauth_proxy), tokens):
        assert_sealed(access, token)


def test_execute_row_limit_binary_described(through_proxy: RawClient) -> None:
    tokens = _fill(through_proxy, 3)
    replies = through_proxy.run(
        query("BEGIN"),
        parse("sel", "SELECT access_token FROM oauth_tokens ORDER BY id"),
        bind("cur", "sel", binary=True),
        describe("P", "cur"),
        execute("cur", 1),
        execute("cur", 1),
        execute("cur", 0),
        SYNC,
        query("COMMIT"),
        syncs=3,
    )

    assert kinds(replies) == "CZ12TDsDsDCZCZ"
    assert rows(replies) == [[token] for token in tokens]


def test_portal_name_rebound_after_commit(through_proxy: RawClient) -> None:
    _fill(through_proxy, 2)
    # "cur" first names a portal of plain columns; after COMMIT the same name
    # is bound again to a sealed column, without a Describe from the client.
    through_proxy.run(
        query("BEGIN"),
        bind("cur", "ins", ("9", "plain-portal", None)),
        execute("cur"),
        SYNC,
        query("COMMIT"),
        syncs=3,
    )
    replies = through_proxy.run(
        query("BEGIN"),
        parse("", "SELECT access_token FROM oauth_tokens ORDER BY id"),
        bind("cur", ""),
        execute("cur", 10),
        SYNC,
        query("COMMIT"),
        syncs=3,
    )
    assert rows(replies) == [[f"{TOKEN}-row0"], [f"{TOKEN}-row1"], ["plain-portal"]]


# Randomized literals in statements executed many times

INSERT_LITERAL = (
    "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
    "VALUES ($1, 'literal-access-token', 'literal-refresh')"
)


def test_statement_literal_described_as_server_does(
    through_proxy: RawClient, direct: RawClient
) -> None:
    batch = (parse("lit", INSERT_LITERAL), describe("S", "lit"), SYNC)
    replies = through_proxy.run(*batch)
    expected = direct.run(*batch)

    # ParameterDescription lists only the client's $1, not the parameters
    # that carry the sealed literals.
    assert kinds(replies) == kinds(expected) == "1tnZ"
    assert replies[1].payload == expected[1].payload
    assert struct.unpack("!Hi", replies[1].payload) == (1, 23)


def test_statement_literal_fresh_seal_per_execute(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    messages = [parse("lit", INSERT_LITERAL)]
    for user_id in range(3):
        messages += [bind("", "lit", (str(user_id),)), execute()]
    replies = through_proxy.run(*messages, SYNC)
    assert kinds(replies) == "12C2C2CZ"

    replies = through_proxy.run(parse("", SELECT_TOKENS), bind("", ""), execute(), SYNC)
    assert rows(replies) == [
        [str(i), "literal-access-token", "literal-refresh"] for i in range(3)
    ]
    stored = _stored(oauth_proxy)
    for _, access, refresh in stored:
        assert_sealed(access, "literal-access-token")
        assert_sealed(refresh, "literal-refresh")
    assert len({access for _, access, _ in stored}) == 3
    assert len({refresh for _, _, refresh in stored}) == 3


def test_statement_literal_wrong_parameter_count(
    oauth_proxy: RunningProxy, through_proxy: RawClient, direct: RawClient
) -> None:
    batch = (parse("lit", INSERT_LITERAL), bind("", "lit", ("1", "2")), execute(), SYNC)
    replies = through_proxy.run(*batch)
    expected = direct.run(*batch)

    assert kinds(replies) == kinds(expected) == "1EZ"
    assert errors(replies) == errors(expected) == ["08P01"]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


def test_statement_typed_literal_rejected(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    # `text 'value'` takes only a string constant, so the literal cannot
    # become a parameter; the simple query protocol still seals it.
    sql = "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, text 'typed')"
    replies = through_proxy.run(
        parse("typed", sql), bind("", "typed", ("1",)), execute(), SYNC
    )

    assert kinds(replies) == "EZ"
    assert errors(replies) == ["0A000"]
    assert "oauth_tokens.access_token" in replies[0].error_fields()["M"]
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]

    replies = through_proxy.run(query(sql.replace("$1", "1")))
    assert errors(replies) == []
    ((_, access, _),) = _stored(oauth_proxy)
    assert_sealed(access, "typed")


def test_sql_prepare_literal_in_parse(
    oauth_proxy: RunningProxy, through_proxy: RawClient
) -> None:
    # $1 inside PREPARE names the PREPARE's own parameter, so its literal is
    # sealed at Parse, as in a simple query.
    replies = through_proxy.run(
        parse(
            "",
            "PREPARE add_token(int) AS INSERT INTO oauth_tokens "
            "(user_id, access_token) VALUES ($1, 'prepared-literal')",
        ),
        bind("", ""),
        execute(),
        SYNC,
    )
    assert kinds(replies) == "12CZ"
    replies = through_proxy.run(query("EXECUTE add_token(1)"))
    assert errors(replies) == []

    replies = through_proxy.run(parse("", SELECT_TOKENS), bind("", ""), execute(), SYNC)
    assert rows(replies) == [["1", "prepared-literal", None]]
    ((_, access, _),) = _stored(oauth_proxy)
    assert_sealed(access, "prepared-literal")
