"""`associated_columns`: a sealed value bound to other columns of its row.

Each test checks what the application reads through the proxy and what the
table holds when read directly. The tests that move ciphertext write to the
server directly, as an attacker with access to the database would.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.cli import main
from proxy.crypto.values import dearmour, read_key_ref
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

RULES = """\
tables:
  - name: public.tokens
    columns:
      - name: access_token
        encryption: randomized
        associated_columns: [user_id]
      - name: spare_token
        associated_columns: [user_id, tenant]
        on_decrypt_error: null
  - name: public.notes
    columns:
      - name: body
        associated_columns: [owner]
        on_decrypt_error: ciphertext
"""
TABLE = """
CREATE TABLE tokens (
    id int PRIMARY KEY,
    user_id int,
    tenant text,
    access_token text,
    spare_token text
);
CREATE TABLE notes (id int PRIMARY KEY, owner uuid, body text);
"""
TOKEN = "gho_bound_" + "Hq4pW" * 6


@pytest.fixture
def bound(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tokens.yaml").write_text(RULES)
    return start_proxy(fresh_db, rules, key_refresh_seconds=0.2)


def _token(row_id: int) -> str:
    return f"{TOKEN}-{row_id}"


def _insert_rows(proxy: RunningProxy, *user_ids: int) -> None:
    """Insert row i (from 1) for user_ids[i - 1] through the proxy."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for row_id, user_id in enumerate(user_ids, start=1):
            conn.execute(
                "INSERT INTO tokens (id, user_id, tenant, access_token, spare_token) "
                "VALUES (%s, %s, %s, %s, %s)",
                (row_id, user_id, "acme", _token(row_id), f"spare-{row_id}"),
            )


def _stored(proxy: RunningProxy) -> list[tuple[int, int | None, str | None, str | None]]:
    return proxy.direct("SELECT id, user_id, access_token, spare_token FROM tokens ORDER BY id")


def _read(proxy: RunningProxy, where: str = "") -> list[tuple[object, ...]]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, user_id, access_token, spare_token, tenant FROM tokens "
            f"{where} ORDER BY id"
        ).fetchall()
    return [row[:4] for row in rows]


# Round trips


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_psycopg(bound: RunningProxy, binary: bool) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        placeholder = "%b" if binary else "%s"
        conn.execute(
            "INSERT INTO tokens (id, user_id, tenant, access_token, spare_token) "
            f"VALUES (1, {placeholder}, {placeholder}, {placeholder}, NULL)",
            (7, "acme", TOKEN),
        )
        cursor = conn.cursor(binary=binary)
        rows = cursor.execute("SELECT user_id, access_token FROM tokens").fetchall()
    assert rows == [(7, TOKEN)]
    ((user_id, stored),) = bound.direct("SELECT user_id, access_token FROM tokens")
    assert user_id == 7
    assert_sealed(stored, TOKEN)


async def test_round_trip_asyncpg(bound: RunningProxy) -> None:
    conn = await asyncpg.connect(bound.dsn(), ssl=False)
    try:
        insert = await conn.prepare(
            "INSERT INTO tokens (id, user_id, tenant, access_token, spare_token) "
            "VALUES ($1, $2, $3, $4, $5)"
        )
        await insert.executemany(
            [(i, 100 + i, "acme", _token(i), f"spare-{i}") for i in range(1, 6)]
        )
        rows = await conn.fetch(
            "SELECT id, access_token, tenant, spare_token, user_id FROM tokens ORDER BY id"
        )
        star = await conn.fetchrow("SELECT * FROM tokens WHERE id = $1", 3)
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        (i, _token(i), "acme", f"spare-{i}", 100 + i) for i in range(1, 6)
    ]
    assert star is not None
    assert tuple(star) == (3, 103, "acme", _token(3), "spare-3")
    for row_id, _, access, spare in _stored(bound):
        assert_sealed(access, _token(row_id))
        assert_sealed(spare, f"spare-{row_id}")


