"""Session without a server: client and server messages in, bytes out.

A fake planner seals by prefixing "sealed:" and treats every column of the
table with OID 9000 as encrypted, so each test reads what was sealed or
opened straight from the output bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from proxy.errors import DecryptionError, KeyringError, ProtocolError, StatementRejected
from proxy.lookups import KeyVersions, SealedStatement
from proxy.rules import Encryption
from proxy.sql.analyze import EMPTY_PLAN, SearchValue, StatementPlan
from proxy.sql.literals import LiteralSlot
from proxy.wire import messages as m
from proxy.wire.frames import Frame, FrameReader, build
from proxy.wire.session import Output, Session

SEALED_TABLE = 9000
PREFIX = b"sealed:"

INSERT = "INSERT INTO tokens (secret) VALUES ($1)"
INSERT_LITERAL = "INSERT INTO tokens (secret) VALUES ('x')"
# A literal bound for a randomized column, after the client's parameter $1.
INSERT_NOTE = "INSERT INTO notes (user_id, body) VALUES ($1, 'x')"
REJECTED = "SELECT * FROM tokens WHERE secret = $1"


class TextType:
    name = "text"
    oid = 25
    size = -1

    def from_wire(self, value: bytes, fmt: int, declared_oid: int = 0) -> bytes:
        return value


class FakeRule:
    def __init__(self, encryption: Encryption) -> None:
        self.encryption = encryption


class FakeColumn:
    """An encrypted text column whose logical type is text too."""

    logical = TextType()
    retyped = False
    storage_oid = 25

    def __init__(self, identity: str, encryption: Encryption) -> None:
        self.identity = identity
        self.rule = FakeRule(encryption)


COLUMN = FakeColumn("public.tokens.secret", Encryption.DETERMINISTIC)
NOTE_COLUMN = FakeColumn("public.notes.body", Encryption.RANDOMIZED)


def _literal(sql: str, column: FakeColumn) -> LiteralSlot:
    start = sql.index("'x'")
    return LiteralSlot(start, start + 3, "x", column)  # type: ignore[arg-type]


class FakePlanner:
    """Plan by statement text, and seal or open values with a visible prefix."""

    def statement(
        self, sql: str, search_path: tuple[str, ...] | None = None
    ) -> StatementPlan:
        if sql == REJECTED:
            raise StatementRejected(
                "0A000", f"column {COLUMN.identity} is encrypted", "hint"
            )
        if sql == INSERT:
            return StatementPlan(params={1: COLUMN})  # type: ignore[dict-item]
        if sql.startswith(INSERT_LITERAL[:-5]):
            return StatementPlan(literals=(_literal(sql, COLUMN),))
        if sql == INSERT_NOTE:
            return StatementPlan(literals=(_literal(sql, NOTE_COLUMN),))
        return EMPTY_PLAN

    def seal_statement(
        self, sql: str, plan: StatementPlan, encoding: str = "utf-8"
    ) -> SealedStatement:
        if "nokey" in sql:
            raise KeyringError(f"no data key is loaded for column {COLUMN.identity}")
        return SealedStatement(sql.replace("'x'", "'sealed:x'"))

    def key_versions(self, names: tuple[str, ...]) -> KeyVersions:
        return ()

    def seal_param_versions(
        self, column: Any, value: bytes, fmt: int, declared_oid: int = 0, settings: Any = None
    ) -> bytes:
        raise AssertionError("no test seals under several versions")

    def seal_param(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        associated: tuple[bytes | None, ...] = (),
        subject: Any = None,
        settings: Any = None,
    ) -> bytes:
        if value == b"nokey":
            raise KeyringError(f"no data key is loaded for column {column.identity}")
        return PREFIX + value

    def seal_array_param(
        self, column: Any, value: bytes, fmt: int, declared_oid: int = 0, settings: Any = None
    ) -> bytes:
        raise AssertionError("no test binds an array")

    def seal_lookup_array(
        self, column: Any, value: bytes, fmt: int, declared_oid: int = 0, settings: Any = None
    ) -> bytes:
        raise AssertionError("no test binds an array")

    def row_plan(
        self,
        fields: tuple[m.Field, ...],
        outputs: tuple[Any, ...] | None = None,
        formats: tuple[int, ...] = (),
        associations: dict[int, tuple[int, ...]] | None = None,
    ) -> tuple[tuple[int, object, int, object], ...] | None:
        plan = [
            (index, (COLUMN,), m.format_code(formats, index) if formats else field.format, ())
            for index, field in enumerate(fields)
            if field.table_oid == SEALED_TABLE
        ]
        return tuple(plan) or None

    def open_value(self, column: Any, value: bytes, fmt: int, associated: Any = ()) -> bytes:
        if not value.startswith(PREFIX):
            raise DecryptionError()
        return value[len(PREFIX) :]


# Message builders


def parse(statement: str, sql: str) -> bytes:
    return m.Parse(statement, sql, ()).encode()


def bind(portal: str, statement: str, *params: bytes | None) -> bytes:
    return m.Bind(portal, statement, (), tuple(params), ()).encode()


def describe(kind: str, name: str) -> bytes:
    return m.encode_describe(kind, name)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return build(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(kind: str, name: str) -> bytes:
    return build(b"C", kind.encode() + name.encode() + b"\0")


SYNC = build(b"S", b"")


def row_description(*columns: tuple[str, int]) -> bytes:
    """RowDescription of text columns given as (name, table OID)."""
    body = [struct.pack("!H", len(columns))]
    for attnum, (name, table_oid) in enumerate(columns, start=1):
        body.append(name.encode() + b"\0")
        body.append(struct.pack("!IhIhih", table_oid, attnum, 25, -1, -1, 0))
    return build(b"T", b"".join(body))


def data_row(*values: bytes | None) -> bytes:
    return m.encode_data_row(list(values))


def ready(status: str = "I") -> bytes:
    return build(b"Z", status.encode())


def error(sqlstate: str) -> bytes:
    return m.encode_error(sqlstate, "server error")


PARSE_COMPLETE = build(b"1", b"")
BIND_COMPLETE = build(b"2", b"")
CLOSE_COMPLETE = build(b"3", b"")
NO_DATA = build(b"n", b"")
SECRET_ROW = row_description(("secret", SEALED_TABLE), ("id", 0))


def frames(*messages: bytes) -> list[Frame]:
    return FrameReader().feed(b"".join(messages))


def from_client(session: Session, *messages: bytes) -> Output:
    return session.from_client(frames(*messages))


def from_server(session: Session, *messages: bytes) -> Output:
    return session.from_server(frames(*messages))


def types(data: list[bytes]) -> str:
    return "".join(chr(frame.type) for frame in frames(*data))


def sent_bind(out: Output) -> m.Bind:
    (frame,) = [f for f in frames(*out.to_server) if f.type == ord("B")]
    return m.Bind.decode(frame.payload)


def client_rows(out: Output) -> list[list[bytes | None]]:
    rows = [f for f in frames(*out.to_client) if f.type == ord("D")]
    return [m.decode_data_row(f.payload) for f in rows]


def error_severity(out: Output) -> str:
    (frame,) = [f for f in frames(*out.to_client) if f.type == ord("E")]
    return m.decode_error_fields(frame.payload)["S"]


def error_code(out: Output) -> str:
    (frame,) = [f for f in frames(*out.to_client) if f.type == ord("E")]
    return m.decode_error_fields(frame.payload)["C"]


@pytest.fixture
def session() -> Session:
    return Session(FakePlanner(), "test")


def _define(session: Session, name: str, sql: str) -> None:
    """Parse a statement and let the server accept it."""
    from_client(session, parse(name, sql), SYNC)
    from_server(session, PARSE_COMPLETE, ready())


# Client to server


def test_bind_seals_parameter(session: Session) -> None:
    out = from_client(
        session, parse("", INSERT), bind("", "", b"tok", None), execute(), SYNC
    )

    assert sent_bind(out).params == (b"sealed:tok", None)
    # The INSERT was never described, so the session sends its own Describe.
    assert types(out.to_server) == "PBDES"


def test_untouched_messages_keep_original_bytes(session: Session) -> None:
    messages = [
        parse("s", "SELECT 1"),
        bind("", "s", b"1"),
        describe("P", ""),
        execute(),
        SYNC,
    ]
    out = from_client(session, *messages)

    assert out.to_server == messages


def test_no_planner_forwards_everything(session: Session) -> None:
    plain = Session(None)
    messages = [parse("", INSERT), bind("", "", b"tok"), execute(), SYNC]

    assert plain.from_client(frames(*messages)).to_server == messages
    reply = [PARSE_COMPLETE, SECRET_ROW, data_row(b"tok", b"1"), ready()]
    assert plain.from_server(frames(*reply)).to_client == reply


def test_literal_sealed_in_parse(session: Session) -> None:
    out = from_client(session, parse("", INSERT_LITERAL), SYNC)

    (frame, _) = frames(*out.to_server)
    assert m.Parse.decode(frame.payload).query == INSERT_LITERAL.replace(
        "'x'", "'sealed:x'"
    )


def test_randomized_literal_becomes_parameter(session: Session) -> None:
    out = from_client(session, parse("s", INSERT_NOTE), SYNC)

    (frame, _) = frames(*out.to_server)
    sent = m.Parse.decode(frame.payload)
    assert sent.query == INSERT_NOTE.replace("'x'", "$2")
    assert sent.param_types == (0, 25)


def test_hidden_parameter_sealed_at_each_bind(session: Session) -> None:
    _define(session, "s", INSERT_NOTE)

    for _ in range(2):
        out = from_client(
            session,
            m.Bind("", "s", (1,), (b"\0\0\0\7",), ()).encode(),
            execute(),
            SYNC,
        )
        sent = sent_bind(out)
        assert sent.params == (b"\0\0\0\7", b"sealed:x")
        assert sent.param_formats == (1, 0)


def test_hidden_parameter_not_described(session: Session) -> None:
    from_client(session, parse("s", INSERT_NOTE), describe("S", "s"), SYNC)

    reply = from_server(
        session,
        PARSE_COMPLETE,
        m.encode_parameter_description((23, 25)),
        NO_DATA,
        ready(),
    )

    (_, frame, _, _) = frames(*reply.to_client)
    assert m.decode_parameter_description(frame.payload) == (23,)


def test_literal_sealed_in_query(session: Session) -> None:
    out = from_client(session, build(b"Q", INSERT_LITERAL.encode() + b"\0"))

    (frame,) = frames(*out.to_server)
    assert m.decode_query(frame.payload) == INSERT_LITERAL.replace("'x'", "'sealed:x'")


def test_client_describe_portal_avoids_hidden_describe(session: Session) -> None:
    out = from_client(
        session, parse("", "SELECT 1"), bind("", ""), describe("P", ""), execute(), SYNC
    )

    assert types(out.to_server) == "PBDES"


def test_described_statement_avoids_hidden_describe(session: Session) -> None:
    from_client(
        session, parse("s", "SELECT secret FROM tokens"), describe("S", "s"), SYNC
    )
    from_server(session, PARSE_COMPLETE, build(b"t", b"\0\0"), SECRET_ROW, ready())

    out = from_client(session, bind("", "s"), execute(), SYNC)
    assert types(out.to_server) == "BES"
    reply = from_server(session, BIND_COMPLETE, data_row(b"sealed:tok", b"1"), ready())
    assert client_rows(reply) == [[b"tok", b"1"]]


def test_described_no_data_statement_avoids_hidden_describe(session: Session) -> None:
    from_client(session, parse("s", "CHECKPOINT"), describe("S", "s"), SYNC)
    from_server(session, PARSE_COMPLETE, build(b"t", b"\0\0"), NO_DATA, ready())

    out = from_client(session, bind("", "s"), execute(), SYNC)
    assert types(out.to_server) == "BES"


def test_repeated_execute_one_hidden_describe(session: Session) -> None:
    out = from_client(
        session,
        parse("", "SELECT secret FROM tokens"),
        bind("c", ""),
        execute("c", 1),
        execute("c", 1),
        SYNC,
    )

    assert types(out.to_server) == "PBDEES"


# Server to client


def test_hidden_describe_answer_not_forwarded(session: Session) -> None:
    from_client(
        session,
        parse("", "SELECT secret, id FROM tokens"),
        bind("", ""),
        execute(),
        SYNC,
    )
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        SECRET_ROW,
        data_row(b"sealed:tok", b"1"),
        data_row(None, b"2"),
        build(b"C", b"SELECT 2\0"),
        ready(),
    )

    assert types(reply.to_client) == "12DDCZ"
    assert client_rows(reply) == [[b"tok", b"1"], [None, b"2"]]


def test_hidden_describe_no_data_not_forwarded(session: Session) -> None:
    from_client(session, parse("", INSERT), bind("", "", b"tok"), execute(), SYNC)
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        NO_DATA,
        build(b"C", b"INSERT 0 1\0"),
        ready(),
    )

    assert types(reply.to_client) == "12CZ"


def test_portal_suspended_keeps_row_plan(session: Session) -> None:
    from_client(
        session,
        parse("", "SELECT secret FROM tokens"),
        bind("c", ""),
        execute("c", 1),
        execute("c", 1),
        SYNC,
    )
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_description(("secret", SEALED_TABLE)),
        data_row(b"sealed:a"),
        build(b"s", b""),
        data_row(b"sealed:b"),
        build(b"C", b"SELECT 1\0"),
        ready("T"),
    )

    assert types(reply.to_client) == "12DsDCZ"
    assert client_rows(reply) == [[b"a"], [b"b"]]


def test_simple_query_rows_opened(session: Session) -> None:
    from_client(session, build(b"Q", b"SELECT secret, id FROM tokens\0"))
    reply = from_server(
        session,
        SECRET_ROW,
        data_row(b"sealed:tok", b"1"),
        build(b"C", b"SELECT 1\0"),
        ready(),
    )

    assert client_rows(reply) == [[b"tok", b"1"]]


def test_rows_of_plain_columns_keep_original_bytes(session: Session) -> None:
    from_client(session, build(b"Q", b"SELECT id FROM tokens\0"))
    row = data_row(b"sealed:looks-sealed")
    reply = from_server(session, row_description(("id", 0)), row)

    assert reply.to_client[1] is not row
    assert reply.to_client[1] == row


def test_value_that_fails_to_open_errors(session: Session) -> None:
    from_client(session, build(b"Q", b"SELECT secret, id FROM tokens\0"))
    reply = from_server(
        session,
        SECRET_ROW,
        data_row(b"sealed:tok", b"1"),
        data_row(b"not-sealed", b"2"),
        data_row(b"sealed:late", b"3"),
        build(b"C", b"SELECT 3\0"),
        ready(),
    )

    assert not reply.close
    assert types(reply.to_client) == "TDEZ"
    assert client_rows(reply) == [[b"tok", b"1"]]
    assert error_code(reply) == "XX001"
    assert error_severity(reply) == "ERROR"
    assert reply.to_server == []


def test_failed_value_aborts_transaction_block(session: Session) -> None:
    from_client(session, build(b"Q", b"SELECT secret, id FROM tokens\0"))
    reply = from_server(
        session, SECRET_ROW, data_row(b"not-sealed", b"1"), build(b"C", b"SELECT 1\0"),
        ready("T"),
    )

    assert types(reply.to_client) == "TE"
    assert types(reply.to_server) == "Q"
    # The server's transaction fails as the client now expects.
    reply = from_server(session, error("42601"), ready("E"))
    assert reply.to_client == [ready("E")]
    assert session.transaction_status == "E"

    reply = from_server(session, build(b"C", b"SELECT 1\0"))
    assert types(reply.to_client) == "C"


def test_failed_value_before_write_closes(session: Session) -> None:
    from_client(
        session, build(b"Q", b"SELECT secret, id FROM tokens; DELETE FROM tokens\0")
    )
    reply = from_server(
        session,
        SECRET_ROW,
        data_row(b"not-sealed", b"1"),
        build(b"C", b"SELECT 1\0"),
        build(b"C", b"DELETE 1\0"),
        ready(),
    )

    assert reply.close
    assert types(reply.to_client) == "TE"
    assert error_severity(reply) == "FATAL"


def test_failed_value_with_pipelined_batch_closes(session: Session) -> None:
    query = "SELECT secret, id FROM tokens"
    from_client(session, parse("", query), bind("", ""), describe("P", ""), execute(), SYNC)
    from_client(session, parse("", query), bind("", ""), describe("P", ""), execute(), SYNC)
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        SECRET_ROW,
        data_row(b"not-sealed", b"1"),
        build(b"C", b"SELECT 1\0"),
        ready(),
    )

    assert reply.close
    assert error_severity(reply) == "FATAL"


def test_short_data_row_raises(session: Session) -> None:
    from_client(session, build(b"Q", b"SELECT id, secret FROM tokens\0"))
    from_server(session, row_description(("id", 0), ("secret", SEALED_TABLE)))

    with pytest.raises(ProtocolError, match="DataRow has 1 columns"):
        from_server(session, data_row(b"1"))


def test_unexpected_row_description_keeps_queue(session: Session) -> None:
    from_client(
        session, parse("", "SELECT secret FROM tokens"), bind("", ""), describe("P", "")
    )
    from_client(session, execute(), SYNC)
    columns = row_description(("secret", SEALED_TABLE))
    from_server(session, PARSE_COMPLETE, BIND_COMPLETE, columns)

    # Execute never gets a RowDescription; one here must not end the Execute.
    reply = from_server(session, columns, data_row(b"sealed:tok"), ready())
    assert types(reply.to_client) == "TDZ"
    assert client_rows(reply) == [[b"tok"]]


# Errors, undo and skipping


def test_error_at_bind_undoes_portal_not_statement(session: Session) -> None:
    from_client(session, parse("s", INSERT), bind("p", "s", b"tok"), execute("p"), SYNC)
    reply = from_server(session, PARSE_COMPLETE, error("22P02"), ready())

    assert types(reply.to_client) == "1EZ"
    # The Parse had completed, and the server keeps a parsed statement
    # through errors: the next Bind to "s" must still be sealed.
    out = from_client(session, bind("", "s", b"again"), execute(), SYNC)
    assert sent_bind(out).params == (b"sealed:again",)
    assert "p" not in session._portals


def test_error_before_parse_undoes_statement(session: Session) -> None:
    out = from_client(
        session,
        parse("", "SELECT 1 / 0"),
        bind("", ""),
        execute(),
        parse("s", INSERT),
        SYNC,
    )
    assert types(out.to_server) == "PBDEPS"
    from_server(session, PARSE_COMPLETE, error("22012"), ready())

    assert "s" not in session._statements


def test_skipped_close_and_parse_restore_statement(session: Session) -> None:
    _define(session, "s", INSERT)
    from_client(
        session,
        parse("", "SELECT 1 / 0"),
        bind("", ""),
        close("S", "s"),
        parse("s", "SELECT $1"),
        SYNC,
    )
    from_server(session, PARSE_COMPLETE, error("22012"), ready())

    out = from_client(session, bind("", "s", b"tok"), execute(), SYNC)
    assert sent_bind(out).params == (b"sealed:tok",)


def test_duplicate_parse_keeps_old_statement(session: Session) -> None:
    _define(session, "s", INSERT)
    from_client(session, parse("s", "SELECT $1"), SYNC)
    from_server(session, error("42P05"), ready())

    out = from_client(session, bind("", "s", b"tok"), execute(), SYNC)
    assert sent_bind(out).params == (b"sealed:tok",)


def test_failed_unnamed_parse_drops_statement(session: Session) -> None:
    _define(session, "", INSERT)
    from_client(session, parse("", "SELEC 1"), SYNC)
    from_server(session, error("42601"), ready())

    assert "" not in session._statements


def test_skipped_unnamed_parse_keeps_statement(session: Session) -> None:
    _define(session, "", INSERT)
    from_client(session, bind("", "", b"a"), execute(), parse("", "SELECT $1"), SYNC)
    from_server(session, error("23502"), ready())

    out = from_client(session, bind("", "", b"tok"), execute(), SYNC)
    assert sent_bind(out).params == (b"sealed:tok",)


def test_messages_after_error_dropped_until_sync(session: Session) -> None:
    from_client(session, parse("", "SELECT 1 / 0"), bind("", ""), execute())
    reply = from_server(session, PARSE_COMPLETE, BIND_COMPLETE, error("22012"))
    assert types(reply.to_client) == "12E"

    out = from_client(session, parse("", INSERT), bind("", "", b"tok"), execute())
    assert out.to_server == []
    out = from_client(session, SYNC)
    assert out.to_server == [SYNC]
    reply = from_server(session, ready())
    assert types(reply.to_client) == "Z"

    out = from_client(session, parse("", INSERT), bind("", "", b"tok"), execute(), SYNC)
    assert sent_bind(out).params == (b"sealed:tok",)


def test_error_on_sync_keeps_queue(session: Session) -> None:
    # A deferred constraint fails at the commit that Sync runs.
    from_client(session, parse("", INSERT), bind("", "", b"a"), execute(), SYNC)
    from_client(
        session, parse("", "SELECT secret FROM tokens"), bind("", ""), execute(), SYNC
    )
    from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        NO_DATA,
        build(b"C", b"INSERT 0 1\0"),
        error("23505"),
        ready(),
    )
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_description(("secret", SEALED_TABLE)),
        data_row(b"sealed:tok"),
        build(b"C", b"SELECT 1\0"),
        ready(),
    )

    assert types(reply.to_client) == "12DCZ"
    assert client_rows(reply) == [[b"tok"]]


# Rejections


def test_rejected_parse_error_replaced(session: Session) -> None:
    out = from_client(session, parse("", REJECTED), bind("", "", b"x"), execute(), SYNC)
    (sent_parse, *_) = frames(*out.to_server)
    assert REJECTED not in m.Parse.decode(sent_parse.payload).query

    reply = from_server(session, error("42601"), ready("E"))
    assert types(reply.to_client) == "EZ"
    assert error_code(reply) == "0A000"


def test_rejected_query_error_replaced(session: Session) -> None:
    out = from_client(session, build(b"Q", REJECTED.encode() + b"\0"))
    (sent,) = frames(*out.to_server)
    assert REJECTED not in m.decode_query(sent.payload)

    reply = from_server(session, error("42601"), ready("E"))
    assert error_code(reply) == "0A000"


def test_unsealable_parameter_rejected(session: Session) -> None:
    out = from_client(
        session, parse("", INSERT), bind("", "", b"nokey"), execute(), SYNC
    )
    assert b"nokey" not in b"".join(out.to_server)

    reply = from_server(session, PARSE_COMPLETE, error("26000"), ready())
    assert types(reply.to_client) == "1EZ"
    assert error_code(reply) == "22023"


def test_unsealable_literal_rejected(session: Session) -> None:
    sql = INSERT_LITERAL.replace("'x'", "'x' /* nokey */")
    out = from_client(session, build(b"Q", sql.encode() + b"\0"))
    assert b"nokey" not in b"".join(out.to_server)

    reply = from_server(session, error("42601"), ready())
    assert error_code(reply) == "22023"


# Describe answers and portal lifetime


def test_describe_answer_goes_to_statement_named_at_send(session: Session) -> None:
    # Two Describes of the unnamed statement are in flight; the second
    # statement must not take the first one's columns.
    from_client(
        session,
        parse("", "SELECT id FROM tokens"),
        describe("S", ""),
        parse("", "SELECT secret FROM tokens"),
        describe("S", ""),
        SYNC,
    )
    from_server(
        session, PARSE_COMPLETE, build(b"t", b"\0\0"), row_description(("id", 0))
    )
    out = from_client(session, bind("", ""), execute(), SYNC)
    from_server(
        session,
        PARSE_COMPLETE,
        build(b"t", b"\0\0"),
        row_description(("secret", SEALED_TABLE)),
        ready(),
    )
    reply = from_server(
        session,
        BIND_COMPLETE,
        row_description(("secret", SEALED_TABLE)),
        data_row(b"sealed:tok"),
        ready(),
    )

    # Had the first answer gone to the second statement, the Bind would have
    # taken its columns as known and skipped the Describe.
    assert types(out.to_server) == "BDES"
    assert client_rows(reply) == [[b"tok"]]


def test_portals_cleared_on_ready_idle(session: Session) -> None:
    from_client(session, parse("", "SELECT 1"), bind("c", ""), describe("P", "c"), SYNC)
    from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_description(("?column?", 0)),
        ready(),
    )

    assert session._portals == {}


def test_portals_kept_in_transaction(session: Session) -> None:
    from_client(session, parse("", "SELECT 1"), bind("c", ""), describe("P", "c"), SYNC)
    from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_description(("?column?", 0)),
        ready("T"),
    )

    assert set(session._portals) == {"c"}
    out = from_client(session, execute("c"), SYNC)
    assert types(out.to_server) == "ES"


def test_portal_of_next_batch_survives_ready(session: Session) -> None:
    from_client(session, parse("", "SELECT 1"), SYNC)
    from_client(
        session,
        parse("s", "SELECT secret FROM tokens"),
        bind("c", "s"),
        describe("P", "c"),
    )
    from_server(session, PARSE_COMPLETE, ready())

    assert set(session._portals) == {"c"}
    out = from_client(session, execute("c"), SYNC)
    assert types(out.to_server) == "ES"
    reply = from_server(
        session,
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_description(("secret", SEALED_TABLE)),
        data_row(b"sealed:tok"),
        build(b"C", b"SELECT 1\0"),
        ready(),
    )
    assert client_rows(reply) == [[b"tok"]]


def test_execute_after_portal_closed_redescribes(session: Session) -> None:
    from_client(
        session,
        parse("", "SELECT secret FROM tokens"),
        bind("c", ""),
        describe("P", "c"),
    )
    out = from_client(session, close("P", "c"), execute("c"), SYNC)

    assert types(out.to_server) == "CDES"


def test_bind_result_format_count_mismatch(session: Session) -> None:
    # The server rejects a Bind with two format codes for three columns; the
    # session must pass it on, not fail on the missing third code.
    from_client(
        session,
        parse("s", "SELECT id, x, secret FROM tokens"),
        describe("S", "s"),
        SYNC,
    )
    columns = row_description(("id", 0), ("x", 0), ("secret", SEALED_TABLE))
    from_server(session, PARSE_COMPLETE, build(b"t", b"\0\0"), columns, ready())
    bad = m.Bind("", "s", (), (), (1, 1)).encode()

    out = from_client(session, bad, execute(), SYNC)

    assert out.to_server == [bad, execute(), SYNC]


LOOKUP = "SELECT secret FROM tokens WHERE secret = $1"


class VersionedPlanner(FakePlanner):
    """A planner whose lookup statement depends on the live key versions."""

    def __init__(self) -> None:
        self.versions: KeyVersions = (("secret", ((1, 1),)),)

    def statement(
        self, sql: str, search_path: tuple[str, ...] | None = None
    ) -> StatementPlan:
        if sql == LOOKUP:
            search = SearchValue(COLUMN, 0, 0, False, False, 1)  # type: ignore[arg-type]
            return StatementPlan(params={1: COLUMN}, searches=(search,))  # type: ignore[dict-item]
        return super().statement(sql, search_path)

    def seal_statement(
        self, sql: str, plan: StatementPlan, encoding: str = "utf-8"
    ) -> SealedStatement:
        if len(self.versions[0][1]) == 1:
            return SealedStatement(sql, self.versions)
        text = sql.replace("= $1", "= ANY($1::text[])")
        return SealedStatement(text, self.versions, frozenset({1}))

    def key_versions(self, names: tuple[str, ...]) -> KeyVersions:
        return self.versions

    def seal_param_versions(
        self, column: Any, value: bytes, fmt: int, declared_oid: int = 0, settings: Any = None
    ) -> bytes:
        return b"{" + PREFIX + value + b"@1," + PREFIX + value + b"@2}"


def test_bind_parses_again_after_rotation() -> None:
    planner = VersionedPlanner()
    session = Session(planner, "test")
    _define(session, "s", LOOKUP)
    planner.versions = (("secret", ((1, 1), (1, 2))),)

    out = from_client(session, bind("", "s", b"a"), execute(), SYNC)

    assert types(out.to_server) == "CPBDES"
    parsed = [f for f in frames(*out.to_server) if f.type == ord("P")]
    assert m.Parse.decode(parsed[0].payload).query.endswith("= ANY($1::text[])")
    assert sent_bind(out).params == (b"{sealed:a@1,sealed:a@2}",)
    reply = from_server(
        session, CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, NO_DATA,
        build(b"C", b"SELECT 0\0"), ready(),
    )
    # The client sent neither the Close nor the Parse, so their replies stay hidden.
    assert types(reply.to_client) == "2CZ"


def test_bind_with_open_portal_rejected_after_rotation() -> None:
    planner = VersionedPlanner()
    session = Session(planner, "test")
    _define(session, "s", LOOKUP)
    from_client(session, bind("cursor", "s", b"a"), SYNC)
    from_server(session, BIND_COMPLETE, ready("T"))
    planner.versions = (("secret", ((1, 1), (1, 2))),)

    out = from_client(session, bind("", "s", b"b"), execute(), SYNC)

    assert "P" not in types(out.to_server)
    reply = from_server(session, error("26000"), ready("T"))
    assert error_code(reply) == "0A000"
