"""The value path: sealing and opening one 64-byte value, and its stored size.

pgseal is timed through `ColumnPlanner.seal_param` and `open_value`, the
calls the session makes for each parameter and result value, over a
`KeyView` and `KeyCache` holding one data key. The comparisons are a bare
PyNaCl AEAD loop (the floor for any XChaCha20-Poly1305 sealer), pgcrypto's
`pgp_sym_encrypt` run in the server, and the AWS Encryption SDK with its
caching materials manager and a raw AES keyring.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nacl.bindings
import psycopg

from bench.pgbench import process_cpu_seconds
from bench.services import DATABASE, VALUES_TABLE, Stack
from proxy.catalog import Catalog, EncryptedColumn, load_catalog
from proxy.crypto.keystore import KeyCache
from proxy.crypto.values import DataKey, ValueCipher
from proxy.planner import ColumnPlanner, KeyView, algorithm_of
from proxy.rules import load_rules
from proxy.wire.messages import BINARY_FORMAT, TEXT_FORMAT

VALUE_SIZE = 64
REPEATS = 3
NONCE_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES

Operation = Callable[[], object]

_STORE_ID = secrets.token_bytes(16)
CACHE_TTL_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class PlannerFixture:
    """A planner over the benchmark's value table and its encrypted columns."""

    planner: ColumnPlanner
    view: KeyView
    catalog: Catalog
    text: EncryptedColumn
    bytea: EncryptedColumn
    deterministic: EncryptedColumn
    keys: dict[str, DataKey] = field(repr=False)

    def candidates(self, column: EncryptedColumn) -> Any:
        """Return what open_value() takes for a result field of `column`."""
        table = self.catalog.lookup("public", VALUES_TABLE)
        assert table is not None
        return self.catalog.column_at(table.oid, column.attnum)


async def load_planner(stack: Stack) -> PlannerFixture:
    """Build a planner from the benchmark's rules and the server's catalog.

    The key cache contains one data key per column, created here, so no
    keyring and no key store take part in the timings.
    """
    rules = load_rules(stack.rules_dir)
    conn = await asyncpg.connect(stack.dsn())
    try:
        catalog = await load_catalog(conn, rules.for_database(DATABASE, DATABASE))
    finally:
        await conn.close()
    table = catalog.lookup("public", VALUES_TABLE)
    if table is None:
        raise RuntimeError(f"rules for {VALUES_TABLE} did not load")

    # Entries outlive the longest run: nothing refreshes this cache, unlike
    # the proxy's, which reloads its keys every 20 s.
    cache = KeyCache(ttl=CACHE_TTL_S, active_ttl=CACHE_TTL_S)
    keys = {}
    for key_id, column in enumerate(table.encrypted.values(), start=1):
        key = DataKey.generate(key_id, 1, algorithm_of(column))
        cache.put(key)
        cache.set_active(column.key_name, (key.key_id, key.version))
        keys[column.name] = key
    view = KeyView(cache, _STORE_ID)
    columns = table.encrypted
    return PlannerFixture(
        ColumnPlanner(catalog, view),
        view,
        catalog,
        columns["token_text"],
        columns["token_bytea"],
        columns["token_det"],
        keys,
    )