def test_literal_insert_and_null_user(bound: RunningProxy) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tokens (id, user_id, tenant, access_token) "
            f"VALUES (1, 42, 'acme', '{_token(1)}'), (2, NULL, NULL, '{_token(2)}')"
        )
    assert _read(bound) == [(1, 42, _token(1), None), (2, None, _token(2), None)]
    for row_id, _, access, _ in _stored(bound):
        assert_sealed(access, _token(row_id))


def test_null_differs_from_empty_text(bound: RunningProxy) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tokens (id, user_id, tenant, spare_token) VALUES "
            "(1, 5, NULL, %s), (2, 5, '', %s)",
            ("spare-1", "spare-2"),
        )
    bound.direct(
        "UPDATE tokens SET spare_token = (SELECT spare_token FROM tokens WHERE id = 1) "
        "WHERE id = 2"
    )
    assert _read(bound) == [(1, 5, None, "spare-1"), (2, 5, None, None)]


def test_simple_query_protocol(bound: RunningProxy) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        cursor = psycopg.ClientCursor(conn)
        cursor.execute(
            "INSERT INTO tokens (id, user_id, tenant, access_token, spare_token) "
            "VALUES (%s, %s, %s, %s, %s)",
            (1, 8, "acme", TOKEN, "spare-1"),
        )
        rows = cursor.execute("SELECT * FROM tokens").fetchall()
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            cursor.execute("SELECT 1; SELECT user_id, access_token FROM tokens")
    assert rows == [(1, 8, "acme", TOKEN, "spare-1")]
    assert "several statements" in str(info.value)
    ((stored,),) = bound.direct("SELECT access_token FROM tokens")
    assert_sealed(stored, TOKEN)


# A sealed value moved to another row


def test_moved_value_fails_to_open(bound: RunningProxy) -> None:
    _insert_rows(bound, 1, 2)
    bound.direct(
        "UPDATE tokens SET access_token = (SELECT access_token FROM tokens WHERE id = 1) "
        "WHERE id = 2"
    )
    ((moved,),) = bound.direct("SELECT access_token FROM tokens WHERE id = 2")
    assert_sealed(moved, _token(1))

    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DataCorrupted) as info:
            conn.execute("SELECT user_id, access_token FROM tokens WHERE id = 2").fetchall()
        # Only the statement fails; the session goes on.
        assert conn.execute("SELECT 1").fetchall() == [(1,)]
    assert "public.tokens.access_token" in str(info.value)
    hint = info.value.diag.message_hint or ""
    assert "copied from another row" in hint
    assert "keyring" not in hint
    # The value in its own row still opens.
    assert _read(bound, "WHERE id = 1") == [(1, 1, _token(1), "spare-1")]


def test_changed_user_id_fails_to_open(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    bound.direct("UPDATE tokens SET user_id = 9 WHERE id = 1")
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.DataCorrupted),
    ):
        conn.execute("SELECT user_id, access_token FROM tokens").fetchall()


async def test_moved_value_fails_asyncpg(bound: RunningProxy) -> None:
    _insert_rows(bound, 1, 2)
    bound.direct(
        "UPDATE tokens SET access_token = (SELECT access_token FROM tokens WHERE id = 1), "
        "spare_token = (SELECT spare_token FROM tokens WHERE id = 1) WHERE id = 2"
    )
    conn = await asyncpg.connect(bound.dsn(), ssl=False)
    try:
        spare = await conn.fetch(
            "SELECT id, user_id, tenant, spare_token FROM tokens ORDER BY id"
        )
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT user_id, access_token FROM tokens WHERE id = $1", 2)
        assert info.value.sqlstate == "XX001"
        # Only the statement fails; the session goes on.
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert [tuple(row) for row in spare] == [(1, 1, "acme", "spare-1"), (2, 2, "acme", None)]


def test_moved_value_reads_null(bound: RunningProxy) -> None:
    _insert_rows(bound, 1, 2)
    bound.direct(
        "UPDATE tokens SET spare_token = (SELECT spare_token FROM tokens WHERE id = 1) "
        "WHERE id = 2"
    )
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, spare_token, tenant, user_id FROM tokens ORDER BY id"
        ).fetchall()
        binary = conn.cursor(binary=True).execute(
            "SELECT id, spare_token, tenant, user_id FROM tokens ORDER BY id"
        ).fetchall()
    assert rows == [(1, "spare-1", "acme", 1), (2, None, "acme", 2)]
    assert binary == rows


