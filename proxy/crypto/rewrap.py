"""Rewrapping: store every data key under more keyrings, or drop a keyring's copies.

This is how a key-encryption key is rotated, or how the key store moves to
another keyring such as AWS KMS. The data keys and the sealed values stay as
they are, and only their wrapped copies change.
Data keys are unwrapped in this process by the key store's own keyrings and
wrapped again by the new ones. No table data is read.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from proxy.audit import AuditRecord, KeyVersionRef
from proxy.crypto.keyring import Keyring
from proxy.crypto.keystore import KeyStore, lock_key_name
from proxy.crypto.keyversions import describe_versions
from proxy.crypto.values import DataKey
from proxy.errors import KeyringError, KeyStoreError

__all__ = ["RewrapReport", "drop_keyrings", "rewrap"]

logger = logging.getLogger(__name__)

_WRAPPED_UNDER_LOCK_SQL = """
SELECT d.key_id, d.version,
       array_agg(w.keyring) FILTER (WHERE w.keyring IS NOT NULL) AS keyrings
FROM pgseal.key_names n
JOIN pgseal.data_keys d USING (key_id)
LEFT JOIN pgseal.wrapped_keys w USING (key_id, version)
WHERE n.key_name = $1
GROUP BY d.key_id, d.version
ORDER BY d.version
"""

# Versions that would have no wrapped copy left once the named keyrings' copies
# are deleted.
_ORPHANS_SQL = """
SELECT n.key_name, d.key_id, d.version
FROM pgseal.key_names n JOIN pgseal.data_keys d USING (key_id)
WHERE NOT EXISTS (
    SELECT 1 FROM pgseal.wrapped_keys w
    WHERE w.key_id = d.key_id AND w.version = d.version
      AND w.keyring <> ALL($1::text[]))
