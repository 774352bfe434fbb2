"""Listing and retiring the stored versions of data keys.

A retired version stays in the key store with its wrapped copies, but
proxies no longer load it, so values sealed under it no longer open.
`pgseal keys retire` checks the tables before it retires anything; see
docs/key-lifecycle.md.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.audit import AuditRecord, KeyVersionRef
from proxy.crypto.keycache import KeyRef
from proxy.crypto.keystore import (
    KeyStore,
    _check_key_name,
    _database_errors,
    _parse_algorithm,
    lock_key_name,
)
from proxy.crypto.values import Algorithm
from proxy.errors import KeyStoreError

__all__ = ["KeyVersion", "describe_versions", "retire_versions"]

logger = logging.getLogger(__name__)

# Every version of the named keys, or of all keys when $1 is NULL.
_DESCRIBE_VERSIONS_SQL = """
SELECT n.key_name, n.algorithm, d.key_id, d.version, d.state, d.created_at,
       d.retired_at,
       coalesce(array_agg(w.keyring ORDER BY w.keyring)
                FILTER (WHERE w.keyring IS NOT NULL), '{}') AS keyrings
FROM pgseal.key_names n
JOIN pgseal.data_keys d USING (key_id)
LEFT JOIN pgseal.wrapped_keys w USING (key_id, version)
WHERE $1::text[] IS NULL OR n.key_name = ANY($1::text[])
GROUP BY n.key_name, n.algorithm, d.key_id, d.version, d.state, d.created_at,
         d.retired_at
ORDER BY n.key_name, d.version
"""

_RETIRE_SQL = """
UPDATE pgseal.data_keys d SET state = 'retired', retired_at = now()
FROM pgseal.key_names n
WHERE n.key_id = d.key_id AND n.key_name = $1
  AND d.version = ANY($2::int[]) AND d.state = 'active'
RETURNING d.key_id, d.version
"""


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One stored data key version, as `pgseal keys list` shows it."""

    key_name: str
    algorithm: Algorithm
    key_id: int
    version: int
    state: str
    created_at: dt.datetime
    retired_at: dt.datetime | None
    keyrings: tuple[str, ...]
    """Names of the keyrings that have a wrapped copy."""

    @property
    def ref(self) -> KeyRef:
        return self.key_id, self.version


async def describe_versions(
    store: KeyStore, key_names: Sequence[str] | None = None
) -> list[KeyVersion]:
    """List the stored versions of the named keys, or of all keys."""
    names = None if key_names is None else list(key_names)
    with _database_errors("listing data keys"):
        async with store.pool.acquire() as conn:
            rows = await conn.fetch(_DESCRIBE_VERSIONS_SQL, names)
    return [
        KeyVersion(
            key_name=row["key_name"],
            algorithm=_parse_algorithm(row["algorithm"]),
            key_id=row["key_id"],
            version=row["version"],
            state=row["state"],
            created_at=row["created_at"],
            retired_at=row["retired_at"],
            keyrings=tuple(row["keyrings"]),
        )
        for row in rows
    ]


async def retire_versions(
    store: KeyStore,
    key_name: str,
    versions: Iterable[int],
    *,
    details: dict[str, Any] | None = None,
) -> list[int]:
    """Mark versions of key_name retired, so that proxies stop loading them.

    Returns the versions that this call retired, and leaves versions already
    retired as they are. Raises KeyStoreError for a version that does not
    exist or is the newest active one, which must keep sealing new values.
    """
    _check_key_name(key_name)
    requested = sorted(set(versions))
    record = AuditRecord(
        "retire",
        key_names=[key_name],
        keyrings=[keyring.name for keyring in store.keyrings],
        details=dict(details or {}),
    )
    try:
        retired = await _retire_locked(store, key_name, requested)
    except Exception as exc:
        if store.audit is not None:
            store.audit.write(record, error=exc)
        raise

    for key_id, version in retired:
        store.forget(key_id, version)
        record.keys.append(KeyVersionRef(key_name, key_id, version))
    if store.audit is not None:
        store.audit.write(record)
    return [version for _, version in retired]


async def _retire_locked(
    store: KeyStore, key_name: str, versions: list[int]
) -> list[KeyRef]:
    with _database_errors(f"retiring versions of {key_name!r}"):
        async with store.pool.acquire() as conn, conn.transaction():
            await lock_key_name(conn, key_name)
            rows = await conn.fetch(
                "SELECT d.key_id, d.version, d.state "
                "FROM pgseal.key_names n JOIN pgseal.data_keys d USING (key_id) "
                "WHERE n.key_name = $1 ORDER BY d.version",
                key_name,
            )
            _check_retirable(key_name, versions, rows)
            retired = await conn.fetch(_RETIRE_SQL, key_name, versions)
    logger.info(
        "retired versions %s of data key %r",
        ", ".join(str(row["version"]) for row in retired) or "none",
        key_name,
    )
    return sorted((row["key_id"], row["version"]) for row in retired)


def _check_retirable(key_name: str, versions: list[int], rows: list[Any]) -> None:
    if not rows:
        raise KeyStoreError(f"key name {key_name!r} has no data key in the key store")
    states = {row["version"]: row["state"] for row in rows}
    missing = [version for version in versions if version not in states]
    if missing:
        raise KeyStoreError(
            f"key name {key_name!r} has no version {missing[0]}; "
            f"its versions are {sorted(states)}"
        )
    active = [version for version, state in states.items() if state == "active"]
    if active and max(active) in versions:
        raise KeyStoreError(
            f"version {max(active)} of {key_name!r} is the newest active version, "
            "which seals new values, so it cannot be retired; rotate first with: "
            "pgseal keys rotate"
        )
