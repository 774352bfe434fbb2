"""Session: a value whose data key is not loaded fails its statement, not the connection."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import KeyUnavailableError
from proxy.wire import messages as m
from proxy.wire.frames import build
from proxy.wire.session import KEY_UNAVAILABLE, Session
from tests.wire.test_session import (
    BIND_COMPLETE,
    INSERT,
    PARSE_COMPLETE,
    SECRET_ROW,
    SYNC,
    FakePlanner,
    bind,
    client_rows,
    data_row,
    describe,
    error,
    error_code,
    execute,
    frames,
    from_client,
    from_server,
    parse,
    ready,
    types,
)

UNLOADED = b"sealed-under:missing-key"
SELECT = b"SELECT secret, id FROM tokens\0"
COMPLETE = build(b"C", b"SELECT 3\0")
FLUSH = build(b"H", b"")


class UnloadedKeyPlanner(FakePlanner):
    """Treats UNLOADED as a value whose data key is not loaded, and b"nokey" too."""

    def open_value(
        self, column: Any, value: bytes, fmt: int, associated: Any = ()
    ) -> bytes:
        if value == UNLOADED:
            raise KeyUnavailableError("data key 7 version 2 is not loaded")
        return super().open_value(column, value, fmt, associated)

    def seal_param(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        associated: tuple[bytes | None, ...] = (),
        subject: Any = None,
    ) -> bytes:
        if value == b"nokey":
            raise KeyUnavailableError(f"no data key is loaded for column {column.identity}")
        return super().seal_param(column, value, fmt, declared_oid, associated, subject)


@pytest.fixture
def session() -> Session:
    return Session(UnloadedKeyPlanner(), "test")


def result_rows() -> tuple[bytes, ...]:
    return (
        SECRET_ROW,
        data_row(b"sealed:one", b"1"),
        data_row(UNLOADED, b"2"),
        data_row(b"sealed:three", b"3"),
        COMPLETE,
    )


def error_message(data: list[bytes]) -> dict[str, str]:
    (frame,) = [f for f in frames(*data) if f.type == ord("E")]
    return m.decode_error_fields(frame.payload)


def test_simple_query_fails_statement(session: Session) -> None:
    from_client(session, build(b"Q", SELECT))
    reply = from_server(session, *result_rows(), ready("I"))

    assert not reply.close
    assert types(reply.to_client) == "TDEZ"
    assert client_rows(reply) == [[b"one", b"1"]]
    assert error_code(reply) == KEY_UNAVAILABLE
    fields = error_message(reply.to_client)
    assert "public.tokens.secret" in fields["M"]
    assert "H" in fields
    assert reply.to_server == []


def test_next_statement_still_served(session: Session) -> None:
    from_client(session, build(b"Q", SELECT))
    from_server(session, *result_rows(), ready("I"))

    from_client(session, build(b"Q", SELECT))
    reply = from_server(session, SECRET_ROW, data_row(b"sealed:four", b"4"), ready())
    assert types(reply.to_client) == "TDZ"
    assert client_rows(reply) == [[b"four", b"4"]]


def test_transaction_block_ends_failed(session: Session) -> None:
    from_client(session, build(b"Q", SELECT))
    first = from_server(session, *result_rows(), ready("T"))

    # The server's transaction is still healthy, so the proxy fails it too,
    # and the client gets the ReadyForQuery of that statement.
    assert types(first.to_client) == "TDE"
    (sent,) = frames(*first.to_server)
    assert sent.type == ord("Q")
    reply = from_server(session, error("42601"), ready("E"))
    assert types(reply.to_client) == "Z"
    assert reply.to_client[0][5:6] == b"E"
    assert session.transaction_status == "E"


def test_extended_batch_fails_statement(session: Session) -> None:
    from_client(
        session, parse("", "SELECT secret, id FROM tokens"), bind("", ""),
        describe("P", ""), execute(), SYNC,
    )
    reply = from_server(
        session, PARSE_COMPLETE, BIND_COMPLETE, *result_rows(), ready("I")
    )

    assert not reply.close
    assert types(reply.to_client) == "12TDEZ"
    assert error_code(reply) == KEY_UNAVAILABLE


def test_extended_without_sync_rolls_back(session: Session) -> None:
    from_client(
        session, parse("", "SELECT secret, id FROM tokens"), bind("", ""),
        describe("P", ""), execute("", 10), FLUSH,
    )
    reply = from_server(session, PARSE_COMPLETE, BIND_COMPLETE, *result_rows()[:3])

    # The client gets its error at once, and a failing Parse makes the
    # server skip to the client's Sync, like the error the client saw.
    assert types(reply.to_client) == "12TDE"
    (sent,) = frames(*reply.to_server)
    assert sent.type == ord("P")
    skipped = from_client(session, execute("", 10), SYNC)
    assert types(skipped.to_server) == "S"
    end = from_server(session, data_row(b"sealed:three", b"3"), error("42601"), ready())
    assert types(end.to_client) == "Z"


def test_pipelined_statement_closes(session: Session) -> None:
    from_client(session, build(b"Q", SELECT), build(b"Q", SELECT))
    reply = from_server(session, *result_rows(), ready())

    assert reply.close
    assert error_code(reply) == "XX001"


def test_unloaded_write_key_rejected(session: Session) -> None:
    out = from_client(
        session, parse("", INSERT), bind("", "", b"nokey"), execute(), SYNC
    )
    assert b"nokey" not in b"".join(out.to_server)

    reply = from_server(session, PARSE_COMPLETE, error("26000"), ready())
    assert types(reply.to_client) == "1EZ"
    assert error_code(reply) == KEY_UNAVAILABLE