def test_moved_value_reads_ciphertext(bound: RunningProxy) -> None:
    owners = ["0b7c3a52-7d0e-4c55-9a43-0f2e62c9a001", "0b7c3a52-7d0e-4c55-9a43-0f2e62c9a002"]
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        for row_id, owner in enumerate(owners, start=1):
            conn.execute(
                "INSERT INTO notes (id, owner, body) VALUES (%s, %s, %s)",
                (row_id, owner.upper(), f"note-{row_id}"),
            )
    bound.direct("UPDATE notes SET body = (SELECT body FROM notes WHERE id = 1) WHERE id = 2")
    ((moved,),) = bound.direct("SELECT body FROM notes WHERE id = 2")
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT id, owner, body FROM notes ORDER BY id").fetchall()
        binary = conn.cursor(binary=True).execute(
            "SELECT id, owner, body FROM notes ORDER BY id"
        ).fetchall()
    # The owner was sent in upper case and binds in canonical (lower) case.
    expected = [(1, owners[0], "note-1"), (2, owners[1], moved)]
    assert [(row[0], str(row[1]), row[2]) for row in rows] == expected
    assert [(row[0], str(row[1]), row[2]) for row in binary] == expected
    assert_sealed(moved, "note-1")


def test_moved_to_same_user_opens(bound: RunningProxy) -> None:
    # The binding is to the values, not to the row: a row with the same
    # user_id accepts the value, which is the plaintext that user sealed.
    _insert_rows(bound, 3, 3)
    bound.direct(
        "UPDATE tokens SET access_token = (SELECT access_token FROM tokens WHERE id = 1) "
        "WHERE id = 2"
    )
    assert [row[2] for row in _read(bound)] == [_token(1), _token(1)]


# UPDATE forms


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        ("UPDATE tokens SET access_token = %s WHERE user_id = %s AND id = 1", (TOKEN, 1)),
        ("UPDATE tokens SET access_token = %s WHERE id = 1 AND 1 = user_id", (TOKEN,)),
        ("UPDATE tokens t SET access_token = %s WHERE t.user_id = '1'", (TOKEN,)),
        (
            (
                "UPDATE tokens SET access_token = %s, user_id = %s, spare_token = %s, "
                "tenant = %s WHERE id = 1"
            ),
            (TOKEN, 1, "spare-1", "acme"),
        ),
        (
            (
                f"UPDATE tokens SET user_id = 1, access_token = '{TOKEN}', "
                "spare_token = 'spare-1' WHERE id = 1 AND tenant = 'acme'"
            ),
            (),
        ),
    ],
)
def test_update_accepted(bound: RunningProxy, statement: str, params: tuple[object, ...]) -> None:
    _insert_rows(bound, 1)
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute(statement, params)
    assert _read(bound) == [(1, 1, TOKEN, "spare-1")]
    ((_, _, stored, _),) = _stored(bound)
    assert_sealed(stored, TOKEN)


def test_update_moves_token_to_new_user(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute(
            "UPDATE tokens SET user_id = %s, tenant = 'other', access_token = %s, "
            "spare_token = %s WHERE id = 1",
            (2, TOKEN, "spare-new"),
        )
    assert _read(bound) == [(1, 2, TOKEN, "spare-new")]


@pytest.mark.parametrize(
    ("statement", "params", "reason"),
    [
        ("UPDATE tokens SET access_token = %s WHERE id = 1", (TOKEN,), "user_id"),
        (
            "UPDATE tokens SET access_token = %s WHERE user_id = %s OR id = 1",
            (TOKEN, 1),
            "user_id",
        ),
        (
            "UPDATE tokens SET access_token = %s, user_id = user_id + 0 WHERE id = 1",
            (TOKEN,),
            "computed by the server",
        ),
        ("UPDATE tokens SET user_id = 2 WHERE id = 1", (), "would no longer open"),
        (
            "UPDATE tokens SET user_id = 2, access_token = access_token WHERE id = 1",
            (),
            "would no longer open",
        ),
        (
            "UPDATE tokens SET spare_token = %s WHERE user_id = 1 AND id = 1",
            ("spare-new",),
            "tenant",
        ),
    ],
)
def test_update_rejected(
    bound: RunningProxy, statement: str, params: tuple[object, ...], reason: str
) -> None:
    _insert_rows(bound, 1)
    before = _stored(bound)
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
    ):
        conn.execute(statement, params)
    assert info.value.diag.sqlstate == "0A000"
    assert "public.tokens." in str(info.value)
    assert reason in str(info.value)
    assert info.value.diag.message_hint
    assert _stored(bound) == before


