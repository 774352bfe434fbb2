"""The in-memory cache of unwrapped data keys, bounded three ways.

- age: a key leaves the cache `ttl` seconds after it was put there;
- entry count: past `maxsize` keys, the least recently used one leaves;
- values sealed per key (randomized columns only): once a data key has sealed
  `max_values_per_key` values in this process, the cache calls `on_limit`,
  and the proxy then creates a new data key version for later values.

When a data key leaves the cache, the cache overwrites its material with
zeros, unless something outside the cache still refers to the key. That is a
best effort in CPython, not a guarantee: see "Key material in memory" in
docs/key-store.md for the copies it cannot reach.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

from cachetools import Cache, TTLCache

from proxy.crypto.values import HEADER_SIZE, MAGIC, DataKey, ValueCipher, read_key_ref

__all__ = ["KeyCache", "KeyRef", "wipe_bytes"]

logger = logging.getLogger(__name__)

KeyRef = tuple[int, int]
"""A data key's (key_id, version)."""

# The byte range of a sealed value's header (format, algorithm, key id, version).
_HEADER_START = len(MAGIC)
_HEADER_END = _HEADER_START + HEADER_SIZE

_Memo = tuple[ValueCipher, float]
"""A cipher and the monotonic time until which its key stays cached."""

LimitCallback = Callable[[str, KeyRef], None]

# Overwriting a bytes object in place relies on CPython's object layout, and
# the check that nothing else refers to it relies on exact reference counts,
# which the free-threaded build does not keep.
_CAN_WIPE = sys.implementation.name == "cpython" and not sysconfig.get_config_var(
    "Py_GIL_DISABLED"
)
# A bytes object stores its data at the end of the object, after a header of
# sys.getsizeof(b"") - 1 bytes (the size counts the trailing NUL byte).
_BYTES_DATA_OFFSET = sys.getsizeof(b"") - 1


