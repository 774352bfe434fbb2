"""Statements the proxy rejects: the SQLSTATE, the message, and nothing written."""

from __future__ import annotations

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy

SEED = "seed-token-7Hq2"

REJECTED = [
    ("SELECT id FROM oauth_tokens WHERE access_token LIKE 'gho%'", "LIKE"),
    ("SELECT id FROM oauth_tokens WHERE access_token > 'a'", "operator >"),
    ("SELECT id FROM oauth_tokens ORDER BY access_token", "ORDER BY"),
    ("SELECT access_token || 'x' FROM oauth_tokens", "ciphertext"),
    ("SELECT length(access_token) FROM oauth_tokens", "function length()"),
    ("SELECT id FROM oauth_tokens WHERE access_token = 'x'", "randomized"),
    ("SELECT DISTINCT access_token FROM oauth_tokens", "DISTINCT"),
    ("SELECT access_token FROM oauth_tokens GROUP BY access_token", "GROUP BY"),
    ("INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, upper('plain'))", "computed"),
    ("INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, 'a' || 'b')", "computed"),
    (
        "INSERT INTO oauth_tokens (user_id, access_token) SELECT 2, provider FROM oauth_tokens",
        "INSERT ... SELECT",
    ),
    (
        "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, 'plain'::varchar(8))",
        "length",
    ),
    ("UPDATE oauth_tokens SET access_token = 'plain'::char", "length"),
    ("UPDATE oauth_tokens SET access_token = provider", "computed"),
    ("UPDATE oauth_tokens SET access_token = access_token || 'x'", "computed"),
    (
        "WITH moved AS (UPDATE oauth_tokens SET refresh_token = lower('x') RETURNING id) "
        "SELECT * FROM moved",
        "computed",
    ),
    ("COPY oauth_tokens FROM '/tmp/pgseal-never.csv'", "server file"),
    ("DO $$ BEGIN UPDATE oauth_tokens SET access_token = 'plain'; END $$", "DO block"),
    (
        "MERGE INTO oauth_tokens t USING (VALUES (1)) v(x) ON t.user_id = v.x "
        "WHEN MATCHED THEN UPDATE SET access_token = 'plain'",
        "MERGE",
    ),
]


@pytest.fixture
def seeded(oauth_proxy: RunningProxy) -> RunningProxy:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)", (SEED,)
        )
    return oauth_proxy


def _table(proxy: RunningProxy) -> list[tuple[object, ...]]:
    return proxy.direct("SELECT * FROM oauth_tokens ORDER BY id")


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(("sql", "reason"), REJECTED, ids=[r[1] for r in REJECTED])
def test_rejected_statement(seeded: RunningProxy, sql: str, reason: str, protocol: str) -> None:
    before = _table(seeded)
    with psycopg.connect(seeded.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql, prepare=False if protocol == "simple" else None)
        # The connection stays usable after the rejection.
        (count,) = conn.execute("SELECT count(*) FROM oauth_tokens").fetchone() or ()
    assert info.value.sqlstate == "0A000"
    assert reason in info.value.diag.message_primary
    assert "oauth_tokens" in info.value.diag.message_primary
    assert info.value.diag.message_hint
    assert count == 1
    assert _table(seeded) == before


def test_rejection_in_transaction_aborts_it(seeded: RunningProxy) -> None:
    with psycopg.connect(seeded.dsn()) as conn:
        conn.execute("INSERT INTO oauth_tokens (user_id, access_token) VALUES (2, 'in-tx')")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT id FROM oauth_tokens WHERE access_token = 'x'")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
    assert seeded.direct("SELECT count(*) FROM oauth_tokens") == [(1,)]