def test_update_in_simple_query_rejected(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    before = _stored(bound)
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported),
    ):
        conn.execute(f"UPDATE tokens SET access_token = '{TOKEN}' WHERE id = 1", prepare=False)
    assert _stored(bound) == before


# INSERT forms


@pytest.mark.parametrize(
    ("statement", "params", "reason"),
    [
        (
            "INSERT INTO tokens (id, access_token) VALUES ($1, $2)",
            (TOKEN,),
            "does not give its associated column user_id",
        ),
        (
            "INSERT INTO tokens (id, user_id, access_token) VALUES (1, DEFAULT, $1)",
            (TOKEN,),
            "computed by the server",
        ),
        (
            f"INSERT INTO tokens (id, user_id, access_token) VALUES (1, $1, '{TOKEN}')",
            (1,),
            "parameter that arrives later",
        ),
        (
            "INSERT INTO tokens (id, user_id, access_token) VALUES (1, $1, $2), (2, $3, $2)",
            (1, TOKEN, 2),
            "rows with different associated values",
        ),
        (
            "INSERT INTO tokens (id, user_id, access_token) VALUES (1, $1, $1)",
            ("7",),
            "both sealed",
        ),
    ],
)
def test_insert_rejected(
    bound: RunningProxy, statement: str, params: tuple[object, ...], reason: str
) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        cursor = psycopg.RawCursor(conn)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            cursor.execute(statement, params)
    assert info.value.diag.sqlstate == "0A000"
    assert reason in str(info.value)
    assert bound.direct("SELECT count(*) FROM tokens") == [(0,)]


def test_upsert_from_excluded(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    upsert = (
        "INSERT INTO tokens (id, user_id, tenant, access_token) VALUES (%s, %s, 'acme', %s) "
        "ON CONFLICT (id) DO UPDATE SET access_token = EXCLUDED.access_token, "
        "user_id = EXCLUDED.user_id, tenant = EXCLUDED.tenant, "
        "spare_token = EXCLUDED.spare_token"
    )
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute(upsert, (1, 2, TOKEN))
        conn.execute(upsert, (2, 3, _token(2)))
        several = upsert.replace(
            "VALUES (%s, %s, 'acme', %s)",
            "VALUES (%s, %s, 'acme', %s), (%s, %s, 'acme', %s)",
        )
        conn.execute(several, (2, 4, "token-2b", 3, 5, "token-3"))
    assert _read(bound) == [
        (1, 2, TOKEN, None),
        (2, 4, "token-2b", None),
        (3, 5, "token-3", None),
    ]


def test_upsert_parameter_keyed_by_user(bound: RunningProxy) -> None:
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX ON tokens (user_id)")
        for token in ("first", "second"):
            conn.execute(
                "INSERT INTO tokens (id, user_id, access_token) VALUES (1, %s, %s) "
                "ON CONFLICT (user_id) DO UPDATE SET access_token = %s",
                (4, token, token),
            )
    assert [row[:3] for row in _read(bound)] == [(1, 4, "second")]


@pytest.mark.parametrize(
    "update",
    [
        "access_token = EXCLUDED.access_token",
        "user_id = EXCLUDED.user_id",
        "access_token = %s",
    ],
)
def test_upsert_rejected(bound: RunningProxy, update: str) -> None:
    _insert_rows(bound, 1)
    before = _stored(bound)
    params: tuple[object, ...] = (1, 2, TOKEN) + ((TOKEN,) if "%s" in update else ())
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
    ):
        conn.execute(
            "INSERT INTO tokens (id, user_id, access_token) VALUES (%s, %s, %s) "
            f"ON CONFLICT (id) DO UPDATE SET {update}",
            params,
        )
    assert info.value.diag.sqlstate == "0A000"
    assert _stored(bound) == before


