"""Keyring calls while sealing many values: KMS is called per data key only.

The count runs in this process with the objects the proxy itself uses for
keys: a KeyStore over a KeyCache, which the proxy fills at start and
refreshes every 20 s, and a ColumnPlanner whose KeyView reads that cache
for every value. The proxy subprocess exports no counters, so it is not
the one counted.

With `proxy.crypto.kms` present, the keyring is AWS KMS served by moto on a
loopback port, and the figure is the keyring's own count of KMS requests.
Without it, a sodium keyring is used instead, and its wrap and unwrap calls
are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from bench.services import HOST, Stack
from proxy.catalog import EncryptedColumn, load_catalog
from proxy.crypto.keyring import Keyring, SodiumKeyring
from proxy.crypto.keystore import KeyCache, KeyStore
from proxy.planner import ColumnPlanner, KeyView, algorithm_of
from proxy.rules import load_rules
from proxy.wire.messages import TEXT_FORMAT

log = logging.getLogger(__name__)

DATABASE = "bench_keys"
TABLE = "sealed_values"
REGION = "us-east-1"

# The proxy refreshes its keys every 20 s. Refreshing every 100,000 values
# does it several times in a run, whichever speed the machine seals at.
REFRESH_EVERY = 100_000

_RULES = f"""\
tables:
  - name: public.{TABLE}
    database: {DATABASE}
    columns:
      - name: token
        encryption: randomized
"""


@dataclass
class CountingKeyring:
    """A keyring that counts the wrap() and unwrap() calls passed to another."""

    inner: Keyring
    wraps: int = 0
    unwraps: int = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def can_unwrap(self) -> bool:
        return self.inner.can_unwrap

    def wrap(self, data_key: bytes, context: str) -> bytes:
        self.wraps += 1
        return self.inner.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap(wrapped, context)


@contextlib.contextmanager
def _moto_kms() -> Iterator[str]:
    """Start moto's KMS on 127.0.0.1, point boto3 at it, and yield a key id."""
    import boto3  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_KMS": f"http://{host}:{port}",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        client = boto3.session.Session().client("kms")
        yield str(client.create_key(Description="pgseal bench")["KeyMetadata"]["KeyId"])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def _kms_available() -> bool:
    try:
        import moto.server  # noqa: F401

        import proxy.crypto.kms  # noqa: F401
    except ImportError:
        return False
    return True


class _Replica:
    """One proxy's key handling: a key store, its cache and a planner."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], keyring: Keyring) -> None:
        self.counter = CountingKeyring(keyring)
        self.cache = KeyCache()
        self.store = KeyStore(pool, [self.counter], self.cache)
        self._columns: list[EncryptedColumn] = []

    async def start(self, rules_dir: Path, dsn: str) -> ColumnPlanner:
        """Set up keys the way the proxy does at start, and return a planner."""
        await self.store.setup()
        conn = await asyncpg.connect(dsn)
        try:
            rules = load_rules(rules_dir).for_database(DATABASE, DATABASE)
            catalog = await load_catalog(conn, rules)
        finally:
            await conn.close()
        self._columns = list(catalog.tables[0].encrypted.values())
        await self.refresh()
        return ColumnPlanner(catalog, KeyView(self.cache, self.store.store_id))

    async def refresh(self) -> None:
        """Load the columns' keys as the proxy does at start and every 20 s."""
        for column in self._columns:
            await self.store.active_key(column.key_name, algorithm_of(column))
        await self.store.load_keys([column.key_name for column in self._columns])

    async def seal(self, planner: ColumnPlanner, count: int) -> None:
        column = self._columns[0]
        value = secrets.token_bytes(32).hex().encode("ascii")
        for done in range(count):
            planner.seal_param(column, value, TEXT_FORMAT)
            if done and done % REFRESH_EVERY == 0:
                await self.refresh()


def _prepare_database(stack: Stack, workdir: Path) -> Path:
    with psycopg.connect(stack.dsn(dbname="postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(stack.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (id bigint, token text)")
    rules = workdir / "rules"
    rules.mkdir()
    (rules / "keys.yaml").write_text(_RULES, encoding="utf-8")
    return rules


async def _count(
    stack: Stack, keyring_of: Any, values: int, rules: Path
) -> dict[str, Any]:
    dsn = stack.dsn(dbname=DATABASE)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        first, second = _Replica(pool, keyring_of()), _Replica(pool, keyring_of())
        planner = await first.start(rules, dsn)
        await first.seal(planner, values)

        # A second replica over the same key store unwraps the stored key.
        # Its count is the same for any number of values, so it seals fewer.
        planner = await second.start(rules, dsn)
        await second.seal(planner, values // 10)
        async with pool.acquire() as conn:
            data_keys = await conn.fetchval("SELECT count(*) FROM pgseal.data_keys")
    finally:
        await pool.close()
    return {
        "data_keys_created": int(data_keys),
        "replicas": [
            _replica_calls(first, values),
            _replica_calls(second, values // 10),
        ],
    }


def _replica_calls(replica: _Replica, values: int) -> dict[str, Any]:
    counter = replica.counter
    calls: dict[str, Any] = {
        "values_sealed": values,
        "wrap": counter.wraps,
        "unwrap": counter.unwraps,
    }
    kms_calls = getattr(counter.inner, "calls", None)
    if kms_calls is not None:
        calls["kms_requests"] = kms_calls
        calls["kms_operations"] = dict(getattr(counter.inner, "operations", {}))
    return calls


def measure(stack: Stack, values: int) -> dict[str, Any]:
    """Seal `values` values in one replica, a tenth as many in a second, and
    count the keyring calls of each."""
    with tempfile.TemporaryDirectory(prefix="pgseal-keys-") as name:
        workdir = Path(name)
        rules = _prepare_database(stack, workdir)
        if _kms_available():
            from proxy.crypto.kms import AwsKmsKeyring

            with _moto_kms() as key_id:
                result = asyncio.run(
                    _count(stack, lambda: AwsKmsKeyring(key_id), values, rules)
                )
            result["keyring"] = "aws-kms (moto server on 127.0.0.1)"
            return result

        keydir = workdir / "sodium"
        SodiumKeyring.create(keydir)
        result = asyncio.run(
            _count(stack, lambda: SodiumKeyring.load(keydir), values, rules)
        )
        result["keyring"] = "sodium (proxy.crypto.kms not present)"
        return result
