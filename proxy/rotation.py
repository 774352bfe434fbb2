"""Automatic data key rotation inside the proxy.

Two rule-driven triggers create a new data key version of a randomized
column. Deterministic columns never rotate by themselves:

- `rotation_period` in a column's rule: checked at every key refresh, and a
  new version is created when the active one is older than the period;
- `max_values_per_key` in the settings: the planner counts the values it
  seals under each key, and once a key reaches the limit the cache calls
  `limit_reached()`, which creates a new version in the background. Sealing
  goes on under the old key until the new one is active.

Both go through KeyStore.rotate() with a condition checked under the key
name's lock, so replicas that notice the same condition create one version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import asyncpg

from proxy.catalog import EncryptedColumn
from proxy.crypto.keycache import KeyRef
from proxy.crypto.keystore import KeyStore
from proxy.errors import PgsealError
from proxy.rules import Encryption

__all__ = ["KeyRotator"]

log = logging.getLogger(__name__)


class KeyRotator:
    """Creates new data key versions when a rotation period or value limit is reached."""

    def __init__(self, keystore: KeyStore) -> None:
        self._keystore = keystore
        # Keys that reached max_values_per_key and still await a new version,
        # retried at each refresh if the first attempt failed.
        self._exhausted: dict[str, KeyRef] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def rotate_due(self, columns: Iterable[EncryptedColumn]) -> None:
        """Create new versions for columns past their rotation period or value limit."""
        if not self._keystore.can_unwrap:
            # NOTE: a write-only proxy seals under a version of its own for
            # its whole life; neither trigger rotates it yet.
            return
        seen: set[str] = set()
        for column in columns:
            period = column.rule.rotation_period
            name = column.key_name
            if period is None or name in seen:
                continue
            if column.rule.encryption is not Encryption.RANDOMIZED:
                continue
            seen.add(name)
            await self._rotate(name, "rotation_period", older_than=period)
        for name, ref in list(self._exhausted.items()):
            await self._roll_over(name, ref)

    def limit_reached(self, key_name: str, ref: KeyRef) -> None:
        """Schedule a new version of key_name, which sealed its maximum of values.

        Called synchronously from the planner's seal path, so it only starts
        a task.
        """
        if not self._keystore.can_unwrap or key_name in self._exhausted:
            return
        log.info(
            "data key %r version %d reached max_values_per_key; creating a new version",
            key_name,
            ref[1],
        )
        self._exhausted[key_name] = ref
        task = asyncio.get_running_loop().create_task(self._roll_over(key_name, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _roll_over(self, key_name: str, ref: KeyRef) -> None:
        if await self._rotate(key_name, "max_values_per_key", if_active=ref):
            self._exhausted.pop(key_name, None)

    async def _rotate(
        self,
        key_name: str,
        reason: str,
        *,
        older_than: float | None = None,
        if_active: KeyRef | None = None,
    ) -> bool:
        """Rotate under a condition; return False if the attempt failed."""
        try:
            key, created = await self._keystore.rotate(
                key_name, reason=reason, older_than=older_than, if_active=if_active
            )
        except (PgsealError, OSError, asyncpg.PostgresError) as exc:
            log.warning(
                "creating a new version of data key %r (%s) failed, the active "
                "version stays in use and the next key refresh retries: %s",
                key_name,
                reason,
                exc,
            )
            return False
        if created:
            log.info(
                "data key %r rotated to version %d (%s)", key_name, key.version, reason
            )
        return True