# Reads


@pytest.mark.parametrize(
    "query",
    [
        "SELECT access_token FROM tokens",
        "SELECT id, access_token, tenant FROM tokens",
        "SELECT a.access_token, b.user_id FROM tokens a JOIN tokens b ON b.id = a.id",
        "SELECT coalesce(access_token, 'none'), user_id FROM tokens",
        (
            "SELECT user_id, access_token FROM tokens UNION ALL "
            "SELECT access_token, user_id FROM tokens"
        ),
    ],
)
def test_select_without_associated_rejected(bound: RunningProxy, query: str) -> None:
    _insert_rows(bound, 1)
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(query)
        # The connection stays usable after the rejection.
        assert conn.execute("SELECT user_id, access_token FROM tokens").fetchall() == [
            (1, _token(1))
        ]
    assert info.value.diag.sqlstate == "0A000"
    assert "public.tokens.access_token" in str(info.value)
    assert info.value.diag.message_hint


def test_select_forms_accepted(bound: RunningProxy) -> None:
    _insert_rows(bound, 1, 2)
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        aliased = conn.execute(
            "SELECT t.access_token AS tok, t.user_id AS owner FROM tokens t "
            "WHERE t.id = 2"
        ).fetchall()
        joined = conn.execute(
            "SELECT a.access_token, a.user_id, b.id FROM tokens a "
            "JOIN tokens b ON b.user_id = a.user_id ORDER BY a.id"
        ).fetchall()
        union = conn.execute(
            "SELECT user_id, access_token FROM tokens WHERE id = 1 UNION ALL "
            "SELECT user_id, access_token FROM tokens WHERE id = 2"
        ).fetchall()
        returned = conn.execute(
            "UPDATE tokens SET access_token = %s WHERE user_id = 1 "
            "RETURNING access_token, user_id",
            ("fresh",),
        ).fetchall()
    assert aliased == [(_token(2), 2)]
    assert joined == [(_token(1), 1, 1), (_token(2), 2, 2)]
    assert union == [(1, _token(1)), (2, _token(2))]
    assert returned == [("fresh", 1)]


def test_read_through_with_rejected(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
    ):
        conn.execute("WITH t AS (SELECT * FROM tokens) SELECT user_id, access_token FROM t")
    assert info.value.diag.sqlstate == "0A000"
    assert "public.tokens.access_token" in str(info.value)


def test_untraced_read_fails_closed(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    query = (
        "SELECT s.id, s.user_id, s.tenant, s.spare_token, s.access_token "
        "FROM (SELECT * FROM tokens) s"
    )
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DataCorrupted) as info:
            conn.execute(query).fetchall()
        assert conn.execute("SELECT 1").fetchall() == [(1,)]
    assert "public.tokens.access_token" in str(info.value)
    assert "associated columns" in str(info.value)
    assert info.value.diag.message_hint
    # spare_token reads NULL by its on_decrypt_error, never plaintext.
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        rows = conn.execute(query.replace(", s.access_token", "")).fetchall()
    assert rows == [(1, 1, "acme", None)]


def test_returning_without_associated_rejected(bound: RunningProxy) -> None:
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported),
    ):
        conn.execute(
            "INSERT INTO tokens (id, user_id, access_token) VALUES (1, %s, %s) "
            "RETURNING access_token",
            (1, TOKEN),
        )
    assert bound.direct("SELECT count(*) FROM tokens") == [(0,)]


