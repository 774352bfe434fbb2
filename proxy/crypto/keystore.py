"""The data-key store: wrapped data keys in PostgreSQL, schema ``pgseal``.

Every proxy replica that connects to the same database shares these keys, and
a backup of the database carries them, wrapped. The tables are described in
docs/key-store.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import asyncpg

from proxy.audit import AuditLog, AuditRecord, KeyVersionRef
from proxy.crypto.keycache import KeyCache, KeyRef
from proxy.crypto.keyring import Keyring
from proxy.crypto.subjects import SUBJECT_SECRET_SIZE, SubjectKeyRequest
from proxy.crypto.values import STORE_ID_SIZE, Algorithm, DataKey
from proxy.errors import ConfigError, KeyringError, KeyStoreError, KeyUnavailableError

__all__ = ["KeyCache", "KeyNotFoundError", "KeyRef", "KeyStore", "lock_key_name"]

logger = logging.getLogger(__name__)

# Advisory lock ids. setup() takes the one-bigint form. Key creation takes the
# two-int4 form (class id, hashtext(key_name)). The PostgreSQL manual (advisory
# lock functions) states that these two key spaces do not overlap.
_SETUP_LOCK_ID = 0x7067_7365_616C_0001
_KEY_NAME_LOCK_CLASS = 0x7067_7301

_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS pgseal;

CREATE TABLE IF NOT EXISTS pgseal.key_store (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    store_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS pgseal.key_names (
    key_id serial PRIMARY KEY,
    key_name text NOT NULL UNIQUE,
    algorithm smallint NOT NULL
);

CREATE TABLE IF NOT EXISTS pgseal.data_keys (
    key_id integer NOT NULL REFERENCES pgseal.key_names,
    version integer NOT NULL CHECK (version >= 1),
    state text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, version)
);

CREATE TABLE IF NOT EXISTS pgseal.wrapped_keys (
    key_id integer NOT NULL,
    version integer NOT NULL,
    keyring text NOT NULL,
    wrapped bytea NOT NULL,
    PRIMARY KEY (key_id, version, keyring),
    FOREIGN KEY (key_id, version) REFERENCES pgseal.data_keys
);

ALTER TABLE pgseal.data_keys ADD COLUMN IF NOT EXISTS retired_at timestamptz;

ALTER TABLE pgseal.key_store ADD COLUMN IF NOT EXISTS subject_secret bytea;

CREATE TABLE IF NOT EXISTS pgseal.subject_keys (
    key_id integer PRIMARY KEY REFERENCES pgseal.key_names,
    column_key_name text NOT NULL,
    subject_hmac bytea NOT NULL,
    UNIQUE (subject_hmac, column_key_name)
);
"""

# age is in seconds, by the server's clock, so that replicas with skewed
# clocks agree on when a rotation period has passed.
_FIND_ACTIVE_SQL = """
SELECT d.key_id, d.version, n.algorithm,
       extract(epoch FROM now() - d.created_at)::float8 AS age
FROM pgseal.key_names n JOIN pgseal.data_keys d USING (key_id)
WHERE n.key_name = $1 AND d.state = 'active'
ORDER BY d.version DESC
LIMIT 1
"""

_FIND_WRAPPED_SQL = """
SELECT n.key_name, n.algorithm, d.state, w.keyring, w.wrapped
FROM pgseal.wrapped_keys w
JOIN pgseal.data_keys d USING (key_id, version)
JOIN pgseal.key_names n USING (key_id)
WHERE w.key_id = $1 AND w.version = $2
"""

_LIST_VERSIONS_SQL = """
SELECT d.key_id, d.version, d.state, n.key_name
FROM pgseal.key_names n JOIN pgseal.data_keys d USING (key_id)
WHERE n.key_name = ANY($1::text[])
ORDER BY n.key_name, d.version
"""



class KeyNotFoundError(KeyStoreError):
    """A data key version that is not in the key store, as after a shred."""


