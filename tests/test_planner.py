"""The key view's access to every live version of a deterministic column's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.catalog import EncryptedColumn, Storage
from proxy.crypto.keycache import KeyCache
from proxy.crypto.subjects import KeysNeeded, StoredKeyRequest, UnavailableKeys
from proxy.crypto.values import Algorithm, DataKey
from proxy.errors import KeyringError, KeyUnavailableError
from proxy.planner import KeyView
from proxy.rules import ColumnRule, Encryption, Source

STORE_ID = bytes(16)
EMAIL = EncryptedColumn(
    ColumnRule(
        "public", "accounts", "email", Encryption.DETERMINISTIC,
        Source(Path("rules/test.yaml"), 1),
    ),
    4,
    Storage.TEXT,
)
SIV = Algorithm.AES_256_SIV


def two_live_versions(*cached: int) -> KeyCache:
    """Return a cache where versions 1 and 2 are live and only `cached` are loaded."""
    cache = KeyCache()
    for version in cached:
        cache.put(DataKey.generate(1, version, SIV))
    cache.set_live(EMAIL.key_name, ((1, 1), (1, 2)))
    return cache


def test_live_sealers_oldest_first() -> None:
    view = KeyView(two_live_versions(1, 2), STORE_ID)
    sealers = view.live_sealers(EMAIL)
    assert [sealer.key.version for sealer in sealers] == [1, 2]
    assert sealers[0].seal(b"a") != sealers[1].seal(b"a")


def test_live_sealers_request_uncached_version() -> None:
    view = KeyView(two_live_versions(2), STORE_ID, unavailable=UnavailableKeys(60))
    with pytest.raises(KeysNeeded) as info:
        view.live_sealers(EMAIL)
    assert info.value.requests == (StoredKeyRequest(1, 1),)


def test_live_sealers_failed_version_unavailable() -> None:
    unavailable = UnavailableKeys(60)
    unavailable.add(StoredKeyRequest(1, 1), "KMS timed out")
    view = KeyView(two_live_versions(2), STORE_ID, unavailable=unavailable)
    with pytest.raises(KeyUnavailableError, match="KMS timed out"):
        view.live_sealers(EMAIL)


def test_live_sealers_without_fetching_unavailable() -> None:
    view = KeyView(two_live_versions(2), STORE_ID)
    with pytest.raises(KeyUnavailableError, match="version 1"):
        view.live_sealers(EMAIL)


def test_live_sealers_without_versions_rejected() -> None:
    view = KeyView(KeyCache(), STORE_ID)
    with pytest.raises(KeyringError, match="no data key"):
        view.live_sealers(EMAIL)