def test_view_with_associated_column(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    bound.direct("CREATE VIEW user_tokens AS SELECT user_id AS owner, access_token FROM tokens")
    bound.run(bound.proxy.reload_catalogs())
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT access_token, owner FROM user_tokens").fetchall()
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT access_token FROM user_tokens")
    assert rows == [(_token(1), 1)]


# COPY


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_in_and_out(bound: RunningProxy, fmt: str) -> None:
    rows = [(1, 10, "acme", _token(1), None), (2, None, None, _token(2), "spare-2")]
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        cursor = conn.cursor()
        with cursor.copy(
            f"COPY tokens (id, user_id, tenant, access_token, spare_token) "
            f"FROM STDIN (FORMAT {fmt})"
        ) as copy:
            if fmt == "binary":
                copy.set_types(["int4", "int4", "text", "text", "text"])
            if fmt == "csv":
                copy.write(f'1,10,acme,"{_token(1)}",\n2,,,{_token(2)},"spare-2"\n')
            for row in rows if fmt != "csv" else []:
                copy.write_row(row)
        with cursor.copy(
            f"COPY tokens (id, access_token, user_id, spare_token, tenant) "
            f"TO STDOUT (FORMAT {fmt})"
        ) as copy:
            if fmt == "binary":
                copy.set_types(["int4", "text", "int4", "text", "text"])
            if fmt == "csv":
                data = b"".join(bytes(chunk) for chunk in copy)
                copied = sorted(csv.reader(io.StringIO(data.decode())))
            else:
                copied = sorted(copy.rows(), key=lambda row: int(row[0]))
    expected = [(1, _token(1), 10, None, "acme"), (2, _token(2), None, "spare-2", None)]
    if fmt == "text":
        expected = [
            tuple(None if value is None else str(value) for value in row) for row in expected
        ]
    if fmt == "csv":
        expected = [
            tuple("" if value is None else str(value) for value in row) for row in expected
        ]
    assert [tuple(row) for row in copied] == expected
    for row_id, _, access, _ in _stored(bound):
        assert_sealed(access, _token(row_id))


def test_copy_out_query(bound: RunningProxy) -> None:
    _insert_rows(bound, 1)
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        conn.cursor().copy(
        "COPY (SELECT user_id, access_token FROM tokens) TO STDOUT"
        ) as copy,
    ):
        copied = [tuple(row) for row in copy.rows()]
    assert copied == [("1", _token(1))]


@pytest.mark.parametrize(
    "statement",
    [
        "COPY tokens (id, access_token) FROM STDIN",
        "COPY tokens (id, access_token) TO STDOUT",
        "COPY (SELECT access_token FROM tokens) TO STDOUT",
    ],
)
def test_copy_without_associated_rejected(bound: RunningProxy, statement: str) -> None:
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
        conn.cursor().copy(statement) as copy,
    ):
        if "FROM" in statement:
            copy.write_row((1, TOKEN))
    assert info.value.diag.sqlstate == "0A000"
    assert bound.direct("SELECT count(*) FROM tokens") == [(0,)]


def test_copy_in_invalid_user_id(bound: RunningProxy) -> None:
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.QueryCanceled),
        conn.cursor().copy("COPY tokens (id, user_id, access_token) FROM STDIN") as copy,
    ):
        copy.write(b"1\tnot-a-number\tsecret-token\n")
    assert bound.direct("SELECT count(*) FROM tokens") == [(0,)]


