"""Rotation, retirement and rewrapping in the key store, on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.crypto.keycache import KeyCache
from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.keystore import KeyStore
from proxy.crypto.keyversions import retire_versions
from proxy.crypto.rewrap import drop_keyrings, rewrap
from proxy.crypto.values import Algorithm, open_sealed, seal
from proxy.errors import KeyringError, KeyStoreError
from tests.fixtures.postgres import PgServer

XCHACHA = Algorithm.XCHACHA20_POLY1305
NAME = "public.users.note"
Pool = asyncpg.Pool  # the runtime class is not subscriptable


@pytest.fixture
def dsn(pg_cluster: PgServer, fresh_db: str) -> str:
    return pg_cluster.dsn(fresh_db)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def keyring(tmp_path: Path) -> SodiumKeyring:
    return SodiumKeyring.create(tmp_path / "keys")


@pytest.fixture
async def store(pool: Pool, keyring: SodiumKeyring) -> KeyStore:
    store = KeyStore(pool, [keyring])
    await store.setup()
    await store.active_key(NAME, XCHACHA)
    return store


async def test_rotate_creates_next_version(store: KeyStore) -> None:
    key, created = await store.rotate(NAME)
    assert created
    assert key.version == 2
    assert await store.active_key(NAME, XCHACHA) == key


async def test_rotate_unknown_name(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="has no data key"):
        await store.rotate("public.users.nope")


async def test_rotate_if_active_once_across_stores(
    dsn: str, store: KeyStore, keyring: SodiumKeyring
) -> None:
    first = await store.active_key(NAME, XCHACHA)
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=2) for _ in range(4)]
    try:
        stores = [KeyStore(pool, [keyring], KeyCache()) for pool in pools]
        await asyncio.gather(*(s.setup() for s in stores))
        results = await asyncio.gather(
            *(s.rotate(NAME, if_active=(first.key_id, 1)) for s in stores)
        )
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))
    assert sum(created for _, created in results) == 1
    assert {key.version for key, _ in results} == {2}


async def test_rotate_older_than(store: KeyStore) -> None:
    key, created = await store.rotate(NAME, older_than=3600)
    assert not created
    assert key.version == 1
    await asyncio.sleep(0.05)
    key, created = await store.rotate(NAME, older_than=0.01)
    assert created
    assert key.version == 2


async def test_retire_and_get_key(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    old = await store.active_key(NAME, XCHACHA)
    await store.rotate(NAME)
    assert await retire_versions(store, NAME, [1]) == [1]
    assert await retire_versions(store, NAME, [1]) == []

    other = KeyStore(pool, [keyring], KeyCache())
    await other.setup()
    loaded = await other.load_keys([NAME])
    assert [key.version for key in loaded] == [2]
    with pytest.raises(KeyringError, match="is retired"):
        await other.get_key(old.key_id, 1)
    retired = await other.unwrap_stored(old.key_id, 1)
    assert retired.version == 1


async def test_retire_newest_rejected(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="newest active version"):
        await retire_versions(store, NAME, [1])


async def test_retire_missing_version(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="has no version 7"):
        await retire_versions(store, NAME, [7])


async def test_load_keys_drops_retired_from_cache(store: KeyStore) -> None:
    old = await store.active_key(NAME, XCHACHA)
    await store.rotate(NAME)
    await retire_versions(store, NAME, [1])
    await store.load_keys([NAME])
    with pytest.raises(KeyringError, match="is retired"):
        await store.get_key(old.key_id, 1)


async def test_rewrap_then_drop(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring, tmp_path: Path
) -> None:
    old = await store.active_key(NAME, XCHACHA)
    sealed = seal(old, b"hello", store_id=store.store_id, context=NAME)
    new = SodiumKeyring.create(tmp_path / "new-keys")

    report = await rewrap(store, [new])
    assert len(report.added) == 1
    assert await drop_keyrings(store, [keyring.name]) == 1

    reader = KeyStore(pool, [new], KeyCache())
    await reader.setup()
    key = await reader.get_key(old.key_id, old.version)
    assert open_sealed(sealed, key, store_id=reader.store_id, context=NAME) == b"hello"


async def test_drop_only_keyring_refused(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    with pytest.raises(KeyStoreError, match="without any wrapped copy"):
        await drop_keyrings(store, [keyring.name])
    count = await pool.fetchval("SELECT count(*) FROM pgseal.wrapped_keys")
    assert count == 1


async def test_rewrap_write_only_keyring_not_verified(
    store: KeyStore, tmp_path: Path
) -> None:
    pair = SodiumKeyring.create(tmp_path / "pair")
    (tmp_path / "pair" / "private.key").unlink()
    write_only = SodiumKeyring.load(tmp_path / "pair")
    report = await rewrap(store, [write_only])
    assert [name for _, name in report.added] == [pair.name]
