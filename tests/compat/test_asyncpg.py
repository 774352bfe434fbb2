"""asyncpg through the proxy: statement cache, cursors, COPY and notifications."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_asyncpg_compat_" + "Hy7uJ" * 8
INSERT = "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) VALUES ($1, $2, $3)"
SELECT_ONE = "SELECT access_token, refresh_token FROM oauth_tokens WHERE user_id = $1"


def _token(user_id: int) -> str:
    return f"{TOKEN}-{user_id}"


@pytest.fixture
async def conn(oauth_proxy: RunningProxy) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(oauth_proxy.dsn(), ssl=False)
    yield connection
    await connection.close()


def _assert_stored(proxy: RunningProxy, user_ids: list[int]) -> None:
    stored = proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _ in stored] == user_ids
    for user_id, access in stored:
        assert_sealed(access, _token(user_id))


async def test_statement_cache_reuse(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    # conn.execute and conn.fetchrow with arguments go through asyncpg's
    # statement cache: Parse once, then Bind and Execute only.
    for user_id in range(30):
        await conn.execute(INSERT, user_id, _token(user_id), f"refresh-{user_id}")
    rows = [await conn.fetchrow(SELECT_ONE, user_id) for user_id in range(30)]

    assert [None if row is None else tuple(row) for row in rows] == [
        (_token(i), f"refresh-{i}") for i in range(30)
    ]
    _assert_stored(oauth_proxy, list(range(30)))


async def test_cached_statement_literal_fresh_ciphertext(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    # asyncpg checks the described parameter count against its arguments,
    # then binds the one cached statement at every call.
    insert = "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, 'same-literal')"
    for user_id in range(5):
        await conn.execute(insert, user_id)
    read = await conn.fetch("SELECT access_token FROM oauth_tokens ORDER BY user_id")

    assert [row[0] for row in read] == ["same-literal"] * 5
    stored = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
    for (access,) in stored:
        assert_sealed(access, "same-literal")
    assert len({access for (access,) in stored}) == 5


async def test_statement_cache_after_ddl(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    select_all = "SELECT * FROM oauth_tokens WHERE user_id = $1"
    await conn.execute(INSERT, 1, _token(1), None)
    before = await conn.fetchrow(select_all, 1)

    # The cached statement's result type changes, so the server rejects it
    # ("cached plan must not change result type") and asyncpg prepares it again.
    await conn.execute("ALTER TABLE oauth_tokens ADD COLUMN note text")
    await conn.execute(INSERT, 2, _token(2), None)
    after = await conn.fetchrow(select_all, 2)

    assert before is not None
    assert before["access_token"] == _token(1)
    assert after is not None
    assert after["access_token"] == _token(2)
    assert after["note"] is None
    _assert_stored(oauth_proxy, [1, 2])


async def test_cursor_iteration(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    await conn.executemany(INSERT, [(i, _token(i), None) for i in range(60)])
    query = "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"

    async with conn.transaction():
        # An iterated cursor fetches by Execute with a row limit (prefetch).
        read = [tuple(row) async for row in conn.cursor(query, prefetch=7)]
        cursor = await conn.cursor(query)
        await cursor.forward(10)
        some = await cursor.fetch(5)
        one = await cursor.fetchrow()

    assert read == [(i, _token(i)) for i in range(60)]
    assert [tuple(row) for row in some] == [(i, _token(i)) for i in range(10, 15)]
    assert one is not None
    assert tuple(one) == (15, _token(15))
    _assert_stored(oauth_proxy, list(range(60)))


@pytest.mark.parametrize("count", [1, 25])
async def test_copy_records_to_table(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection, count: int
) -> None:
    # For one record asyncpg 0.32 sends CopyData and CopyDone in the same
    # write as the COPY query, before the server's CopyInResponse.
    records = [(i, _token(i), None if i % 2 else f"refresh-{i}") for i in range(count)]

    status = await conn.copy_records_to_table(
        "oauth_tokens",
        records=records,
        columns=["user_id", "access_token", "refresh_token"],
    )

    assert status == f"COPY {count}"
    _assert_stored(oauth_proxy, list(range(count)))
    stored_refresh = oauth_proxy.direct(
        "SELECT user_id, refresh_token FROM oauth_tokens WHERE user_id % 2 = 0"
    )
    for user_id, refresh in stored_refresh:
        assert_sealed(refresh, f"refresh-{user_id}")
    rows = await conn.fetch(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens"
    )
    assert sorted(tuple(row) for row in rows) == records


async def test_copy_from_query(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    await conn.executemany(INSERT, [(i, _token(i), None) for i in range(3)])
    buffer: list[bytes] = []

    async def collect(data: bytes) -> None:
        buffer.append(data)

    await conn.copy_from_query(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id",
        output=collect,
        format="csv",
    )

    # The proxy quotes unsealed fields where the server would not, and both
    # forms parse to the same values.
    text = b"".join(buffer).decode()
    assert list(csv.reader(io.StringIO(text))) == [
        [str(i), _token(i)] for i in range(3)
    ]


async def test_add_listener_notification(
    oauth_proxy: RunningProxy, conn: asyncpg.Connection
) -> None:
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(
        _: asyncpg.Connection | PoolConnectionProxy,
        pid: int,
        channel: str,
        payload: object,
    ) -> None:
        received.put_nowait((channel, str(payload)))

    await conn.add_listener("token_events", on_notify)
    writer = await asyncpg.connect(oauth_proxy.dsn(), ssl=False)
    try:
        await writer.execute(INSERT, 1, _token(1), None)
        await writer.execute("SELECT pg_notify('token_events', 'user 1 rotated')")

        # The listening connection is idle: the notification arrives unasked.
        notification = await asyncio.wait_for(received.get(), timeout=10)
    finally:
        await writer.close()
    await conn.remove_listener("token_events", on_notify)

    assert notification == ("token_events", "user 1 rotated")
    row = await conn.fetchrow(SELECT_ONE, 1)
    assert row is not None
    assert row["access_token"] == _token(1)
    _assert_stored(oauth_proxy, [1])