# Key rotation and rules check


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_reencrypt_keeps_binding(
    bound: RunningProxy, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _insert_rows(bound, 1, 2)
    bound.direct("INSERT INTO tokens (id, user_id, access_token) VALUES (3, 3, 'plain-3')")
    connection = ["--upstream", bound.direct_dsn(), "--keyring", f"sodium:{bound.keydir}"]
    column = "public.tokens.access_token"
    code, _, err = _cli(capsys, "keys", "rotate", *connection, "--column", column)
    assert code == 0, err
    code, out, err = _cli(
        capsys,
        "reencrypt",
        *connection,
        "--table",
        "public.tokens",
        "--rules",
        str(tmp_path / "rules"),
        "--seal-plaintext",
    )
    assert code == 0, err
    assert "2 values re-sealed" in out

    stored = bound.direct("SELECT id, access_token FROM tokens ORDER BY id")
    versions = [read_key_ref(dearmour(value.encode("ascii")))[1] for _, value in stored]
    assert versions == [2, 2, 2]
    deadline = time.monotonic() + 15
    while (bound.proxy._cache.active_ref(column) or (0, 0))[1] != 2:
        assert time.monotonic() < deadline, "the proxy did not load version 2"
        time.sleep(0.05)
    assert [row[:3] for row in _read(bound)] == [
        (1, 1, _token(1)),
        (2, 2, _token(2)),
        (3, 3, "plain-3"),
    ]


@pytest.mark.parametrize(
    ("associated", "expected"),
    [
        ("[user_idd]", "unknown column 'user_idd' in public.t"),
        ("[total]", "type modifier"),
        ("[doubled]", "generated"),
        ("[point]", "cannot put in canonical form"),
    ],
)
def test_rules_check_associated_columns(
    fresh_db: str,
    pg_cluster: PgServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    associated: str,
    expected: str,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (user_id int, total numeric(10, 2), point point, "
            "doubled int GENERATED ALWAYS AS (user_id * 2) STORED, access_token text)"
        )
    rules = tmp_path / "rules"
    rules.mkdir()
    rule = (
        "tables:\n  - name: public.t\n    columns:\n      - name: access_token\n"
        f"        associated_columns: {associated}\n"
    )
    (rules / "t.yaml").write_text(rule)
    code, out, _ = _cli(
        capsys, "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(rules)
    )
    assert code == 1
    assert f"rule file {rules / 't.yaml'} line 4" in out
    assert "'associated_columns' of public.t.access_token" in out
    assert expected in out

    (rules / "t.yaml").write_text(rule.replace(associated, "[user_id]"))
    code, out, _ = _cli(
        capsys, "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(rules)
    )
    assert code == 0, out


def test_reencrypt_binds_existing_values(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    unbound_rules = tmp_path / "unbound"
    unbound_rules.mkdir()
    (unbound_rules / "tokens.yaml").write_text(
        RULES.replace("        associated_columns: [user_id]\n", "")
    )
    bound_rules = tmp_path / "bound"
    bound_rules.mkdir()
    (bound_rules / "tokens.yaml").write_text(RULES)
    unbound = start_proxy(fresh_db, unbound_rules)
    with psycopg.connect(unbound.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tokens (id, user_id, access_token) VALUES (1, 5, %s)", (TOKEN,)
        )
    (before,) = unbound.direct("SELECT access_token FROM tokens")

    connection = ["--upstream", unbound.direct_dsn(), "--keyring", f"sodium:{unbound.keydir}"]
    code, out, err = _cli(
        capsys, "reencrypt", *connection, "--table", "public.tokens", "--rules", str(bound_rules)
    )
    assert code == 0, err
    assert "1 values re-sealed" in out

    (after,) = unbound.direct("SELECT access_token FROM tokens")
    assert after != before
    assert_sealed(after[0], TOKEN)
    bound = start_proxy(fresh_db, bound_rules)
    with psycopg.connect(bound.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT user_id, access_token FROM tokens").fetchall()
    assert rows == [(5, TOKEN)]


def test_reencrypt_reports_moved_value(
    bound: RunningProxy, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _insert_rows(bound, 1, 2)
    bound.direct(
        "UPDATE tokens SET access_token = (SELECT access_token FROM tokens WHERE id = 1) "
        "WHERE id = 2"
    )
    before = _stored(bound)
    connection = ["--upstream", bound.direct_dsn(), "--keyring", f"sodium:{bound.keydir}"]
    code, out, err = _cli(
        capsys,
        "reencrypt",
        *connection,
        "--table",
        "public.tokens",
        "--rules",
        str(tmp_path / "rules"),
    )
    assert code == 1
    assert "1 skipped" in out
    assert "public.tokens.access_token" in err
    assert "does not open" in err
    assert _stored(bound) == before


def test_associated_column_type_change_rejected(bound: RunningProxy) -> None:
    with (
        psycopg.connect(bound.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
    ):
        conn.execute("ALTER TABLE tokens ALTER COLUMN user_id TYPE numeric(10, 2)")
    assert "public.tokens.user_id" in str(info.value)
    assert info.value.diag.message_hint
    ((type_name,),) = bound.direct(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'tokens'::regclass AND attname = 'user_id'"
    )
    assert type_name == "integer"
