"""Tests for the bounded data key cache in proxy.crypto.keycache."""

from __future__ import annotations

import time

import pytest

from proxy.crypto.keycache import KeyCache, wipe_bytes
from proxy.crypto.values import Algorithm, DataKey

XCHACHA = Algorithm.XCHACHA20_POLY1305


def new_key(version: int, key_id: int = 1) -> DataKey:
    return DataKey.generate(key_id, version, XCHACHA)


def put_unshared(cache: KeyCache, key_id: int, version: int) -> None:
    """Put a key that nothing outside the cache refers to."""
    cache.put(new_key(version, key_id))


def test_wipe_bytes_zeroes_contents() -> None:
    data = bytes(range(1, 33))
    assert wipe_bytes(data)
    assert data == bytes(32)


def test_wipe_bytes_rejects_bytearray() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        wipe_bytes(bytearray(4))  # type: ignore[arg-type]


def test_evicted_key_wiped_when_unshared() -> None:
    cache = KeyCache(maxsize=1)
    put_unshared(cache, 1, 1)
    put_unshared(cache, 1, 2)
    assert cache.get(1, 1) is None
    assert cache.wiped == 1
    assert cache.kept == 0


def test_evicted_key_kept_when_held() -> None:
    cache = KeyCache(maxsize=1)
    held = new_key(1)
    material = bytes(held.material)
    cache.put(held)
    put_unshared(cache, 1, 2)
    assert cache.kept == 1
    assert cache.wiped == 0
    assert held.material == material


def test_expired_key_wiped_on_purge() -> None:
    cache = KeyCache(ttl=0.05)
    put_unshared(cache, 1, 1)
    time.sleep(0.1)
    cache.purge()
    assert cache.wiped == 1


def test_discard_wipes_key() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    cache.set_active("public.t.c", (1, 1))
    cache.discard(1, 1)
    assert cache.get(1, 1) is None
    assert cache.active_ref("public.t.c") is None
    assert cache.wiped == 1


def test_replaced_key_wiped() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    put_unshared(cache, 1, 1)
    assert cache.wiped == 1
    assert cache.get(1, 1) is not None


def test_same_key_put_twice_not_wiped() -> None:
    cache = KeyCache()
    key = new_key(1)
    cache.put(key)
    cache.put(key)
    assert cache.wiped == 0
    assert key.material != bytes(32)


def test_clear_wipes_all() -> None:
    cache = KeyCache()
    for version in (1, 2, 3):
        put_unshared(cache, 1, version)
    cache.clear()
    assert cache.wiped == 3


def test_limit_calls_back_once() -> None:
    cache = KeyCache(max_values_per_key=3)
    calls: list[tuple[str, tuple[int, int]]] = []
    cache.on_limit = lambda name, ref: calls.append((name, ref))
    for _ in range(7):
        cache.note_sealed("public.t.c", (1, 1))
    assert calls == [("public.t.c", (1, 1))]
    assert cache.sealed_count((1, 1)) == 7


def test_no_limit_counts_nothing() -> None:
    cache = KeyCache()
    cache.note_sealed("public.t.c", (1, 1))
    assert cache.sealed_count((1, 1)) == 0


@pytest.mark.parametrize("value", [0, -1, True])
def test_limit_must_be_positive(value: int) -> None:
    with pytest.raises((ValueError, TypeError)):
        KeyCache(max_values_per_key=value)


def test_live_refs_follow_active_and_discard() -> None:
    cache = KeyCache()
    assert cache.live_refs("public.t.c") == ()
    cache.set_active("public.t.c", (1, 1))
    assert cache.live_refs("public.t.c") == ((1, 1),)
    cache.set_active("public.t.c", (1, 2))
    assert cache.live_refs("public.t.c") == ((1, 1), (1, 2))
    cache.discard(1, 1)
    assert cache.live_refs("public.t.c") == ((1, 2),)


def test_set_live_replaces_versions() -> None:
    cache = KeyCache()
    cache.set_active("public.t.c", (1, 1))
    cache.set_live("public.t.c", ((1, 3), (1, 2)))
    assert cache.live_refs("public.t.c") == ((1, 2), (1, 3))
    cache.clear()
    assert cache.live_refs("public.t.c") == ()


STORE_ID = bytes(16)
NAME = "public.t.c"


def test_sealer_reused_between_values() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    first = cache.sealer(NAME, STORE_ID)
    assert first is not None
    assert cache.sealer(NAME, STORE_ID) is first


def test_sealer_none_without_active_key() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    assert cache.sealer(NAME, STORE_ID) is None


def test_sealer_follows_new_active_version() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    put_unshared(cache, 1, 2)
    cache.set_active(NAME, (1, 1))
    assert cache.sealer(NAME, STORE_ID) is not None
    cache.set_active(NAME, (1, 2))
    sealer = cache.sealer(NAME, STORE_ID)
    assert sealer is not None
    assert sealer.key.version == 2


def test_sealer_not_served_past_key_ttl() -> None:
    cache = KeyCache(ttl=0.05)
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    assert cache.sealer(NAME, STORE_ID) is not None
    time.sleep(0.1)
    assert cache.sealer(NAME, STORE_ID) is None
    cache.purge()
    assert cache.wiped == 1


def test_sealer_not_served_past_active_ttl() -> None:
    cache = KeyCache(active_ttl=0.05)
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    assert cache.sealer(NAME, STORE_ID) is not None
    time.sleep(0.1)
    assert cache.sealer(NAME, STORE_ID) is None


def test_opener_opens_sealed_value() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    sealer = cache.sealer(NAME, STORE_ID)
    assert sealer is not None
    blob = sealer.seal(b"token")
    opener = cache.opener(blob, NAME, STORE_ID)
    assert opener is not None
    assert opener.open(blob) == b"token"
    assert cache.opener(blob, NAME, STORE_ID) is opener


def test_opener_none_after_discard() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    sealer = cache.sealer(NAME, STORE_ID)
    assert sealer is not None
    blob = sealer.seal(b"token")
    del sealer
    assert cache.opener(blob, NAME, STORE_ID) is not None
    cache.discard(1, 1)
    assert cache.opener(blob, NAME, STORE_ID) is None
    assert cache.sealer(NAME, STORE_ID) is None


def test_key_with_ciphers_wiped_on_eviction() -> None:
    # The ciphers refer to the key, so they must go before the wipe check.
    cache = KeyCache(maxsize=1)
    put_unshared(cache, 1, 1)
    cache.set_active(NAME, (1, 1))
    sealer = cache.sealer(NAME, STORE_ID)
    assert sealer is not None
    blob = sealer.seal(b"token")
    del sealer
    assert cache.opener(blob, NAME, STORE_ID) is not None
    put_unshared(cache, 1, 2)
    assert cache.wiped == 1
    assert cache.kept == 0


def test_version_sealer_for_older_version() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    put_unshared(cache, 1, 2)
    cache.set_active(NAME, (1, 2))
    older = cache.version_sealer((1, 1), NAME, STORE_ID)
    assert older is not None
    assert older.key.version == 1
    assert cache.version_sealer((1, 1), NAME, STORE_ID) is older


def test_version_sealer_none_after_discard() -> None:
    cache = KeyCache()
    put_unshared(cache, 1, 1)
    assert cache.version_sealer((1, 1), NAME, STORE_ID) is not None
    cache.discard(1, 1)
    assert cache.version_sealer((1, 1), NAME, STORE_ID) is None
