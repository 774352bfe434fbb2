"""OAuth token columns through the proxy with asyncpg, checked on both sides.

asyncpg prepares each statement once (Parse and Describe), then runs it with
Bind and Execute alone, requests binary results, and reads cursors with
Execute row limits, so it takes other paths through the session than psycopg.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.wire.frames import Frame
from proxy.wire.session import Output, Session
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_asyncpg_" + "Rt5vQ" * 10
INSERT = "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) VALUES ($1, $2, $3)"


@pytest.fixture
async def conn(oauth_proxy: RunningProxy) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(oauth_proxy.dsn(), ssl=False)
    yield connection
    await connection.close()


def _stored(proxy: RunningProxy) -> list[tuple[int, str | None, str | None]]:
    return proxy.direct(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY id"
    )


def _token(user_id: int) -> str:
    return f"{TOKEN}-{user_id}"


async def test_prepared_insert_executemany(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    insert = await conn.prepare(INSERT)
    await insert.executemany([(i, _token(i), f"refresh-{i}") for i in range(50)])

    rows = await conn.fetch(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens"
    )
    assert sorted(tuple(row) for row in rows) == [
        (i, _token(i), f"refresh-{i}") for i in range(50)
    ]
    stored = _stored(oauth_proxy)
    assert len(stored) == 50
    for user_id, access, refresh in stored:
        assert_sealed(access, _token(user_id))
        assert_sealed(refresh, f"refresh-{user_id}")


async def test_prepared_insert_repeated(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    insert = await conn.prepare(INSERT + " RETURNING id, access_token")
    returned = [await insert.fetchrow(i, _token(i), None) for i in range(10)]

    assert [row["access_token"] for row in returned] == [_token(i) for i in range(10)]
    for user_id, access, refresh in _stored(oauth_proxy):
        assert_sealed(access, _token(user_id))
        assert refresh is None


async def test_prepared_select_executed_many_times(
    oauth_proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    from_client = Session.from_client

    def record(session: Session, frames: list[Frame]) -> Output:
        sent.extend(chr(frame.type) for frame in frames)
        return from_client(session, frames)

    # Sessions created from now on record the type of each client message.
    monkeypatch.setattr(Session, "from_client", record)
    conn = await asyncpg.connect(oauth_proxy.dsn(), ssl=False)
    try:
        await conn.executemany(
            INSERT, [(i, _token(i), f"refresh-{i}") for i in range(20)]
        )
        select = await conn.prepare(
            "SELECT refresh_token, id, access_token FROM oauth_tokens WHERE user_id = $1"
        )
        sent.clear()
        results = [await select.fetch(i) for i in range(20)]
        messages = "".join(sent)
    finally:
        await conn.close()

    assert messages == "BES" * 20
    for i, rows in enumerate(results):
        assert len(rows) == 1
        assert rows[0]["access_token"] == _token(i)
        assert rows[0]["refresh_token"] == f"refresh-{i}"
    for user_id, access, refresh in _stored(oauth_proxy):
        assert_sealed(access, _token(user_id))
        assert_sealed(refresh, f"refresh-{user_id}")


async def test_fetch_with_parameters(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    await conn.execute(INSERT, 1, _token(1), "refresh-one")
    await conn.execute(INSERT, 2, None, "refresh-two")

    rows = await conn.fetch(
        "SELECT user_id, access_token FROM oauth_tokens WHERE user_id > $1 ORDER BY id",
        0,
    )
    single = await conn.fetchval(
        "SELECT refresh_token FROM oauth_tokens WHERE user_id = $1", 2
    )

    assert [tuple(row) for row in rows] == [(1, _token(1)), (2, None)]
    assert single == "refresh-two"
    (first, second) = _stored(oauth_proxy)
    assert_sealed(first[1], _token(1))
    assert second[1] is None
    assert_sealed(second[2], "refresh-two")


async def test_insert_returning(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    row = await conn.fetchrow(
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2) "
        "RETURNING id, provider, access_token",
        5,
        _token(5),
    )

    assert row is not None
    assert row["access_token"] == _token(5)
    assert row["provider"] == "github"
    ((_, access, _),) = _stored(oauth_proxy)
    assert_sealed(access, _token(5))


async def test_update_returning(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    await conn.execute(INSERT, 6, "old-token", None)
    row = await conn.fetchrow(
        "UPDATE oauth_tokens SET refresh_token = $1 WHERE user_id = $2 "
        "RETURNING access_token, refresh_token",
        "new-refresh",
        6,
    )

    assert row is not None
    assert tuple(row) == ("old-token", "new-refresh")
    ((_, access, refresh),) = _stored(oauth_proxy)
    assert_sealed(access, "old-token")
    assert_sealed(refresh, "new-refresh")


async def test_cursor_fetch_in_chunks(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    await conn.executemany(INSERT, [(i, _token(i), None) for i in range(25)])

    chunks = []
    async with conn.transaction():
        cursor = await conn.cursor(
            "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
        )
        while chunk := await cursor.fetch(7):
            chunks.append([tuple(row) for row in chunk])

    assert [len(chunk) for chunk in chunks] == [7, 7, 7, 4]
    assert [row for chunk in chunks for row in chunk] == [
        (i, _token(i)) for i in range(25)
    ]
    for user_id, access, _ in _stored(oauth_proxy):
        assert_sealed(access, _token(user_id))


async def test_cursor_iteration_prefetch(conn: asyncpg.Connection) -> None:
    await conn.executemany(INSERT, [(i, None, _token(i)) for i in range(10)])

    async with conn.transaction():
        read = [
            (row["user_id"], row["refresh_token"])
            async for row in conn.cursor(
                "SELECT user_id, refresh_token FROM oauth_tokens WHERE user_id >= $1 "
                "ORDER BY user_id",
                3,
                prefetch=2,
            )
        ]

    assert read == [(i, _token(i)) for i in range(3, 10)]


async def test_rejected_statement_error(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="access_token"):
        await conn.fetch("SELECT id FROM oauth_tokens WHERE access_token = $1", "x")

    # The connection and its statement cache still work.
    await conn.execute(INSERT, 1, "after-rejection", None)
    assert (
        await conn.fetchval("SELECT access_token FROM oauth_tokens")
        == "after-rejection"
    )
