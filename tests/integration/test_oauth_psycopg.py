"""OAuth token columns through the proxy with psycopg, checked on both sides."""

from __future__ import annotations

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

LONG_TOKEN = "gho_" + "Zq8xLm3Kp9" * 12
NON_ASCII = "jeton-żółć-トークン-🔑"


def _insert(conn: psycopg.Connection, user_id: int, access: str | None, *, binary: bool) -> None:
    placeholder = "%b" if binary else "%s"
    conn.execute(
        f"INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
        f"VALUES ({placeholder}, {placeholder}, {placeholder})",
        (user_id, access, access),
    )


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_insert_parameters_sealed(oauth_proxy: RunningProxy, binary: bool) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        _insert(conn, 1, LONG_TOKEN, binary=binary)
        rows = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens", binary=binary
        ).fetchall()
    assert rows == [(LONG_TOKEN, LONG_TOKEN)]
    ((stored_access, stored_refresh),) = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens"
    )
    assert_sealed(stored_access, LONG_TOKEN)
    assert_sealed(stored_refresh, LONG_TOKEN)
    assert stored_access != stored_refresh


@pytest.mark.parametrize(
    "value",
    ["", NON_ASCII, "x" * 65536],
    ids=["empty", "non-ascii", "64KiB"],
)
def test_round_trip_values(oauth_proxy: RunningProxy, value: str) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        _insert(conn, 7, value, binary=False)
        (read,) = conn.execute("SELECT access_token FROM oauth_tokens").fetchone() or ()
    assert read == value
    ((stored,),) = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert stored != value
    assert_sealed(stored, value)


def test_null_stays_null(oauth_proxy: RunningProxy) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        _insert(conn, 3, None, binary=False)
        row = conn.execute("SELECT access_token, refresh_token FROM oauth_tokens").fetchone()
    assert row == (None, None)
    assert oauth_proxy.direct("SELECT access_token IS NULL FROM oauth_tokens") == [(True,)]


def test_multi_row_insert_returning(oauth_proxy: RunningProxy) -> None:
    tokens = [f"tok-multi-{i}-{LONG_TOKEN}" for i in range(3)]
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        returned = conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES "
            "(1, %s), (2, %s), (3, %s) RETURNING user_id, access_token AS token",
            tokens,
        ).fetchall()
    assert returned == [(1, tokens[0]), (2, tokens[1]), (3, tokens[2])]
    stored = oauth_proxy.direct("SELECT access_token FROM oauth_tokens ORDER BY user_id")
    for (value,), token in zip(stored, tokens):
        assert_sealed(value, token)


def test_update_seals_new_value(oauth_proxy: RunningProxy) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        _insert(conn, 4, "old-token-value", binary=False)
        updated = conn.execute(
            "UPDATE oauth_tokens SET access_token = %s WHERE user_id = %s "
            "RETURNING access_token",
            ("rotated-" + LONG_TOKEN, 4),
        ).fetchall()
        read = conn.execute("SELECT access_token FROM oauth_tokens").fetchall()
    assert updated == [("rotated-" + LONG_TOKEN,)]
    assert read == [("rotated-" + LONG_TOKEN,)]
    ((stored,),) = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, "rotated-" + LONG_TOKEN)


def test_literals_sealed_in_simple_protocol(oauth_proxy: RunningProxy) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            f"VALUES (1, '{NON_ASCII}', E'line\\nbreak'), (2, 'it''s-{LONG_TOKEN}', NULL)",
            prepare=False,
        )
        conn.execute("UPDATE oauth_tokens SET refresh_token = 'updated-literal' WHERE user_id = 2")
        rows = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
    assert rows == [(NON_ASCII, "line\nbreak"), (f"it's-{LONG_TOKEN}", "updated-literal")]
    stored = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    assert_sealed(stored[0][0], NON_ASCII)
    assert_sealed(stored[0][1], "line\nbreak")
    assert_sealed(stored[1][0], LONG_TOKEN)
    assert_sealed(stored[1][1], "updated-literal")


def test_wrong_password_rejected(oauth_proxy: RunningProxy) -> None:
    with pytest.raises(psycopg.OperationalError) as direct:
        psycopg.connect(oauth_proxy.direct_dsn().replace(
            oauth_proxy.server.password, "wrong-password"))
    with pytest.raises(psycopg.OperationalError) as proxied:
        psycopg.connect(oauth_proxy.dsn(password="wrong-password"))
    # The messages differ only in the port that each names.
    direct_reason = str(direct.value).rsplit("failed: ", 1)[1]
    proxied_reason = str(proxied.value).rsplit("failed: ", 1)[1]
    assert "password authentication failed" in proxied_reason
    assert proxied_reason == direct_reason


def test_ciphertext_copied_to_plain_column_stays_sealed(oauth_proxy: RunningProxy) -> None:
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        _insert(conn, 9, "copied-secret", binary=False)
    oauth_proxy.direct("UPDATE oauth_tokens SET provider = access_token RETURNING 1")
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        (provider,) = conn.execute("SELECT provider FROM oauth_tokens").fetchone() or ()
    assert provider.startswith("pgs:")
    assert "copied-secret" not in provider
