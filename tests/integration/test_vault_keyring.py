"""A proxy with a Vault Transit keyring, on OpenBao and a real PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.vault import VaultTransitKeyring
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.sealing import assert_sealed

StartProxy = Callable[..., RunningProxy]

# The shipped rules seal two columns of oauth_tokens, so a proxy over a new
# database creates two data keys on start.
DATA_KEYS = 2
TOKENS = [(n, f"gho_access_{n:05d}", f"ghr_refresh_{n:05d}") for n in range(1, 6)]


@pytest.fixture
def oauth_db(fresh_db: str, pg_cluster: PgServer) -> str:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    return fresh_db


@pytest.fixture
def sodium_spec(tmp_path: Path) -> str:
    keydir = tmp_path / "backup-keys"
    SodiumKeyring.create(keydir)
    return f"sodium:{keydir}"


def vault_keyring(running: RunningProxy) -> VaultTransitKeyring:
    (keyring,) = [
        k for k in running.proxy.keyrings if isinstance(k, VaultTransitKeyring)
    ]
    return keyring


def insert_tokens(running: RunningProxy) -> None:
    with (
        psycopg.connect(running.dsn(), autocommit=True) as conn,
        conn.cursor() as cursor,
    ):
        cursor.executemany(
            "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            "VALUES (%s, %s, %s)",
            TOKENS,
        )


def read_tokens(running: RunningProxy) -> list[tuple[int, str, str]]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
            "ORDER BY user_id"
        ).fetchall()
    return [(int(user), str(access), str(refresh)) for user, access, refresh in rows]


def test_vault_round_trip(
    oauth_db: str, transit_key: str, start_proxy: StartProxy
) -> None:
    running = start_proxy(oauth_db, keyrings=[f"vault-transit:{transit_key}"])
    insert_tokens(running)

    assert read_tokens(running) == TOKENS
    stored = running.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    for (access, refresh), (_, access_plain, refresh_plain) in zip(stored, TOKENS):
        assert_sealed(access, access_plain)
        assert_sealed(refresh, refresh_plain)


def test_wrapped_keys_name_vault(
    oauth_db: str, transit_key: str, start_proxy: StartProxy
) -> None:
    running = start_proxy(oauth_db, keyrings=[f"vault-transit:{transit_key}"])
    wrapped = running.direct("SELECT keyring, wrapped FROM pgseal.wrapped_keys")
    assert len(wrapped) == DATA_KEYS
    for keyring, blob in wrapped:
        assert keyring == f"vault-transit:{transit_key}"
        assert bytes(blob).startswith(b"vault:v1:")
    assert vault_keyring(running).operations["encrypt"] == DATA_KEYS


def test_cold_proxy_decrypts_once_per_key(
    oauth_db: str, transit_key: str, start_proxy: StartProxy
) -> None:
    spec = f"vault-transit:{transit_key}"
    writer = start_proxy(oauth_db, keyrings=[spec])
    insert_tokens(writer)

    reader = start_proxy(oauth_db, keyrings=[spec])
    assert read_tokens(reader) == TOKENS
    assert read_tokens(reader) == TOKENS
    keyring = vault_keyring(reader)
    assert keyring.operations["decrypt"] == DATA_KEYS
    assert keyring.operations["encrypt"] == 0
    assert reader.proxy.keystore.unwrap_calls == DATA_KEYS


def test_vault_down_reads_through_backup(
    oauth_db: str,
    transit_key: str,
    sodium_spec: str,
    start_proxy: StartProxy,
    closed_vault_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vault_spec = f"vault-transit:{transit_key}"
    writer = start_proxy(oauth_db, keyrings=[vault_spec, sodium_spec])
    insert_tokens(writer)
    monkeypatch.setenv("VAULT_ADDR", closed_vault_address)

    reader = start_proxy(oauth_db, keyrings=[vault_spec, sodium_spec])
    assert read_tokens(reader) == TOKENS
    assert vault_keyring(reader).operations["decrypt"] == DATA_KEYS
    sodium_name = reader.proxy.keyrings[1].name
    assert reader.proxy.keystore.unwrap_calls_by_keyring[sodium_name] == DATA_KEYS


def test_stop_logs_vault_calls(
    oauth_db: str,
    transit_key: str,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.app")
    spec = f"vault-transit:{transit_key}"
    running = start_proxy(oauth_db, keyrings=[spec])
    running.run(running.proxy.stop())

    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.app"]
    assert f"keyring {spec}: 0 unwrap calls, 2 Vault calls (encrypt 2)" in messages
