"""Memory of the pgseal process: per idle connection, and while streaming rows.

Both figures read VmRSS from /proc/PID/status of the proxy subprocess, the
resident memory that the kernel charges to it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import asyncpg
import psycopg

from bench.pgbench import vm_rss_kib
from bench.services import DATABASE, HOST, STREAM_TABLE, SUPERUSER, Stack
from bench.workloads import random_token

log = logging.getLogger(__name__)

# Connections opened at once; each costs a server backend and a SCRAM
# exchange, which 2 cores serve at a few hundred per second.
CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 30.0
SETTLE_S = 1.0
SAMPLE_INTERVAL_S = 0.05

# Rows written through the proxy; the rest are copies of them made by the
# server, so the table fills in seconds instead of minutes.
SEED_ROWS = 1_000


async def _open(stack: Stack, port: int) -> asyncpg.Connection[asyncpg.Record]:
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
        host=HOST,
        port=port,
        user=SUPERUSER,
        password=stack.password,
        database=DATABASE,
        ssl=False,
        timeout=CONNECT_TIMEOUT_S,
    )
    return connection


async def _idle_connections(stack: Stack, count: int) -> dict[str, Any]:
    pid = stack.pgseal.pid
    port = stack.pgseal.port

    # One connection first, so that code paths loaded on first use are
    # resident before the baseline is read.
    warm = await _open(stack, port)
    await warm.fetchval("SELECT 1")
    await warm.close()
    await asyncio.sleep(SETTLE_S)
    before = vm_rss_kib(pid)

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one() -> asyncpg.Connection[asyncpg.Record]:
        async with gate:
            return await _open(stack, port)

    start = time.perf_counter()
    connections = await asyncio.gather(*(open_one() for _ in range(count)))
    connect_s = time.perf_counter() - start
    try:
        await asyncio.sleep(SETTLE_S)
        after = vm_rss_kib(pid)
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return {
        "connections": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "per_connection_kib": (after - before) / count,
        "connect_s": connect_s,
    }


def measure_idle(stack: Stack, count: int) -> dict[str, Any]:
    """Open `count` client connections through pgseal and read its RSS growth."""
    return asyncio.run(_idle_connections(stack, count))


@dataclass
class RssSampler:
    """A thread that records the peak RSS of a process until stopped."""

    pid: int
    peak_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(
            target=self._run, name="rss-sampler", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, vm_rss_kib(self.pid))
            self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL_S)


def _fill_stream_table(stack: Stack, rows: int) -> str:
    """Write SEED_ROWS sealed rows through pgseal, then copy them server-side.

    A copied value stays valid because its associated data names the column,
    not the row. Returns the token of row 1, to check the first result.
    """
    seed = min(rows, SEED_ROWS)
    tokens = [random_token() for _ in range(seed)]
    proxy_dsn = stack.dsn(stack.pgseal.port)
    with psycopg.connect(proxy_dsn, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {STREAM_TABLE} (id, token) VALUES (%s, %s)",
            list(enumerate(tokens, start=1)),
        )
    with psycopg.connect(stack.dsn(), autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {STREAM_TABLE} (id, token) "
            f"SELECT s.id + %s::bigint * k, s.token FROM {STREAM_TABLE} AS s "
            "CROSS JOIN generate_series(1, %s) AS k",
            (seed, (rows - 1) // seed),
        )
        conn.execute(f"DELETE FROM {STREAM_TABLE} WHERE id > %s", (rows,))
        conn.execute(f"VACUUM ANALYZE {STREAM_TABLE}")
    return tokens[0]


def _stream(dsn: str, first_token: str | None) -> tuple[int, float]:
    """Read the whole table row by row; return (rows, seconds).

    With first_token given, raise RuntimeError unless row 1 contains it.
    """
    query = f"SELECT id, token FROM {STREAM_TABLE}"
    count = 0
    start = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # stream() reads the result in single-row mode, so the client keeps
        # one row at a time while the server sends as fast as it is read.
        for row_id, token in conn.cursor().stream(query):
            if row_id == 1 and first_token is not None and token != first_token:
                raise RuntimeError(
                    "row 1 came back through pgseal with the wrong token"
                )
            count += 1
    return count, time.perf_counter() - start


def measure_stream(stack: Stack, rows: int) -> dict[str, Any]:
    """Stream `rows` rows with an encrypted column through pgseal, and directly."""
    first_token = _fill_stream_table(stack, rows)
    pid = stack.pgseal.pid
    before = vm_rss_kib(pid)
    with RssSampler(pid) as sampler:
        streamed, proxy_s = _stream(stack.dsn(stack.pgseal.port), first_token)
    after = vm_rss_kib(pid)
    if streamed != rows:
        raise RuntimeError(f"streamed {streamed} rows through pgseal, expected {rows}")

    # The same read without the proxy returns ciphertext; only its speed is
    # of interest here, so the token check is skipped.
    direct_rows, direct_s = _stream(stack.dsn(), None)
    return {
        "rows": rows,
        "rss_before_kib": before,
        "rss_peak_kib": sampler.peak_kib,
        "rss_after_kib": after,
        "growth_kib": sampler.peak_kib - before,
        "samples": sampler.samples,
        "proxy_rows_per_s": rows / proxy_s,
        "direct_rows_per_s": direct_rows / direct_s,
    }
