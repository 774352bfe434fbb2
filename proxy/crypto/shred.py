"""Crypto-shredding: destroy every data key of one subject.

Deleting the wrapped copies of a subject's data keys from the key store makes
every value sealed under them unreadable, through any proxy and from any
logical backup taken afterwards, while rows stay where they are. Copies of
the key store taken before the shred still contain the wrapped keys until
they age out: physical backups, WAL archives, replicas that lag and
`pgseal keys backup` files. docs/recovery.md lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.audit import KeyVersionRef
from proxy.crypto.keystore import lock_key_name
from proxy.crypto.subjects import canonical_forms, subject_digest
from proxy.errors import KeyStoreError

__all__ = ["ShredResult", "shred_subject", "subject_digests"]

logger = logging.getLogger(__name__)

_FIND_SQL = """
SELECT s.key_id, s.column_key_name, n.key_name
FROM pgseal.subject_keys s JOIN pgseal.key_names n USING (key_id)
WHERE s.subject_hmac = ANY($1::bytea[])
  AND ($2::text IS NULL OR s.column_key_name = $2)
ORDER BY s.key_id
"""

_VERSIONS_SQL = """
SELECT d.key_id, d.version, n.key_name
FROM pgseal.data_keys d JOIN pgseal.key_names n USING (key_id)
WHERE d.key_id = ANY($1::int[])
ORDER BY d.key_id, d.version
"""

# Children before parents, as the foreign keys require.
_DELETE_SQL = (
    "DELETE FROM pgseal.wrapped_keys WHERE key_id = ANY($1::int[])",
    "DELETE FROM pgseal.data_keys WHERE key_id = ANY($1::int[])",
    "DELETE FROM pgseal.subject_keys WHERE key_id = ANY($1::int[])",
    "DELETE FROM pgseal.key_names WHERE key_id = ANY($1::int[])",
)


@dataclass
class ShredResult:
    """The data key versions a shred destroyed, and the columns they sealed."""

    keys: list[KeyVersionRef] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    wrapped_copies: int = 0


def subject_digests(secret: bytes, subject: str) -> list[bytes]:
    """Return the stored digests that a subject value given as text may have.

    They cover integer, uuid and text subject columns alike (see
    canonical_forms()).
    """
    if not subject:
        raise ValueError("subject must not be empty")
    return [subject_digest(secret, form) for form in sorted(canonical_forms(subject))]


async def shred_subject(
    pool: asyncpg.Pool[asyncpg.Record],
    digests: list[bytes],
    column_key_name: str | None = None,
) -> ShredResult:
    """Delete every version of every data key of one subject, in one transaction.

    `digests` are the subject's stored HMACs, from subject_digests() or from
    the audit line of an earlier shred. `column_key_name` narrows the shred
    to one column. Each key name is locked as key creation and rotation lock
    it, so a key is never half created or half deleted.
    """
    result = ShredResult()
    try:
        async with pool.acquire() as conn, conn.transaction():
            found = await conn.fetch(_FIND_SQL, digests, column_key_name)
            for row in found:
                await lock_key_name(conn, row["key_name"])
            key_ids = [row["key_id"] for row in found]
            versions = await conn.fetch(_VERSIONS_SQL, key_ids)
            deleted = [await conn.execute(sql, key_ids) for sql in _DELETE_SQL]
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise KeyStoreError(f"key store: shredding a subject's keys failed: {exc}") from exc

    result.keys = [_ref(row) for row in versions]
    result.columns = sorted({row["column_key_name"] for row in found})
    result.wrapped_copies = _row_count(deleted[0])
    logger.info(
        "shredded %d data key versions of one subject (%d wrapped copies) for %s",
        len(result.keys),
        result.wrapped_copies,
        ", ".join(result.columns) or "no column",
    )
    return result


def _ref(row: Any) -> KeyVersionRef:
    return KeyVersionRef(row["key_name"], row["key_id"], row["version"])


def _row_count(status: str) -> int:
    """Return the row count of a command status such as 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])
