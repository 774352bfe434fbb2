"""Deterministic columns: equality search, uniqueness and grouping on ciphertext."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
      - name: api_key
        encryption: randomized
"""
TABLE = """
CREATE TABLE customers (
    id serial PRIMARY KEY,
    email text UNIQUE,
    api_key text,
    plan text
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


def _seed(conn: psycopg.Connection) -> None:
    for email, plan in [("ada@example.com", "pro"), ("bob@example.com", "free"),
                        ("cy@example.com", "pro")]:
        conn.execute(
            "INSERT INTO customers (email, api_key, plan) VALUES (%s, %s, %s)",
            (email, "key-" + email, plan),
        )


def test_equality_with_parameter(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        _seed(conn)
        rows = conn.execute(
            "SELECT email, api_key FROM customers WHERE email = %s", ("bob@example.com",)
        ).fetchall()
        binary = conn.execute(
            "SELECT id FROM customers WHERE email = %b", ("cy@example.com",)
        ).fetchall()
    assert rows == [("bob@example.com", "key-bob@example.com")]
    assert len(binary) == 1
    stored = customers.direct("SELECT email, api_key FROM customers ORDER BY id")
    assert_sealed(stored[1][0], "bob@example.com")
    assert_sealed(stored[1][1], "key-bob@example.com")


def test_equality_with_literal_and_in(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        _seed(conn)
        literal = conn.execute(
            "SELECT plan FROM customers WHERE email = 'ada@example.com'"
        ).fetchall()
        listed = conn.execute(
            "SELECT email FROM customers WHERE email IN (%s, %s) ORDER BY id",
            ("ada@example.com", "cy@example.com"),
        ).fetchall()
        missing = conn.execute(
            "SELECT email FROM customers WHERE email = %s", ("nobody@example.com",)
        ).fetchall()
    assert literal == [("pro",)]
    assert listed == [("ada@example.com",), ("cy@example.com",)]
    assert missing == []


def test_unique_constraint_on_ciphertext(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        _seed(conn)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO customers (email, plan) VALUES (%s, 'free')",
                ("ada@example.com",),
            )
        conn.execute(
            "INSERT INTO customers (email, plan) VALUES (%s, 'team') "
            "ON CONFLICT (email) DO UPDATE SET plan = EXCLUDED.plan",
            ("ada@example.com",),
        )
        plans = conn.execute(
            "SELECT plan FROM customers WHERE email = %s", ("ada@example.com",)
        ).fetchall()
    assert plans == [("team",)]
    assert customers.direct("SELECT count(*) FROM customers") == [(3,)]


def test_group_by_deterministic(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        _seed(conn)
        conn.execute(
            "INSERT INTO customers (email, plan) VALUES (NULL, 'free'), (NULL, 'pro')"
        )
        groups = conn.execute("SELECT email, count(*) FROM customers GROUP BY email")
        counts = dict(groups.fetchall())
    assert counts == {
        None: 2,
        "ada@example.com": 1,
        "bob@example.com": 1,
        "cy@example.com": 1,
    }


def test_randomized_equality_rejected(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("SELECT id FROM customers WHERE api_key = %s", ("k",))
    assert "public.customers.api_key" in str(info.value)
    assert info.value.diag.message_hint


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_equality_any_array(customers: RunningProxy, binary: bool) -> None:
    wanted = ["ada@example.com", 'cy@example.com', "nobody,\"odd\"@example.com"]
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        _seed(conn)
        placeholder = "%b" if binary else "%s"
        rows = conn.execute(
            f"SELECT email FROM customers WHERE email = ANY({placeholder}) ORDER BY id",
            (wanted,),
        ).fetchall()
        others = conn.execute(
            "SELECT email FROM customers WHERE email <> ALL(%s::text[])", (wanted,)
        ).fetchall()
    assert rows == [("ada@example.com",), ("cy@example.com",)]
    assert others == [("bob@example.com",)]


def test_any_with_literal_array_rejected(customers: RunningProxy) -> None:
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT 1 FROM customers WHERE email = ANY('{a,b}')")
