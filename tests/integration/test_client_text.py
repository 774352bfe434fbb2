"""Values as the server would read them: binary parameters, escapes, encodings.

Each test writes the same value to an encrypted column and to a plain one,
so the plain column shows what the server itself stores for it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

RULES = """\
tables:
  - name: public.customers
    columns:
      - name: email
        encryption: deterministic
      - name: notes
        encryption: randomized
"""
TABLE = """
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text,
    email text,
    notes text,
    note_plain text
)
"""


@pytest.fixture
def customers(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "customers.yaml").write_text(RULES)
    return start_proxy(fresh_db, rules)


def _read(conn: psycopg.Connection, name: str) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT email, notes, note_plain FROM customers WHERE name = %s", (name,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def _stored(proxy: RunningProxy, name: str) -> tuple[Any, ...]:
    rows = proxy.direct("SELECT email, notes FROM customers WHERE name = %s", (name,))
    assert len(rows) == 1
    return rows[0]


# Binary parameters of non-text types


BINARY_VALUES = [
    (12345678, "12345678"),
    (30000, "30000"),
    (-2**40, "-1099511627776"),
    (True, "true"),
    (1.5, "1.5"),
    (1e20, "1e+20"),
    (Decimal("1.50"), "1.50"),
    (dt.date(2024, 1, 2), "2024-01-02"),
    (dt.datetime(2024, 1, 2, 3, 4, 5, 120000), "2024-01-02 03:04:05.12"),
    (uuid.UUID(int=0x1234567890), "00000000-0000-0000-0000-001234567890"),
    (b"\x01\xff", "\\x01ff"),
]


@pytest.mark.parametrize(("value", "text"), BINARY_VALUES, ids=lambda v: repr(v)[:24])
def test_binary_parameter_stored_as_text(
    customers: RunningProxy, value: object, text: str
) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (name, email, notes, note_plain) "
            "VALUES ('b', %b, %b, %b)",
            (value, value, value),
        )
        read = _read(conn, "b")
        found = conn.execute(
            "SELECT count(*) FROM customers WHERE email = %t", (text,)
        ).fetchone()
    assert read == (text, text, text)
    assert found == (1,)
    email, notes = _stored(customers, "b")
    assert_sealed(email, text)
    assert_sealed(notes, text)


def test_binary_timestamptz_in_session_time_zone(customers: RunningProxy) -> None:
    moment = dt.datetime(2024, 7, 2, 3, 4, 5, tzinfo=dt.UTC)
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute(
            "INSERT INTO customers (name, notes, note_plain) VALUES ('tz', %b, %b)",
            (moment, moment),
        )
        read = _read(conn, "tz")
    assert read == (None, "2024-07-02 08:34:05+05:30", "2024-07-02 08:34:05+05:30")
    assert_sealed(_stored(customers, "tz")[1], "08:34:05")


def test_binary_int_matches_text_lookup(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (name, email) VALUES ('t', %t)", ("12345678",)
        )
        found = conn.execute(
            "SELECT name FROM customers WHERE email = %b", (12345678,)
        ).fetchall()
    assert found == [("t",)]


def test_binary_interval_rejected(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as raised:
            conn.execute(
                "INSERT INTO customers (name, notes) VALUES ('i', %b)",
                (dt.timedelta(days=1),),
            )
        after = conn.execute("SELECT 'after'").fetchone()
    assert raised.value.sqlstate == "0A000"
    assert "interval" in str(raised.value)
    assert raised.value.diag.message_hint
    assert after == ("after",)
    assert customers.direct("SELECT count(*) FROM customers") == [(0,)]


def test_binary_date_rejected_outside_iso(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("SET DateStyle = 'German'")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as raised:
            conn.execute(
                "INSERT INTO customers (name, notes) VALUES ('d', %b)",
                (dt.date(2024, 1, 2),),
            )
        conn.execute("SET DateStyle = 'ISO, DMY'")
        conn.execute(
            "INSERT INTO customers (name, notes) VALUES ('d', %b)",
            (dt.date(2024, 1, 2),),
        )
        read = _read(conn, "d")
    assert "DateStyle" in str(raised.value)
    assert read == (None, "2024-01-02", None)
    assert customers.direct("SELECT count(*) FROM customers") == [(1,)]


# standard_conforming_strings


def test_backslash_literals_with_scs_off(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        conn.execute(
            "INSERT INTO customers (name, notes, email, note_plain) "
            "VALUES ('s1', 'a\\\\b\\tc', 'a\\\\b@scs', 'a\\\\b\\tc')"
        )
        read = _read(conn, "s1")
        found = conn.execute(
            "SELECT name FROM customers WHERE email = 'a\\\\b@scs'"
        ).fetchall()
    assert read == ("a\\b@scs", "a\\b\tc", "a\\b\tc")
    assert found == [("s1",)]
    email, notes = _stored(customers, "s1")
    assert_sealed(email, "@scs")
    assert_sealed(notes, "a\\b")


def test_escaped_quote_with_scs_off_seals_value(customers: RunningProxy) -> None:
    # With the setting off, '\', ' is one constant, so 'secret-x' is notes.
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        conn.execute(
            "INSERT INTO customers (name, note_plain, notes) "
            "VALUES ('s2', '\\', ', 'secret-x')"
        )
        read = _read(conn, "s2")
    assert read == (None, "secret-x", "', ")
    assert_sealed(_stored(customers, "s2")[1], "secret-x")


def test_escape_string_literal(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (name, notes, note_plain) "
            "VALUES ('e1', E'x\\ty\\\\z\\'q', E'x\\ty\\\\z\\'q')"
        )
        read = _read(conn, "e1")
    assert read == (None, "x\ty\\z'q", "x\ty\\z'q")
    assert_sealed(_stored(customers, "e1")[1], "x\ty")


# client_encoding


def test_latin1_client_round_trip(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("SET client_encoding = 'LATIN1'")
        conn.execute(
            "INSERT INTO customers (name, notes, email, note_plain) "
            "VALUES ('l1', 'été', 'é@lat', 'été')"
        )
        conn.execute(
            "INSERT INTO customers (name, notes, email, note_plain) "
            "VALUES ('l2', %s, %s, %s)",
            ("çà", "ç@lat", "çà"),
        )
        first = _read(conn, "l1")
        second = _read(conn, "l2")
        by_literal = conn.execute(
            "SELECT name FROM customers WHERE email = 'é@lat'"
        ).fetchall()
        by_param = conn.execute(
            "SELECT name FROM customers WHERE email = %s", ("ç@lat",)
        ).fetchall()
    assert first == ("é@lat", "été", "été")
    assert second == ("ç@lat", "çà", "çà")
    assert by_literal == [("l1",)]
    assert by_param == [("l2",)]
    assert customers.direct("SELECT note_plain FROM customers ORDER BY name") == [
        ("été",),
        ("çà",),
    ]
    email, notes = _stored(customers, "l1")
    assert_sealed(email, "@lat")
    assert_sealed(notes, "été")


@pytest.mark.parametrize(
    "statement",
    [
        b"INSERT INTO customers (name, notes) VALUES ('ib', 'bad\xff\xfebytes')",
        b"INSERT INTO customers (name, notes) VALUES ('ib', '\xe9t\xe9')",
    ],
    ids=["invalid", "latin1-bytes"],
)
def test_invalid_utf8_rejected(customers: RunningProxy, statement: bytes) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as raised:
            conn.execute(statement)
        after = conn.execute("SELECT 'after'").fetchone()
    assert raised.value.sqlstate == "22021"
    assert raised.value.diag.message_hint
    assert after == ("after",)
    assert customers.direct("SELECT count(*) FROM customers") == [(0,)]
