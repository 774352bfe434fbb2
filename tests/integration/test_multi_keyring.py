"""A proxy with an AWS KMS keyring and a sodium backup, on moto and a real server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.app import Proxy, ProxySettings
from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.kms import AwsKmsKeyring
from proxy.errors import KeyringError
from proxy.server import Upstream
from tests.fixtures.kms import KmsKey
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, SHIPPED_RULES, RunningProxy
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


def kms_keyring(running: RunningProxy) -> AwsKmsKeyring:
    (keyring,) = [k for k in running.proxy.keyrings if isinstance(k, AwsKmsKeyring)]
    return keyring


def insert_tokens(running: RunningProxy, rows: list[tuple[int, str, str]]) -> None:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
                "VALUES (%s, %s, %s)",
                rows,
            )


def read_tokens(running: RunningProxy) -> list[tuple[int, str, str]]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
            "ORDER BY user_id"
        ).fetchall()
    return [(int(user), str(access), str(refresh)) for user, access, refresh in rows]


def assert_stored_sealed(
    running: RunningProxy, rows: list[tuple[int, str, str]]
) -> None:
    stored = running.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    assert len(stored) == len(rows)
    for (access, refresh), (_, access_plain, refresh_plain) in zip(stored, rows):
        assert_sealed(access, access_plain)
        assert_sealed(refresh, refresh_plain)


def test_kms_and_sodium_round_trip(
    oauth_db: str, kms_key: KmsKey, sodium_spec: str, start_proxy: StartProxy
) -> None:
    running = start_proxy(oauth_db, keyrings=[f"aws-kms:{kms_key.arn}", sodium_spec])
    insert_tokens(running, TOKENS)

    assert read_tokens(running) == TOKENS
    assert_stored_sealed(running, TOKENS)


def test_wrapped_once_per_keyring(
    oauth_db: str, kms_key: KmsKey, sodium_spec: str, start_proxy: StartProxy
) -> None:
    running = start_proxy(oauth_db, keyrings=[f"aws-kms:{kms_key.alias}", sodium_spec])
    names = {keyring.name for keyring in running.proxy.keyrings}

    data_keys = running.direct("SELECT key_id, version FROM pgseal.data_keys")
    wrapped = running.direct(
        "SELECT key_id, version, keyring FROM pgseal.wrapped_keys ORDER BY keyring"
    )
    assert len(data_keys) == DATA_KEYS
    assert len(wrapped) == DATA_KEYS * len(names)
    for key_id, version in data_keys:
        rings = {ring for k, v, ring in wrapped if (k, v) == (key_id, version)}
        assert rings == names
    assert f"aws-kms:{kms_key.alias}" in names


def test_kms_copy_alone_unwraps(
    oauth_db: str, kms_key: KmsKey, sodium_spec: str, start_proxy: StartProxy
) -> None:
    writer = start_proxy(oauth_db, keyrings=[sodium_spec, f"aws-kms:{kms_key.key_id}"])
    insert_tokens(writer, TOKENS)

    reader = start_proxy(oauth_db, keyrings=[f"aws-kms:{kms_key.key_id}"])
    assert read_tokens(reader) == TOKENS
    assert reader.proxy.keystore.unwrap_calls == DATA_KEYS
    assert kms_keyring(reader).operations["Decrypt"] == DATA_KEYS


def test_kms_down_reads_through_backup(
    oauth_db: str,
    kms_key: KmsKey,
    sodium_spec: str,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    closed_kms_endpoint: str,
) -> None:
    kms_spec = f"aws-kms:{kms_key.key_id}"
    writer = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    insert_tokens(writer, TOKENS)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", closed_kms_endpoint)

    reader = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    keyring = kms_keyring(reader)
    assert keyring.endpoint_url == closed_kms_endpoint
    assert read_tokens(reader) == TOKENS
    assert keyring.operations["Decrypt"] == DATA_KEYS
    sodium_name = reader.proxy.keyrings[1].name
    assert reader.proxy.keystore.unwrap_calls_by_keyring[sodium_name] == DATA_KEYS


def test_kms_down_creates_no_key(
    oauth_db: str,
    pg_cluster: PgServer,
    kms_key: KmsKey,
    sodium_spec: str,
    proxy_loop: asyncio.AbstractEventLoop,
    closed_kms_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", closed_kms_endpoint)
    settings = ProxySettings(
        listen_host="127.0.0.1",
        listen_port=0,
        upstream=Upstream.parse(pg_cluster.dsn(oauth_db)),
        rules_dir=SHIPPED_RULES,
        keyrings=(sodium_spec, f"aws-kms:{kms_key.key_id}"),
    )
    proxy = Proxy(settings)
    try:
        with pytest.raises(KeyringError) as info:
            asyncio.run_coroutine_threadsafe(proxy.start(), proxy_loop).result(60)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop(), proxy_loop).result(30)

    message = str(info.value)
    assert f"aws-kms:{kms_key.key_id}" in message
    assert "failed to wrap" in message
    with psycopg.connect(pg_cluster.dsn(oauth_db), autocommit=True) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pgseal.data_keys), "
            "(SELECT count(*) FROM pgseal.wrapped_keys)"
        ).fetchone()
    assert counts == (0, 0)


@pytest.mark.slow
def test_kms_called_per_data_key(
    oauth_db: str, kms_key: KmsKey, sodium_spec: str, start_proxy: StartProxy
) -> None:
    kms_spec = f"aws-kms:{kms_key.key_id}"
    writer = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    # 5,000 rows with two sealed columns each: 10,000 sealed values.
    rows = [(n, f"access-{n:05d}", f"refresh-{n:05d}") for n in range(5000)]
    insert_tokens(writer, rows)
    assert read_tokens(writer) == rows

    writer_kms = kms_keyring(writer)
    created = writer.direct("SELECT count(*) FROM pgseal.data_keys")
    assert created == [(DATA_KEYS,)]
    assert writer_kms.operations["Encrypt"] == DATA_KEYS
    assert writer_kms.operations["Decrypt"] == 0
    assert writer_kms.calls == DATA_KEYS

    # A second proxy from cold opens all 10,000 values with one Decrypt per key.
    reader = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    assert read_tokens(reader) == rows
    reader_kms = kms_keyring(reader)
    assert reader_kms.operations["Decrypt"] == DATA_KEYS
    assert reader_kms.operations["Encrypt"] == 0
    assert reader.proxy.keystore.unwrap_calls == reader_kms.operations["Decrypt"]


def test_stop_logs_keyring_calls(
    oauth_db: str,
    kms_key: KmsKey,
    sodium_spec: str,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.app")
    kms_spec = f"aws-kms:{kms_key.key_id}"
    running = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    running.run(running.proxy.stop())

    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.app"]
    assert f"keyring {kms_spec}: 0 unwrap calls, 2 KMS calls (Encrypt 2)" in messages
    sodium_name = running.proxy.keyrings[1].name
    assert f"keyring {sodium_name}: 0 unwrap calls" in messages


@pytest.mark.slow
def test_kms_called_per_key_100k(
    oauth_db: str, kms_key: KmsKey, sodium_spec: str, start_proxy: StartProxy
) -> None:
    kms_spec = f"aws-kms:{kms_key.key_id}"
    writer = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    # 50,000 rows with two sealed columns each, copied through the proxy in
    # one COPY FROM STDIN: 100,000 sealed values.
    rows = [(n, f"access-{n:06d}", f"refresh-{n:06d}") for n in range(50_000)]
    with psycopg.connect(writer.dsn(), autocommit=True) as conn:
        copy_sql = "COPY oauth_tokens (user_id, access_token, refresh_token) FROM STDIN"
        with conn.cursor().copy(copy_sql) as copy:
            for row in rows:
                copy.write_row(row)

    writer_kms = kms_keyring(writer)
    assert writer.direct("SELECT count(*) FROM pgseal.data_keys") == [(DATA_KEYS,)]
    assert writer_kms.operations["Encrypt"] == DATA_KEYS
    assert writer_kms.operations["Decrypt"] == 0
    assert writer_kms.calls == DATA_KEYS
    assert_stored_sealed(writer, rows)

    reader = start_proxy(oauth_db, keyrings=[kms_spec, sodium_spec])
    assert read_tokens(reader) == rows
    reader_kms = kms_keyring(reader)
    assert reader_kms.operations["Decrypt"] == DATA_KEYS
    assert reader_kms.calls == DATA_KEYS