class KeyStore:
    """Creates, wraps, stores and unwraps data keys, with a cache in front.

    Call setup() once before anything else. Keyring calls may block, so they
    run in worker threads.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        keyrings: Sequence[Keyring],
        cache: KeyCache | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._pool = pool
        self._keyrings = tuple(keyrings)
        self._check_keyrings()
        self._cache = cache if cache is not None else KeyCache()
        self.audit = audit
        """Where key creation, rotation and retirement are recorded, if anywhere."""
        self._store_id: bytes | None = None
        self._subject_secret: bytes | None = None
        self._unwrap_locks: dict[KeyRef, asyncio.Lock] = {}
        self.unwrap_calls = 0
        """Number of keyring unwrap() calls made, failed ones included."""
        self.unwrap_calls_by_keyring: Counter[str] = Counter()
        """unwrap_calls per keyring name."""
        # Write-only stores only: the data key this process created for each
        # key name, kept for the life of the process because no keyring can
        # unwrap it again once the cache drops it.
        self._own_keys: dict[str, DataKey] = {}
        self._own_keys_lock = asyncio.Lock()
        # The keyring set of each key name; names not listed use the default
        # set, which is every keyring unless assign_keyrings() names another.
        self._sets: dict[str, tuple[Keyring, ...]] = {}
        self._default_set = self._keyrings
        self.unavailable: set[str] = set()
        """Key names with a version that load_keys() could not unwrap."""

    @property
    def can_unwrap(self) -> bool:
        """False when every keyring is write-only, as with only a public key."""
        return any(keyring.can_unwrap for keyring in self._keyrings)

    @property
    def keyrings(self) -> tuple[Keyring, ...]:
        return self._keyrings

    def assign_keyrings(
        self,
        sets: Mapping[str, Sequence[Keyring]],
        default: Sequence[Keyring] | None = None,
    ) -> None:
        """Set the keyring set of each key name, and the set of all other names.

        New data keys of a name are wrapped by every keyring of its set, and
        unwrapping tries its set first, in order. Every keyring must be one of
        the store's own.
        """
        own = {id(keyring) for keyring in self._keyrings}
        default_set = tuple(default) if default is not None else self._keyrings
        checked = {name: tuple(keyrings) for name, keyrings in sets.items()}
        for keyrings in (default_set, *checked.values()):
            if not keyrings:
                raise ConfigError("a keyring set must not be empty")
            if any(id(keyring) not in own for keyring in keyrings):
                raise ConfigError(
                    "a keyring set names a keyring that the key store was not given"
                )
        self._sets = checked
        self._default_set = default_set

    def keyrings_for(self, key_name: str) -> tuple[Keyring, ...]:
        """Return the keyring set that wraps new data keys of key_name."""
        return self._sets.get(key_name, self._default_set)

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        return self._pool

    @property
    def store_id(self) -> bytes:
        """The 16-byte id of this key store, bound into every sealed value."""
        if self._store_id is None:
            raise KeyStoreError("key store is not set up: call setup() first")
        return self._store_id

    @property
    def subject_secret(self) -> bytes:
        """The 32-byte HMAC key that turns subject values into stored digests."""
        if self._subject_secret is None:
            raise KeyStoreError("key store is not set up: call setup() first")
        return self._subject_secret

    async def setup(self) -> None:
        """Create the pgseal schema and tables if missing, and read the store id.

        Safe to run from several processes at once, because it holds an
        advisory lock for the whole transaction.
        """
        with _database_errors("setting up the key store"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SETUP_LOCK_ID)
                await conn.execute(_SCHEMA_SQL)
                await conn.execute(
                    "INSERT INTO pgseal.key_store (store_id) VALUES ($1) "
                    "ON CONFLICT DO NOTHING",
                    uuid.uuid4(),
                )
                await conn.execute(
                    "UPDATE pgseal.key_store SET subject_secret = $1 "
                    "WHERE subject_secret IS NULL",
                    secrets.token_bytes(SUBJECT_SECRET_SIZE),
                )
                stored = await conn.fetchrow(
                    "SELECT store_id, subject_secret FROM pgseal.key_store"
                )
        assert stored is not None

        store_id = uuid.UUID(str(stored["store_id"])).bytes
        assert len(store_id) == STORE_ID_SIZE
        self._store_id = store_id
        self._subject_secret = bytes(stored["subject_secret"])
        logger.info("key store %s is ready", store_id.hex())

    async def active_key(self, key_name: str, algorithm: Algorithm) -> DataKey:
        """Return the newest active data key of key_name.

        Creates the key name and its first version if it has no active
        version. Raises KeyStoreError if key_name already uses another
        algorithm.
        """
        _check_key_name(key_name)
        if not isinstance(algorithm, Algorithm):
            raise TypeError("algorithm must be an Algorithm")

        if not self.can_unwrap:
            return await self._own_key(key_name, algorithm)

        ref = self._cache.active_ref(key_name)
        if ref is None:
            ref = await self._find_active(key_name, algorithm)
        if ref is None:
            return await self._create_key(key_name, algorithm)

        key = await self.get_key(*ref)
        _check_algorithm(key_name, key.algorithm, algorithm)
        self._cache.set_active(key_name, ref)
        return key

    async def subject_key(self, request: SubjectKeyRequest) -> DataKey:
        """Return the active data key of one subject, creating it on first use.

        Creation is safe when several processes ask at once: it runs under
        the key name's advisory lock and re-reads the active version inside
        it, so exactly one key is created and the others read it.
        """
        subject = (request.column_key_name, request.digest)
        if not self.can_unwrap:
            return await self._own_key(request.key_name, request.algorithm, subject)
        ref = self._cache.active_ref(request.key_name)
        if ref is None:
            ref = await self._find_active(request.key_name, request.algorithm)
        if ref is None:
            result = await self._create_recorded(
                request.key_name,
                request.algorithm,
                "create",
                "first value of a subject",
                subject=subject,
            )
            return await self._activate(request.key_name, result)
        key = await self.get_key(*ref)
        self._cache.set_active(request.key_name, ref)
        return key

    async def drop_destroyed(self) -> int:
        """Drop cached data keys whose rows left the key store, as after a shred.

        Their material is overwritten as on any eviction from the cache.
        Returns the number of keys dropped.
        """
        cached = self._cache.refs()
        own = {(k.key_id, k.version): name for name, k in self._own_keys.items()}
        refs = sorted(set(cached) | set(own))
        if not refs:
            return 0
        with _database_errors("checking cached data keys"):
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT d.key_id, d.version FROM pgseal.data_keys d "
                    "JOIN unnest($1::int[], $2::int[]) AS r(key_id, version) "
                    "USING (key_id, version)",
                    [ref[0] for ref in refs],
                    [ref[1] for ref in refs],
                )
        stored = {(row["key_id"], row["version"]) for row in rows}
        dropped = [ref for ref in refs if ref not in stored]
        for ref in dropped:
            if ref in own:
                del self._own_keys[own[ref]]
            self._cache.discard(*ref)
            logger.info(
                "dropped data key %d version %d from the cache: it is no longer "
                "in the key store",
                *ref,
            )
        return len(dropped)

    async def get_key(self, key_id: int, version: int) -> DataKey:
        """Return a data key, unwrapping it only on a cache miss.

        Tries the keyrings in the configured order and uses the first that
        unwraps. Raises KeyStoreError if the key does not exist and
        KeyringError if no keyring can unwrap it.
        """
        _check_int("key_id", key_id)
        _check_int("version", version)
        ref = (key_id, version)
        cached = self._cache.get(key_id, version)
        if cached is not None:
            return cached

        # One unwrap per data key, even when many tasks miss the cache at once.
        lock = self._unwrap_locks.setdefault(ref, asyncio.Lock())
        try:
            async with lock:
                cached = self._cache.get(key_id, version)
                if cached is not None:
                    return cached
                key = await self._unwrap(key_id, version)
                self._cache.put(key)
                return key
        finally:
            if not lock.locked():
                self._unwrap_locks.pop(ref, None)

    async def load_keys(self, key_names: Iterable[str]) -> list[DataKey]:
        """Unwrap and cache every version of the named keys that is not retired.

        Names without keys are skipped: active_key() creates them on first use.
        Retired versions are dropped from the cache, so values sealed under
        them no longer open in this process.
        """
        names = list(key_names)
        for name in names:
            _check_key_name(name)
        if not self.can_unwrap:
            return self._cache_own_keys(names)
        with _database_errors("listing data keys"):
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_LIST_VERSIONS_SQL, names)

        keys: list[DataKey] = []
        live: dict[str, list[KeyRef]] = {}
        unavailable: set[str] = set()
        for row in rows:
            if row["state"] == "retired":
                self._cache.discard(row["key_id"], row["version"])
                continue
            # A live version that fails to load stays listed, so a lookup
            # requests it again or fails, rather than missing its rows.
            live.setdefault(row["key_name"], []).append((row["key_id"], row["version"]))
            try:
                key = await self.get_key(row["key_id"], row["version"])
            except KeyUnavailableError as exc:
                # The other keys still load, and the next refresh tries again.
                unavailable.add(row["key_name"])
                logger.error("data key not loaded: %s", exc)
                continue
            # Storing it again restarts its age, so a key in use never
            # expires between two refreshes.
            self._cache.put(key)
            keys.append(key)
            # Rows come in version order, so the last active one wins.
            if row["state"] == "active":
                self._cache.set_active(row["key_name"], (key.key_id, key.version))
        for name, refs in live.items():
            self._cache.set_live(name, tuple(refs))
        self.unavailable.difference_update(names)
        self.unavailable.update(unavailable)
        logger.debug("loaded %d data keys for %d key names", len(keys), len(names))
        return keys

    def wrap_context(self, key_name: str, version: int) -> str:
        """Return the context that binds a wrapped data key to its place."""
        return f"{self.store_id.hex()}/{key_name}/{version}"

    async def rotate(
        self,
        key_name: str,
        *,
        reason: str = "operator",
        if_active: KeyRef | None = None,
        older_than: float | None = None,
    ) -> tuple[DataKey, bool]:
        """Create a new version of key_name to seal new values.

        Older versions still open the values sealed under them.
        Without conditions the new version is always created. With if_active,
        it is created only while the active version is still if_active, and
        with older_than (seconds), only when the active version is older, so
        that several replicas that see the same condition create one version.
        Returns the active key afterwards, and whether this call created it.
        Raises KeyStoreError if key_name has no data key yet.
        """
        _check_key_name(key_name)
        if not self.can_unwrap:
            raise ConfigError(
                f"cannot rotate {key_name!r}: every configured keyring is "
                "write-only, so the key store cannot unwrap the versions it has"
            )
        algorithm = await self.key_algorithm(key_name)
        if algorithm is None:
            raise KeyStoreError(
                f"key name {key_name!r} has no data key in the key store, so "
                "there is nothing to rotate; check the name with: pgseal keys list"
            )

        # Most periodic checks find a young key, so look before taking the lock.
        if older_than is not None:
            with _database_errors(f"looking up key name {key_name!r}"):
                async with self._pool.acquire() as conn:
                    row = await conn.fetchrow(_FIND_ACTIVE_SQL, key_name)
            if row is not None and not _rotation_due(row, None, older_than):
                return await self._activate(key_name, (row["key_id"], row["version"])), False

        unconditional = if_active is None and older_than is None
        result = await self._create_recorded(
            key_name,
            algorithm,
            "rotate",
            reason,
            new_version=unconditional,
            if_active=if_active,
            older_than=older_than,
        )
        return await self._activate(key_name, result), isinstance(result, DataKey)

    async def key_algorithm(self, key_name: str) -> Algorithm | None:
        """Return the algorithm of a stored key name, or None if it is unknown."""
        with _database_errors(f"looking up key name {key_name!r}"):
            async with self._pool.acquire() as conn:
                value = await conn.fetchval(
                    "SELECT algorithm FROM pgseal.key_names WHERE key_name = $1",
                    key_name,
                )
        return None if value is None else _parse_algorithm(value)

    def forget(self, key_id: int, version: int) -> None:
        """Drop a data key from this process's cache, as for a retired version."""
        self._cache.discard(key_id, version)

    async def unwrap_stored(self, key_id: int, version: int) -> DataKey:
        """Unwrap a data key without the cache, retired versions included.

        For key administration such as rewrapping. The caller owns the
        returned key and should drop it as soon as it is done.
        """
        _check_int("key_id", key_id)
        _check_int("version", version)
        return await self._unwrap(key_id, version, allow_retired=True)

    def _check_keyrings(self) -> None:
        if not self._keyrings:
            raise ConfigError("the key store needs at least one keyring")
        names = [keyring.name for keyring in self._keyrings]
        if len(set(names)) != len(names):
            raise ConfigError(f"keyrings must be distinct, got {names}")

    async def _find_active(self, key_name: str, algorithm: Algorithm) -> KeyRef | None:
        with _database_errors(f"looking up key name {key_name!r}"):
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_FIND_ACTIVE_SQL, key_name)
        if row is None:
            return None
        _check_algorithm(key_name, _parse_algorithm(row["algorithm"]), algorithm)
        return row["key_id"], row["version"]

    async def _create_key(self, key_name: str, algorithm: Algorithm) -> DataKey:
        result = await self._create_recorded(
            key_name, algorithm, "create", "no active version"
        )
        return await self._activate(key_name, result)

    async def _activate(self, key_name: str, result: DataKey | KeyRef) -> DataKey:
        """Make a newly created key, or the ref another process committed, active."""
        # Cache only after the commit, so the cache contains only stored keys.
        if isinstance(result, DataKey):
            key = result
            self._cache.put(key)
        else:
            key = await self.get_key(*result)
        self._cache.set_active(key_name, (key.key_id, key.version))
        return key

    async def _create_recorded(
        self,
        key_name: str,
        algorithm: Algorithm,
        action: str,
        reason: str,
        **conditions: Any,
    ) -> DataKey | KeyRef:
        """Run _create_key_locked() and write an audit line if it created a key."""
        record = AuditRecord(
            action,
            key_names=[key_name],
            keyrings=[keyring.name for keyring in self.keyrings_for(key_name)],
            details={"reason": reason, "algorithm": algorithm.name},
        )
        try:
            result = await self._create_key_locked(key_name, algorithm, **conditions)
        except Exception as exc:
            if self.audit is not None:
                self.audit.write(record, error=exc)
            raise
        if isinstance(result, DataKey) and self.audit is not None:
            record.keys.append(KeyVersionRef(key_name, result.key_id, result.version))
            self.audit.write(record)
        return result

    async def _create_key_locked(
        self,
        key_name: str,
        algorithm: Algorithm,
        *,
        new_version: bool = False,
        if_active: KeyRef | None = None,
        older_than: float | None = None,
        subject: tuple[str, bytes] | None = None,
    ) -> DataKey | KeyRef:
        """Create the next version of key_name, unless another process just did.

        Returns the new key, or the ref of the active key that another process
        committed while this one waited. The advisory lock serializes creation
        of one name across processes, and the check inside it reads what the
        previous holder committed. With new_version, a version is created even
        when an active one exists. With if_active, a version is created when
        the active one is still if_active, and with older_than (seconds), when
        the active one is older than that. With subject (the column's key
        name and the subject digest), a new key name is also recorded in
        pgseal.subject_keys, in the same transaction, so shred finds it.
        """
        with _database_errors(f"creating a data key for {key_name!r}"):
            async with self._pool.acquire() as conn, conn.transaction():
                await lock_key_name(conn, key_name)
                row = await conn.fetchrow(_FIND_ACTIVE_SQL, key_name)
                if row is None or new_version or _rotation_due(row, if_active, older_than):
                    return await self._insert_next_version(
                        conn, key_name, algorithm, subject
                    )

        _check_algorithm(key_name, _parse_algorithm(row["algorithm"]), algorithm)
        return row["key_id"], row["version"]

    async def _own_key(
        self,
        key_name: str,
        algorithm: Algorithm,
        subject: tuple[str, bytes] | None = None,
    ) -> DataKey:
        """Return this process's data key for key_name, creating it on first use.

        A write-only store cannot unwrap the versions that other processes
        stored, so it seals under a new version of its own, wrapped by every
        keyring and kept in memory.
        """
        if algorithm is Algorithm.AES_256_SIV:
            raise ConfigError(
                f"key name {key_name!r} is deterministic, which needs a keyring "
                "that can unwrap: a write-only proxy would seal under a version "
                "of its own, so equal values would no longer seal alike"
            )
        async with self._own_keys_lock:
            key = self._own_keys.get(key_name)
            if key is None:
                created = await self._create_recorded(
                    key_name,
                    algorithm,
                    "create",
                    "write-only proxy start",
                    new_version=True,
                    subject=subject,
                )
                assert isinstance(created, DataKey)
                key = self._own_keys[key_name] = created
                logger.info(
                    "write-only key store: sealing %r under new version %d",
                    key_name,
                    key.version,
                )
        _check_algorithm(key_name, key.algorithm, algorithm)
        self._cache.put(key)
        self._cache.set_active(key_name, (key.key_id, key.version))
        return key

    def _cache_own_keys(self, names: list[str]) -> list[DataKey]:
        """Put this process's own data keys back into the cache, by name."""
        keys = []
        for name in names:
            key = self._own_keys.get(name)
            if key is None:
                continue
            self._cache.put(key)
            self._cache.set_active(name, (key.key_id, key.version))
            keys.append(key)
        return keys

    async def _insert_next_version(
        self,
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        key_name: str,
        algorithm: Algorithm,
        subject: tuple[str, bytes] | None = None,
    ) -> DataKey:
        key_id = await self._ensure_key_name(conn, key_name, algorithm, subject)
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM pgseal.data_keys "
            "WHERE key_id = $1",
            key_id,
        )
        key = DataKey.generate(key_id, version, algorithm)
        wrapped = await self._wrap_all(key, key_name)

        await conn.execute(
            "INSERT INTO pgseal.data_keys (key_id, version) VALUES ($1, $2)",
            key_id,
            version,
        )
        await conn.executemany(
            "INSERT INTO pgseal.wrapped_keys (key_id, version, keyring, wrapped) "
            "VALUES ($1, $2, $3, $4)",
            [(key_id, version, name, blob) for name, blob in wrapped],
        )
        logger.info(
            "created data key %r version %d (key id %d), wrapped by %s",
            key_name,
            version,
            key_id,
            ", ".join(name for name, _ in wrapped),
        )
        return key

    async def _ensure_key_name(
        self,
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        key_name: str,
        algorithm: Algorithm,
        subject: tuple[str, bytes] | None = None,
    ) -> int:
        row = await conn.fetchrow(
            "SELECT key_id, algorithm FROM pgseal.key_names WHERE key_name = $1",
            key_name,
        )
        if row is not None:
            _check_algorithm(key_name, _parse_algorithm(row["algorithm"]), algorithm)
            key_id: int = row["key_id"]
            return key_id
        new_id: int = await conn.fetchval(
            "INSERT INTO pgseal.key_names (key_name, algorithm) VALUES ($1, $2) "
            "RETURNING key_id",
            key_name,
            int(algorithm),
        )
        if subject is not None:
            await conn.execute(
                "INSERT INTO pgseal.subject_keys (key_id, column_key_name, subject_hmac) "
                "VALUES ($1, $2, $3)",
                new_id,
                *subject,
            )
        return new_id

    async def _wrap_all(self, key: DataKey, key_name: str) -> list[tuple[str, bytes]]:
        """Wrap key with every keyring of its set. Any failure means nothing is stored."""
        context = self.wrap_context(key_name, key.version)
        wrapped: list[tuple[str, bytes]] = []
        for keyring in self.keyrings_for(key_name):
            try:
                blob = await asyncio.to_thread(keyring.wrap, key.material, context)
            except KeyringError as exc:
                raise KeyringError(
                    f"keyring {keyring.name} failed to wrap the new data key "
                    f"{key_name!r} version {key.version}, so it was not stored: {exc}"
                ) from exc
            wrapped.append((keyring.name, blob))
        return wrapped

    async def _unwrap(
        self, key_id: int, version: int, *, allow_retired: bool = False
    ) -> DataKey:
        with _database_errors(f"reading data key {key_id} version {version}"):
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_FIND_WRAPPED_SQL, key_id, version)
        if not rows:
            raise KeyNotFoundError(
                f"data key {key_id} version {version} not found in the key store"
            )

        key_name: str = rows[0]["key_name"]
        if rows[0]["state"] == "retired" and not allow_retired:
            raise KeyringError(
                f"data key {key_id} version {version} ({key_name!r}) is retired, "
                "so values sealed under it no longer open; pgseal reencrypt "
                "moves values to the newest version before their old one is retired"
            )
        algorithm = _parse_algorithm(rows[0]["algorithm"])
        wrapped_by: dict[str, bytes] = {row["keyring"]: row["wrapped"] for row in rows}
        context = self.wrap_context(key_name, version)
        failed: list[str] = []
        # The key's own set first, in its order, then any other keyring
        # that has a copy, such as one added by pgseal keys rewrap.
        own_set = self.keyrings_for(key_name)
        others = [k for k in self._keyrings if all(k is not o for o in own_set)]
        order = own_set + tuple(others)
        for keyring in order:
            blob = wrapped_by.get(keyring.name)
            if blob is None or not keyring.can_unwrap:
                continue
            self.unwrap_calls += 1
            self.unwrap_calls_by_keyring[keyring.name] += 1
            try:
                material = await asyncio.to_thread(keyring.unwrap, blob, context)
            except KeyringError as exc:
                logger.warning(
                    "keyring %s failed to unwrap data key %d version %d: %s",
                    keyring.name,
                    key_id,
                    version,
                    exc,
                )
                failed.append(keyring.name)
                continue
            logger.debug("unwrapped data key %d version %d", key_id, version)
            return _make_key(key_id, version, algorithm, material)

        # A keyring that failed, such as a KMS that cannot be reached, may
        # work on a later try. Without one, no configured keyring has a copy.
        error = KeyUnavailableError if failed else KeyringError
        raise error(
            f"no configured keyring can unwrap data key {key_id} version {version} "
            f"({key_name!r}): it is wrapped for {sorted(wrapped_by)}, the "
            f"configured keyrings are {[k.name for k in self._keyrings]}, and "
            f"these failed: {failed or 'none'}"
        )