class KeyCache:
    """Unwrapped data keys by (key_id, version), and each key name's active key.

    Both maps expire entries by age. The active map expires sooner, so that a
    new version made by another replica is picked up within active_ttl.

    sealer(), version_sealer() and opener() serve the per-value path. They
    keep the ciphers they built in plain dicts, each entry valid until the
    earliest expiry of the cache entries it was built from, and drop them all
    whenever a key leaves the cache or an active key changes. A lookup then
    costs one dict access, where TTLCache would take a timer and its
    bookkeeping per call.
    """

    # NOTE: the defaults are starting points, not measured.
    def __init__(
        self,
        maxsize: int = 1000,
        ttl: float = 600.0,
        active_ttl: float = 60.0,
        max_values_per_key: int | None = None,
    ) -> None:
        _check_positive("maxsize", maxsize)
        _check_positive("ttl", ttl)
        _check_positive("active_ttl", active_ttl)
        if max_values_per_key is not None:
            _check_positive("max_values_per_key", max_values_per_key)
        self._ttl = ttl
        self._active_ttl = active_ttl
        self._keys = _WipingTTLCache(maxsize, ttl)
        self._active: TTLCache[str, KeyRef] = TTLCache(maxsize, active_ttl)
        # Each key name's versions that are not retired, oldest first, as the
        # last load from the key store listed them.
        self._live: dict[str, tuple[KeyRef, ...]] = {}
        # Monotonic times by which the entries above expire, noted just
        # before each put, so they are never later than TTLCache's own.
        self._key_expiry: dict[KeyRef, float] = {}
        self._active_expiry: dict[str, float] = {}
        self._sealers: dict[tuple[str, bytes], _Memo] = {}
        self._openers: dict[tuple[bytes, str, bytes], _Memo] = {}
        self._version_sealers: dict[tuple[KeyRef, str, bytes], _Memo] = {}
        # The memos refer to data keys, so they go before the wiping cache
        # checks whether anything else still refers to a dropped key.
        self._keys.before_release = self._forget_ciphers
        self.max_values_per_key = max_values_per_key
        self.on_limit: LimitCallback | None = None
        """Called once per data key when it reaches max_values_per_key."""
        self._sealed: dict[KeyRef, int] = {}

    @property
    def wiped(self) -> int:
        """Number of evicted data keys whose material was overwritten."""
        return self._keys.wiped

    @property
    def kept(self) -> int:
        """Number of evicted data keys left intact, because others referred to them."""
        return self._keys.kept

    def get(self, key_id: int, version: int) -> DataKey | None:
        """Return the cached data key, or None if absent or expired."""
        return self._keys.get((key_id, version))

    def put(self, key: DataKey) -> None:
        ref = (key.key_id, key.version)
        self._key_expiry[ref] = time.monotonic() + self._ttl
        self._keys[ref] = key

    def discard(self, key_id: int, version: int) -> None:
        """Remove a data key, as for a retired version, and overwrite it."""
        self._active_drop((key_id, version))
        self._live_drop((key_id, version))
        self._sealed.pop((key_id, version), None)
        self._key_expiry.pop((key_id, version), None)
        self._keys.discard((key_id, version))

    def refs(self) -> list[KeyRef]:
        """Return the (key_id, version) of every cached data key."""
        return list(self._keys.keys())

    def purge(self) -> None:
        """Remove the expired data keys now rather than on the next put()."""
        self._keys.expire()

    def active_ref(self, key_name: str) -> KeyRef | None:
        """Return the cached (key_id, version) of the name's active key."""
        return self._active.get(key_name)

    def set_active(self, key_name: str, ref: KeyRef) -> None:
        if self._active.get(key_name) != ref:
            self._forget_ciphers()
        self._active_expiry[key_name] = time.monotonic() + self._active_ttl
        self._active[key_name] = ref
        live = self._live.get(key_name, ())
        if ref not in live:
            self._live[key_name] = tuple(sorted((*live, ref)))

    def live_refs(self, key_name: str) -> tuple[KeyRef, ...]:
        """Return the name's versions that are not retired, oldest first.

        A deterministic column's lookups must match values sealed under any
        of them. Without a load from the key store, only the active version
        is known.
        """
        live = self._live.get(key_name)
        if live:
            return live
        active = self._active.get(key_name)
        return (active,) if active is not None else ()

    def set_live(self, key_name: str, refs: tuple[KeyRef, ...]) -> None:
        """Record the name's versions that are not retired, from the key store."""
        self._live[key_name] = tuple(sorted(refs))

    def sealer(self, key_name: str, store_id: bytes) -> ValueCipher | None:
        """Return a cipher for the name's active key, or None if it is not cached."""
        memo = self._sealers.get((key_name, store_id))
        if memo is not None and time.monotonic() < memo[1]:
            return memo[0]
        ref = self._active.get(key_name)
        key = self._keys.get(ref) if ref is not None else None
        if ref is None or key is None:
            return None
        cipher = ValueCipher(key, store_id=store_id, context=key_name)
        until = min(self._key_expiry[ref], self._active_expiry[key_name])
        self._sealers[(key_name, store_id)] = (cipher, until)
        return cipher

    def version_sealer(
        self, ref: KeyRef, key_name: str, store_id: bytes
    ) -> ValueCipher | None:
        """Return a cipher for one version of a key name, or None if it is not cached.

        Lookups seal under every live version of a deterministic column's key,
        not only under the active one.
        """
        memo = self._version_sealers.get((ref, key_name, store_id))
        if memo is not None and time.monotonic() < memo[1]:
            return memo[0]
        key = self._keys.get(ref)
        if key is None:
            return None
        cipher = ValueCipher(key, store_id=store_id, context=key_name)
        self._version_sealers[(ref, key_name, store_id)] = (cipher, self._key_expiry[ref])
        return cipher

    def opener(self, blob: bytes, context: str, store_id: bytes) -> ValueCipher | None:
        """Return a cipher for the data key that a value's header names.

        Returns None if that key is not cached. Raises DecryptionError if
        blob is not a well-formed sealed value. The cipher checks the rest
        of the header when it opens the value.
        """
        header = blob[_HEADER_START:_HEADER_END]
        memo = self._openers.get((header, context, store_id))
        if memo is not None and time.monotonic() < memo[1]:
            return memo[0]
        ref = read_key_ref(blob)
        key = self._keys.get(ref)
        if key is None:
            return None
        cipher = ValueCipher(key, store_id=store_id, context=context)
        self._openers[(header, context, store_id)] = (cipher, self._key_expiry[ref])
        return cipher

    def note_sealed(self, key_name: str, ref: KeyRef) -> None:
        """Count one value sealed under ref, and call on_limit when it reaches the limit.

        Counts are per process and start at zero for every process, so with
        N replicas a data key may seal up to N times the limit.
        """
        limit = self.max_values_per_key
        if limit is None:
            return
        count = self._sealed.get(ref, 0) + 1
        self._sealed[ref] = count
        if count == limit and self.on_limit is not None:
            self.on_limit(key_name, ref)

    def sealed_count(self, ref: KeyRef) -> int:
        """Return the number of values this process sealed under ref."""
        return self._sealed.get(ref, 0)

    def clear(self) -> None:
        self._forget_ciphers()
        self._keys.clear()
        self._active.clear()
        self._live.clear()
        self._sealed.clear()
        self._key_expiry.clear()
        self._active_expiry.clear()

    def _forget_ciphers(self) -> None:
        self._sealers.clear()
        self._openers.clear()
        self._version_sealers.clear()

    def _live_drop(self, ref: KeyRef) -> None:
        for name, live in list(self._live.items()):
            if ref in live:
                self._live[name] = tuple(r for r in live if r != ref)

    def _active_drop(self, ref: KeyRef) -> None:
        self._forget_ciphers()
        for name, active in list(self._active.items()):
            if active == ref:
                del self._active[name]


