"""Logical types: columns stored as text or bytea that drivers see as int4, date..."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy

RULES = """\
tables:
  - name: public.payments
    columns:
      - {name: amount_cents, type: int4, encryption: deterministic}
      - {name: balance, type: int8}
      - {name: rate, type: numeric}
      - {name: due, type: date}
      - {name: paid_at, type: timestamptz}
      - {name: ref, type: uuid, encryption: deterministic}
      - {name: meta, type: jsonb}
      - {name: memo, type: text, storage: bytea}
      - {name: blob, type: bytea}
"""
TABLE = """
CREATE TABLE payments (
    id serial PRIMARY KEY,
    amount_cents text, balance text, rate text, due text, paid_at text,
    ref text, meta text, memo bytea, blob bytea
)
"""
ROW = (
    1999,
    -9_000_000_000,
    Decimal("12345.678"),
    dt.date(2024, 2, 29),
    dt.datetime(2024, 3, 1, 12, 30, 15, 250000, tzinfo=dt.timezone.utc),
    uuid.UUID("2b1f0c4e-9d55-4f53-a7a2-6c1f4e0e9b11"),
    {"plan": "pro", "seats": 3},
    "memo stored as bytea",
    b"\x00\x01binary\xff",
)
COLUMNS = "amount_cents, balance, rate, due, paid_at, ref, meta, memo, blob"


@pytest.fixture
def payments(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "payments.yaml").write_text(RULES)
    return start_proxy(fresh_db, rules)


def _check_stored(proxy: RunningProxy) -> None:
    ((amount, memo, blob),) = proxy.direct("SELECT amount_cents, memo, blob FROM payments")
    assert amount.startswith("pgs:")
    assert b"memo stored" not in bytes(memo)
    assert bytes(memo).startswith(b"\xffPS")
    assert b"binary" not in bytes(blob)


def _normalise(row: tuple[object, ...]) -> tuple[object, ...]:
    return row[:4] + (row[4].astimezone(dt.timezone.utc),) + row[5:]  # type: ignore[attr-defined]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_round_trip(payments: RunningProxy, binary: bool) -> None:
    placeholders = ", ".join(["%b" if binary else "%s"] * 9)
    with psycopg.connect(payments.dsn(), autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO payments ({COLUMNS}) VALUES ({placeholders})",
            ROW[:6] + (psycopg.types.json.Jsonb(ROW[6]),) + ROW[7:],
        )
        row = conn.execute(f"SELECT {COLUMNS} FROM payments", binary=binary).fetchone()
        found = conn.execute(
            "SELECT id FROM payments WHERE amount_cents = %s AND ref = %s", (1999, ROW[5])
        ).fetchall()
    assert row is not None
    assert _normalise(row) == ROW
    assert len(found) == 1
    _check_stored(payments)


async def test_asyncpg_round_trip(payments: RunningProxy) -> None:
    conn = await asyncpg.connect(payments.dsn())
    try:
        await conn.set_type_codec(
            "jsonb", encoder=__import__("json").dumps, decoder=__import__("json").loads,
            schema="pg_catalog",
        )
        insert = await conn.prepare(
            f"INSERT INTO payments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )
        await insert.fetch(*ROW)
        row = await conn.fetchrow(f"SELECT {COLUMNS} FROM payments")
        count = await conn.fetchval(
            "SELECT count(*) FROM payments WHERE amount_cents = $1", 1999
        )
    finally:
        await conn.close()
    assert _normalise(tuple(row)) == ROW
    assert count == 1
    _check_stored(payments)


def test_literals_canonicalised(payments: RunningProxy) -> None:
    with psycopg.connect(payments.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO payments (amount_cents, rate, due, ref) VALUES "
            "(' 42', '1.50', '2024-01-05', '2B1F0C4E-9D55-4F53-A7A2-6C1F4E0E9B11')"
        )
        found = conn.execute(
            "SELECT amount_cents, rate FROM payments WHERE amount_cents = 42 "
            "AND ref = '2b1f0c4e-9d55-4f53-a7a2-6c1f4e0e9b11'"
        ).fetchall()
    assert found == [(42, Decimal("1.5"))]


def test_invalid_literal_rejected(payments: RunningProxy) -> None:
    with psycopg.connect(payments.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("INSERT INTO payments (amount_cents) VALUES ('forty')")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("INSERT INTO payments (amount_cents) VALUES (%s)", ("forty",))
    assert payments.direct("SELECT count(*) FROM payments") == [(0,)]