@contextmanager
def _database_errors(action: str) -> Iterator[None]:
    """Convert database and connection failures into KeyStoreError."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise KeyStoreError(f"key store: {action} failed: {exc}") from exc


def _make_key(
    key_id: int, version: int, algorithm: Algorithm, material: bytes
) -> DataKey:
    try:
        return DataKey(key_id, version, algorithm, material)
    except ValueError as exc:
        raise KeyStoreError(
            f"data key {key_id} version {version} is invalid after unwrapping: {exc}"
        ) from None


def _parse_algorithm(value: int) -> Algorithm:
    try:
        return Algorithm(value)
    except ValueError:
        raise KeyStoreError(
            f"key store contains invalid algorithm id {value}, which this "
            "version of pgseal does not support"
        ) from None


def _check_algorithm(key_name: str, stored: Algorithm, requested: Algorithm) -> None:
    if stored is not requested:
        raise KeyStoreError(
            f"key name {key_name!r} uses {stored.name}, not {requested.name}, "
            "so use another key name for the other algorithm"
        )


def _check_key_name(key_name: str) -> None:
    if not isinstance(key_name, str):
        raise TypeError("key_name must be a str")
    if not key_name:
        raise ValueError("key_name must not be empty")


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")


async def lock_key_name(
    conn: asyncpg.Connection[asyncpg.Record]
    | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    key_name: str,
) -> None:
    """Take the transaction-level advisory lock that serializes changes to key_name."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        _KEY_NAME_LOCK_CLASS,
        key_name,
    )


def _rotation_due(
    active: asyncpg.Record, if_active: KeyRef | None, older_than: float | None
) -> bool:
    if if_active is not None and (active["key_id"], active["version"]) == if_active:
        return True
    return older_than is not None and active["age"] > older_than