def rates(operations: dict[str, Operation], count: int) -> dict[str, float]:
    """Return the median calls per CPU second of each operation.

    Each operation runs REPEATS loops of `count` calls, interleaved with the
    others, so a busy spell of the machine falls on all of them alike. The
    clock is this thread's CPU time: time spent preempted by other processes
    is not counted, which keeps the ratios stable on a shared machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(REPEATS):
        for name, operation in operations.items():
            start = time.thread_time()
            for _ in range(count):
                operation()
            samples[name].append(count / (time.thread_time() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def _pgseal_operations(fixture: PlannerFixture, value: bytes) -> dict[str, Operation]:
    planner = fixture.planner
    text, raw, det = fixture.text, fixture.bytea, fixture.deterministic
    text_fields, raw_fields = fixture.candidates(text), fixture.candidates(raw)
    cipher = ValueCipher(fixture.keys[raw.name], store_id=_STORE_ID, context=raw.key_name)
    armoured = planner.seal_param(text, value, TEXT_FORMAT)
    binary = planner.seal_param(raw, value, BINARY_FORMAT)
    if planner.open_value(text_fields, armoured, TEXT_FORMAT) != value:
        raise RuntimeError("pgseal did not open its own text value")
    return {
        "seal_text_per_s": lambda: planner.seal_param(text, value, TEXT_FORMAT),
        "seal_bytea_per_s": lambda: planner.seal_param(raw, value, BINARY_FORMAT),
        "seal_deterministic_text_per_s": lambda: planner.seal_param(
            det, value, TEXT_FORMAT
        ),
        "open_text_per_s": lambda: planner.open_value(
            text_fields, armoured, TEXT_FORMAT
        ),
        "open_bytea_per_s": lambda: planner.open_value(
            raw_fields, binary, BINARY_FORMAT
        ),
        "crypto_seal_only_per_s": lambda: cipher.seal(value),
    }


def _pynacl_operations(value: bytes) -> dict[str, Operation]:
    encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
    decrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt
    key = secrets.token_bytes(32)
    nonce = secrets.token_bytes(NONCE_SIZE)
    ciphertext = encrypt(value, None, nonce, key)
    return {
        "encrypt_fresh_nonce_per_s": lambda: encrypt(
            value, None, os.urandom(NONCE_SIZE), key
        ),
        "encrypt_fixed_nonce_per_s": lambda: encrypt(value, None, nonce, key),
        "decrypt_per_s": lambda: decrypt(ciphertext, None, nonce, key),
    }


def measure_crypto(fixture: PlannerFixture, count: int) -> dict[str, dict[str, Any]]:
    """Time pgseal's seal and open of one value against bare PyNaCl calls."""
    value = secrets.token_bytes(VALUE_SIZE // 2).hex().encode("ascii")
    pgseal_ops = _pgseal_operations(fixture, value)
    nacl_ops = _pynacl_operations(value)
    measured = rates({**pgseal_ops, **nacl_ops}, count)

    armoured = fixture.planner.seal_param(fixture.text, value, TEXT_FORMAT)
    binary = fixture.planner.seal_param(fixture.bytea, value, BINARY_FORMAT)
    pgseal: dict[str, Any] = {name: measured[name] for name in pgseal_ops}
    pgseal.update(
        stored_bytes_bytea=len(binary),
        stored_bytes_text=len(armoured),
        overhead_bytes_bytea=len(binary) - VALUE_SIZE,
        overhead_bytes_text=len(armoured) - VALUE_SIZE,
    )
    pynacl: dict[str, Any] = {name: measured[name] for name in nacl_ops}
    pynacl["stored_bytes"] = NONCE_SIZE + VALUE_SIZE + TAG_SIZE
    return {"pgseal": pgseal, "pynacl": pynacl}


def _backend_cpu_seconds(conn: psycopg.Connection[tuple[Any, ...]]) -> float:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return process_cpu_seconds(int(row[0]))


def measure_pgcrypto(stack: Stack, count: int) -> dict[str, Any]:
    """Time pgp_sym_encrypt of `count` 64-character values inside the server.

    The clock is the server backend's CPU time, read from /proc, so that the
    figure compares with the CPU-time rates of the other implementations.
    """
    query = (
        "SELECT count(pgp_sym_encrypt(md5(i::text) || md5(i::text), 'bench-key')) "
        "FROM generate_series(1, %s) AS i"
    )
    per_second = []
    with psycopg.connect(stack.dsn(), autocommit=True) as conn:
        for _ in range(REPEATS):
            start = _backend_cpu_seconds(conn)
            conn.execute(query, (count,))
            used = _backend_cpu_seconds(conn) - start
            if used <= 0:
                raise RuntimeError(
                    f"pgp_sym_encrypt of {count} values used less CPU time than "
                    "the clock resolves; measure more values"
                )
            per_second.append(count / used)
        row = conn.execute(
            "SELECT octet_length(pgp_sym_encrypt(repeat('x', %s), 'bench-key'))",
            (VALUE_SIZE,),
        ).fetchone()
    assert row is not None
    return {
        "encrypt_per_s": statistics.median(per_second),
        "stored_bytes": int(row[0]),
        "overhead_bytes": int(row[0]) - VALUE_SIZE,
        "options": "pgp_sym_encrypt defaults (AES-128, iterated and salted S2K)",
    }


def measure_esdk(count: int) -> dict[str, Any]:
    """Time the AWS Encryption SDK, or return why it was not measured."""
    try:
        from bench import esdk
    except ImportError as exc:
        return {
            "measured": False,
            "reason": f"aws-encryption-sdk not importable: {exc}",
        }
    return esdk.measure(count, VALUE_SIZE, rates)


def measure(
    stack: Stack, values: int, pgcrypto_values: int, esdk_values: int
) -> dict[str, Any]:
    """Run every value-path measurement and return them by implementation."""
    fixture = asyncio.run(load_planner(stack))
    return {
        "value_bytes": VALUE_SIZE,
        **measure_crypto(fixture, values),
        "pgcrypto": measure_pgcrypto(stack, pgcrypto_values),
        "aws_esdk": measure_esdk(esdk_values),
    }