class _WipingTTLCache(TTLCache[KeyRef, DataKey]):
    """A TTLCache that overwrites the material of each data key it drops.

    Every path that drops an entry (expiry, eviction of the least recently
    used entry, deletion, replacement, clear) first queues the dropped key.
    The public method that started it then overwrites the queued keys, once
    the cache's own code no longer refers to them, so that the reference
    check in _release_removed() counts only outside references.
    """

    def __init__(self, maxsize: int, ttl: float) -> None:
        super().__init__(maxsize, ttl)
        self._removed: list[DataKey] = []
        self.before_release: Callable[[], None] | None = None
        """Called before dropped keys are checked for outside references."""
        self.wiped = 0
        self.kept = 0

    def __setitem__(self, key: KeyRef, value: DataKey) -> None:
        if Cache.__contains__(self, key) and Cache.__getitem__(self, key) is not value:
            try:
                del self[key]
            except KeyError:
                pass  # It had expired: TTLCache deletes it and then raises.
        super().__setitem__(key, value)
        self._release_removed()

    def __delitem__(self, key: KeyRef) -> None:
        self._removed.append(Cache.__getitem__(self, key))
        super().__delitem__(key)

    def discard(self, key: KeyRef) -> None:
        try:
            del self[key]
        except KeyError:
            pass
        self._release_removed()

    def expire(self, time: Any = None) -> list[tuple[KeyRef, DataKey]]:
        """Remove expired entries and overwrite their keys.

        Returns an empty list, unlike TTLCache, because the removed keys are
        no longer usable. TTLCache's own callers ignore the result.
        """
        expired = super().expire(time)
        self._removed.extend(value for _, value in expired)
        del expired
        self._release_removed()
        return []

    def clear(self) -> None:
        self._removed.extend(Cache.__getitem__(self, k) for k in Cache.__iter__(self))
        super().clear()
        self._release_removed()

    def _release_removed(self) -> None:
        key_refs, material_refs = _UNSHARED_REFS
        removed = self._removed
        if removed and self.before_release is not None:
            self.before_release()
        while removed:
            key = removed.pop()
            # Overwrite only keys that nothing else refers to, because a caller
            # that kept one would otherwise seal under zeros from then on.
            if _refcount(key) <= key_refs and _refcount(key.material) <= material_refs:
                wipe_bytes(key.material)
                self.wiped += 1
            else:
                self.kept += 1
                logger.debug(
                    "data key %d version %d left the cache while still in use "
                    "elsewhere, so its material was not overwritten",
                    key.key_id,
                    key.version,
                )


def wipe_bytes(data: bytes) -> bool:
    """Overwrite the contents of a bytes object with zeros, in CPython only.

    The caller must make sure that nothing will read data again. Returns
    False, and changes nothing, on other Python implementations.
    """
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    if not _CAN_WIPE or not data:
        return False
    ctypes.memset(id(data) + _BYTES_DATA_OFFSET, 0, len(data))
    return True


def _refcount(obj: object) -> int:
    return sys.getrefcount(obj) if _CAN_WIPE else sys.maxsize


class _Probe:
    material: bytes


def _measure_unshared_refs() -> tuple[int, int]:
    """Count the references that _release_removed() itself holds.

    The probe is held exactly as a dropped data key is there: popped from a
    list into a local, with its material in an instance attribute. Measuring
    instead of hard-coding keeps the check right when a CPython version
    counts references on its stack differently.
    """
    holder = [_Probe()]
    key = holder.pop()
    key.material = bytes(bytearray(32))
    return _refcount(key), _refcount(key.material)


_UNSHARED_REFS = _measure_unshared_refs()


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