ORDER BY n.key_name, d.version
"""


@dataclass
class RewrapReport:
    """The changes that one rewrap run made."""

    added: list[tuple[KeyVersionRef, str]] = field(default_factory=list)
    """(key version, keyring name) for each wrapped copy stored."""

    present: int = 0
    """Copies that the new keyrings already had, and were left as they were."""

    deleted: int = 0
    """Copies of dropped keyrings that were deleted."""


async def rewrap(
    store: KeyStore,
    new_keyrings: Sequence[Keyring],
    *,
    verify: bool = True,
    key_sets: Callable[[str], Sequence[Keyring]] | None = None,
) -> RewrapReport:
    """Wrap every stored data key, retired versions included, with new_keyrings.

    With key_sets, each key name is also wrapped by every keyring of the set
    that key_sets returns for it, as after adding a keyring to a set.

    Copies that already exist are kept. Each key name is handled in its own
    transaction, under the lock that key creation takes, so a version that a
    proxy creates meanwhile is either seen here or created after. With verify,
    a new keyring that can unwrap must give back the same data key before
    its copy is stored.
    """
    if not new_keyrings and key_sets is None:
        raise ValueError("new_keyrings must not be empty without key_sets")
    report = RewrapReport()
    record = AuditRecord(
        "rewrap",
        keyrings=[keyring.name for keyring in store.keyrings],
        details={"new_keyrings": [keyring.name for keyring in new_keyrings]},
    )
    try:
        names = sorted({v.key_name for v in await describe_versions(store)})
        for name in names:
            targets = list(new_keyrings)
            if key_sets is not None:
                targets += [
                    k for k in key_sets(name) if all(k is not t for t in targets)
                ]
            if targets:
                await _rewrap_name(store, name, targets, verify, report)
    except Exception as exc:
        _fill_record(record, report)
        if store.audit is not None:
            store.audit.write(record, error=exc)
        raise
    _fill_record(record, report)
    if store.audit is not None:
        store.audit.write(record)
    logger.info(
        "rewrapped: %d copies added, %d already present",
        len(report.added),
        report.present,
    )
    return report


async def drop_keyrings(store: KeyStore, keyring_names: Sequence[str]) -> int:
    """Delete every wrapped copy made by the named keyrings; return how many.

    Raises KeyStoreError, and deletes nothing, if a data key version would be
    left without any wrapped copy, because no keyring could then unwrap it.
    """
    names = sorted(set(keyring_names))
    if not names:
        raise ValueError("keyring_names must not be empty")
    record = AuditRecord(
        "rewrap_drop",
        keyrings=names,
        details={"dropped_keyrings": names},
    )
    try:
        deleted = await _drop_locked(store.pool, names)
    except Exception as exc:
        if store.audit is not None:
            store.audit.write(record, error=exc)
        raise
    record.details["deleted_copies"] = deleted
    if store.audit is not None:
        store.audit.write(record)
    logger.info("deleted %d wrapped copies of keyrings %s", deleted, ", ".join(names))
    return deleted


async def _rewrap_name(
    store: KeyStore,
    key_name: str,
    new_keyrings: Sequence[Keyring],
    verify: bool,
    report: RewrapReport,
) -> None:
    async with store.pool.acquire() as conn, conn.transaction():
        await lock_key_name(conn, key_name)
        for row in await conn.fetch(_WRAPPED_UNDER_LOCK_SQL, key_name):
            present = set(row["keyrings"] or ())
            missing = [k for k in new_keyrings if k.name not in present]
            report.present += len(new_keyrings) - len(missing)
            if not missing:
                continue
            key = await store.unwrap_stored(row["key_id"], row["version"])
            ref = KeyVersionRef(key_name, key.key_id, key.version)
            context = store.wrap_context(key_name, key.version)
            for keyring in missing:
                blob = await _wrap(keyring, key, context, verify)
                await conn.execute(
                    "INSERT INTO pgseal.wrapped_keys "
                    "(key_id, version, keyring, wrapped) VALUES ($1, $2, $3, $4)",
                    key.key_id,
                    key.version,
                    keyring.name,
                    blob,
                )
                report.added.append((ref, keyring.name))
            del key


async def _wrap(keyring: Keyring, key: DataKey, context: str, verify: bool) -> bytes:
    try:
        blob = await asyncio.to_thread(keyring.wrap, key.material, context)
        if verify and keyring.can_unwrap:
            unwrapped = await asyncio.to_thread(keyring.unwrap, blob, context)
            if not hmac.compare_digest(unwrapped, key.material):
                raise KeyringError(
                    f"keyring {keyring.name} returned another data key on unwrap"
                )
    except KeyringError as exc:
        raise KeyringError(
            f"keyring {keyring.name} failed to rewrap data key {key.key_id} "
            f"version {key.version}, so nothing was stored for that key name; "
            f"copies stored for other key names are kept, and running rewrap "
            f"again adds the rest: {exc}"
        ) from exc
    return blob


async def _drop_locked(pool: asyncpg.Pool[asyncpg.Record], names: list[str]) -> int:
    async with pool.acquire() as conn, conn.transaction():
        # Key creation inserts wrapped copies, so block it until this commits.
        # Otherwise a new version could get its only copy under a dropped
        # keyring after the check below.
        await conn.execute("LOCK TABLE pgseal.wrapped_keys IN SHARE ROW EXCLUSIVE MODE")
        orphans = await conn.fetch(_ORPHANS_SQL, names)
        if orphans:
            listed = ", ".join(
                f"{row['key_name']!r} version {row['version']}" for row in orphans[:10]
            )
            raise KeyStoreError(
                f"dropping keyrings {', '.join(names)} would leave {len(orphans)} "
                f"data key versions without any wrapped copy ({listed}); rewrap "
                "them under another keyring first with: pgseal keys rewrap "
                "--new-keyring SPEC"
            )
        status = await conn.execute(
            "DELETE FROM pgseal.wrapped_keys WHERE keyring = ANY($1::text[])", names
        )
    return int(status.split()[-1])


def _fill_record(record: AuditRecord, report: RewrapReport) -> None:
    seen: dict[tuple[int, int], KeyVersionRef] = {}
    for ref, _ in report.added:
        seen[(ref.key_id, ref.version)] = ref
    record.keys = list(seen.values())
    record.details["copies_added"] = len(report.added)
    record.details["copies_present"] = report.present
