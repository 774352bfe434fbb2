"""Tests for the data-key store in proxy.crypto.keystore, on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from proxy.crypto.keyring import Keyring, SodiumKeyring
from proxy.crypto.keystore import KeyCache, KeyStore
from proxy.crypto.values import Algorithm, DataKey, open_sealed, seal
from proxy.errors import ConfigError, KeyringError, KeyStoreError
from tests.fixtures.postgres import PgServer

XCHACHA = Algorithm.XCHACHA20_POLY1305
SIV = Algorithm.AES_256_SIV
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
    return store


def fresh_store(pool: Pool, keyrings: Sequence[Keyring]) -> KeyStore:
    """A second KeyStore on the same database with an empty cache."""
    return KeyStore(pool, keyrings, KeyCache())


async def count_rows(pool: Pool, table: str) -> int:
    count: int = await pool.fetchval(f"SELECT count(*) FROM pgseal.{table}")
    return count


async def test_setup_idempotent(pool: Pool, keyring: SodiumKeyring) -> None:
    first = KeyStore(pool, [keyring])
    await first.setup()
    second = KeyStore(pool, [keyring])
    await second.setup()
    await second.setup()
    assert len(first.store_id) == 16
    assert second.store_id == first.store_id
    assert await count_rows(pool, "key_store") == 1


async def test_setup_concurrent(dsn: str, keyring: SodiumKeyring) -> None:
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(4)]
    try:
        stores = [KeyStore(pool, [keyring]) for pool in pools]
        await asyncio.gather(*(store.setup() for store in stores))
        assert len({store.store_id for store in stores}) == 1
        assert await count_rows(pools[0], "key_store") == 1
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))


async def test_store_id_before_setup(pool: Pool, keyring: SodiumKeyring) -> None:
    store = KeyStore(pool, [keyring])
    with pytest.raises(KeyStoreError, match="setup"):
        store.store_id


def test_keystore_needs_keyring(keyring: SodiumKeyring) -> None:
    with pytest.raises(ConfigError, match="at least one keyring"):
        KeyStore(None, [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="distinct"):
        KeyStore(None, [keyring, keyring])  # type: ignore[arg-type]


async def test_active_key_created_once(pool: Pool, store: KeyStore) -> None:
    first = await store.active_key("public.users.email", XCHACHA)
    second = await store.active_key("public.users.email", XCHACHA)
    assert first == second
    assert first.version == 1
    assert first.algorithm is XCHACHA
    assert await count_rows(pool, "key_names") == 1
    assert await count_rows(pool, "data_keys") == 1
    assert await count_rows(pool, "wrapped_keys") == 1


async def test_active_key_seen_by_other_store(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    created = await store.active_key("public.users.email", SIV)
    other = fresh_store(pool, [keyring])
    await other.setup()
    assert await other.active_key("public.users.email", SIV) == created
    assert other.unwrap_calls == 1


async def test_active_key_per_name(store: KeyStore) -> None:
    email = await store.active_key("public.users.email", XCHACHA)
    phone = await store.active_key("public.users.phone", XCHACHA)
    assert email.key_id != phone.key_id
    assert email.material != phone.material


async def test_active_key_algorithm_conflict(store: KeyStore) -> None:
    await store.active_key("public.users.email", XCHACHA)
    with pytest.raises(KeyStoreError, match="XCHACHA20_POLY1305, not AES_256_SIV"):
        await store.active_key("public.users.email", SIV)


async def test_active_key_concurrent_processes(
    dsn: str, keyring: SodiumKeyring
) -> None:
    # Separate pools and stores stand in for separate proxy processes.
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(8)]
    try:
        stores = [KeyStore(pool, [keyring]) for pool in pools]
        await asyncio.gather(*(store.setup() for store in stores))
        keys = await asyncio.gather(
            *(store.active_key("public.users.email", XCHACHA) for store in stores)
        )
        assert len({key.material for key in keys}) == 1
        assert {(key.key_id, key.version) for key in keys} == {(keys[0].key_id, 1)}
        assert await count_rows(pools[0], "key_names") == 1
        assert await count_rows(pools[0], "data_keys") == 1
        assert await count_rows(pools[0], "wrapped_keys") == 1
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))


async def test_get_key_unwraps_once(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    created = await store.active_key("public.users.email", XCHACHA)
    assert store.unwrap_calls == 0

    other = fresh_store(pool, [keyring])
    await other.setup()
    first = await other.get_key(created.key_id, created.version)
    assert other.unwrap_calls == 1
    second = await other.get_key(created.key_id, created.version)
    assert other.unwrap_calls == 1
    assert first == created
    assert second == created


async def test_get_key_concurrent_unwraps_once(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    created = await store.active_key("public.users.email", XCHACHA)
    other = fresh_store(pool, [keyring])
    await other.setup()
    keys = await asyncio.gather(
        *(other.get_key(created.key_id, created.version) for _ in range(10))
    )
    assert all(key == created for key in keys)
    assert other.unwrap_calls == 1


async def test_get_key_missing(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="data key 99 version 1 not found"):
        await store.get_key(99, 1)


async def test_wrapped_bytes_hide_data_key(pool: Pool, store: KeyStore) -> None:
    key = await store.active_key("public.users.email", SIV)
    wrapped: bytes = await pool.fetchval(
        "SELECT wrapped FROM pgseal.wrapped_keys WHERE key_id = $1", key.key_id
    )
    assert key.material not in wrapped
    assert key.material[:16] not in wrapped
    assert key.material[16:32] not in wrapped
    assert key.material[32:48] not in wrapped
    assert key.material[48:] not in wrapped


async def test_other_key_pair_cannot_unwrap(
    pool: Pool, store: KeyStore, tmp_path: Path
) -> None:
    created = await store.active_key("public.users.email", XCHACHA)
    stranger = SodiumKeyring.create(tmp_path / "stranger")
    other = fresh_store(pool, [stranger])
    await other.setup()
    with pytest.raises(KeyringError) as info:
        await other.get_key(created.key_id, created.version)
    assert f"data key {created.key_id} version {created.version}" in str(info.value)
    assert other.unwrap_calls == 0


async def test_write_only_keyring_cannot_unwrap(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    created = await store.active_key("public.users.email", XCHACHA)
    write_only = SodiumKeyring(keyring.keydir, keyring.public_key)
    other = fresh_store(pool, [write_only])
    await other.setup()
    with pytest.raises(KeyringError, match="no configured keyring can unwrap"):
        await other.get_key(created.key_id, created.version)


async def test_multiple_keyrings_wrap_all(
    pool: Pool, keyring: SodiumKeyring, tmp_path: Path
) -> None:
    backup = SodiumKeyring.create(tmp_path / "backup")
    store = KeyStore(pool, [keyring, backup])
    await store.setup()
    created = await store.active_key("public.users.email", XCHACHA)
    assert await count_rows(pool, "wrapped_keys") == 2

    # Only the backup keyring has a private key, so it alone must unwrap.
    write_only = SodiumKeyring(keyring.keydir, keyring.public_key)
    other = fresh_store(pool, [write_only, backup])
    await other.setup()
    assert await other.get_key(created.key_id, created.version) == created


class FailingKeyring:
    """A keyring whose wrap() always fails, as an unreachable KMS would."""

    name = "failing:test"
    can_unwrap = True

    def wrap(self, data_key: bytes, context: str) -> bytes:
        raise KeyringError("failing keyring is unreachable")

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        raise KeyringError("failing keyring is unreachable")


async def test_wrap_failure_stores_nothing(
    pool: Pool, keyring: SodiumKeyring
) -> None:
    store = KeyStore(pool, [keyring, FailingKeyring()])
    await store.setup()
    with pytest.raises(KeyringError, match="failing:test failed to wrap"):
        await store.active_key("public.users.email", XCHACHA)
    assert await count_rows(pool, "key_names") == 0
    assert await count_rows(pool, "data_keys") == 0
    assert await count_rows(pool, "wrapped_keys") == 0


async def test_unwrap_falls_back(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    created = await store.active_key("public.users.email", XCHACHA)
    failing = FailingKeyring()
    await pool.execute(
        "INSERT INTO pgseal.wrapped_keys (key_id, version, keyring, wrapped) "
        "VALUES ($1, $2, $3, $4)",
        created.key_id,
        created.version,
        failing.name,
        b"junk",
    )
    other = fresh_store(pool, [failing, keyring])
    await other.setup()
    assert await other.get_key(created.key_id, created.version) == created
    assert other.unwrap_calls == 2


async def test_load_keys(pool: Pool, store: KeyStore, keyring: SodiumKeyring) -> None:
    email = await store.active_key("public.users.email", XCHACHA)
    phone = await store.active_key("public.users.phone", SIV)
    await store.active_key("public.users.name", XCHACHA)

    other = fresh_store(pool, [keyring])
    await other.setup()
    loaded = await other.load_keys(["public.users.email", "public.users.phone", "x"])
    assert sorted(loaded, key=lambda key: key.key_id) == [email, phone]
    assert other.unwrap_calls == 2

    assert await other.active_key("public.users.email", XCHACHA) == email
    assert other.unwrap_calls == 2


async def test_key_seals_across_stores(
    pool: Pool, store: KeyStore, keyring: SodiumKeyring
) -> None:
    key = await store.active_key("public.users.email", XCHACHA)
    blob = seal(key, b"alice@example.com", store_id=store.store_id, context="c")

    other = fresh_store(pool, [keyring])
    await other.setup()
    reloaded: DataKey = await other.get_key(key.key_id, key.version)
    opened = open_sealed(blob, reloaded, store_id=other.store_id, context="c")
    assert opened == b"alice@example.com"


async def test_refresh_keeps_keys_past_ttl(pool: Pool, keyring: SodiumKeyring) -> None:
    cache = KeyCache(ttl=0.6, active_ttl=0.6)
    store = KeyStore(pool, [keyring], cache)
    await store.setup()
    key = await store.active_key("public.t.c", Algorithm.XCHACHA20_POLY1305)
    for _ in range(4):
        await asyncio.sleep(0.3)
        await store.load_keys(["public.t.c"])
    # 1.2 s after creation, twice the cache's age limit, the key is still there.
    assert cache.get(key.key_id, key.version) == key
    assert store.unwrap_calls == 0
