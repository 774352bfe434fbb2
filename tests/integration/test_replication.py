"""Replication connections through the proxy, with pg_recvlogical and pg_receivewal.

A client that connects with `replication=database` gets a walsender, which
takes replication commands and plain SQL in the simple query protocol.
The proxy relays the replication commands and the CopyBoth stream of
START_REPLICATION unchanged, so a logical decoding consumer receives the
encrypted columns as the table stores them: ciphertext. SQL on the same
connection is sealed as on any other. A physical replication connection
(`replication=true`) streams the WAL, which contains the same ciphertext.

These tests start a cluster of their own with wal_level=logical, from the
machine's PostgreSQL, whose pg_recvlogical they run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from proxy.embedded import Cluster, find_bin_dir
from proxy.tls import SslMode
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_replicated_" + "Hn5" * 20
LITERAL_TOKEN = "gho_walsender_literal_" + "Pz2" * 10
SLOT = "pgseal_test_slot"
TIMEOUT = 60
# Every login, replication included, uses SCRAM on loopback.
HBA_LINES = (
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
)


@pytest.fixture(scope="module")
def logical_cluster() -> Iterator[Cluster]:
    """A throwaway cluster with wal_level=logical and SCRAM replication logins."""
    bin_dir = find_bin_dir("system")
    if not (bin_dir / "pg_recvlogical").is_file():
        pytest.skip(f"pg_recvlogical not found in {bin_dir}")
    # The `pgseal` service user runs the server under root and must be
    # able to enter this directory.
    base = Path(tempfile.mkdtemp(prefix="pgseal-test-"))
    base.chmod(0o755)
    cluster = Cluster(
        bin_dir,
        base / "data",
        password=secrets.token_urlsafe(24),
        extra_conf={"wal_level": "logical", "max_replication_slots": "4"},
        hba_lines=HBA_LINES,
    )
    try:
        with cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def logical_proxy(
    logical_cluster: Cluster, start_proxy: Callable[..., RunningProxy]
) -> Iterator[RunningProxy]:
    """A proxy with the OAuth rules over a new database of the logical cluster."""
    name = f"pgseal_test_{uuid.uuid4().hex[:12]}"
    identifier = sql.Identifier(name)
    with psycopg.connect(logical_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(identifier))
    with psycopg.connect(logical_cluster.dsn(name), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    yield start_proxy(
        name, server=logical_cluster, upstream_options={"sslmode": SslMode.DISABLE}
    )
    with psycopg.connect(logical_cluster.dsn(), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(identifier))


def replication_conninfo(proxy: RunningProxy) -> str:
    """Conninfo of a replication=database connection through the proxy."""
    return (
        f"host=127.0.0.1 port={proxy.port} dbname={proxy.database} "
        f"user={proxy.server.superuser} sslmode=disable replication=database"
    )


def run_client(cluster: Cluster, program: str, *args: str) -> str:
    """Run a client program of the cluster's bin directory and return its output."""
    result = subprocess.run(
        [str(cluster.bin_dir / program), *args],
        env={**os.environ, "PGPASSWORD": cluster.password},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_recvlogical_streams_ciphertext(
    logical_cluster: Cluster, logical_proxy: RunningProxy
) -> None:
    conninfo = replication_conninfo(logical_proxy)
    run_client(
        logical_cluster,
        "pg_recvlogical",
        "--dbname",
        conninfo,
        "--slot",
        SLOT,
        "--create-slot",
        "--plugin",
        "test_decoding",
    )
    with psycopg.connect(logical_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
            (7, TOKEN),
        )
    ((end,),) = logical_proxy.direct("SELECT pg_current_wal_lsn()::text")

    # START_REPLICATION, a CopyBoth stream with standby status updates from
    # the client, up to the WAL position after the INSERT.
    output = run_client(
        logical_cluster,
        "pg_recvlogical",
        "--dbname",
        conninfo,
        "--slot",
        SLOT,
        "--start",
        "--endpos",
        end,
        "--no-loop",
        "--file",
        "-",
    )
    ((stored,),) = logical_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, TOKEN)
    assert "table public.oauth_tokens: INSERT:" in output
    assert TOKEN not in output
    decoded = re.search(r"access_token\[text\]:'([^']*)'", output)
    assert decoded is not None
    assert decoded.group(1) == stored

    run_client(
        logical_cluster,
        "pg_recvlogical",
        "--dbname",
        conninfo,
        "--slot",
        SLOT,
        "--drop-slot",
    )
    slots = logical_proxy.direct("SELECT slot_name FROM pg_replication_slots")
    assert slots == []


def test_receivewal_streams_ciphertext(
    logical_cluster: Cluster, logical_proxy: RunningProxy, tmp_path: Path
) -> None:
    with psycopg.connect(logical_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
            (9, TOKEN),
        )
    ((end,),) = logical_proxy.direct("SELECT pg_current_wal_lsn()::text")
    ((stored,),) = logical_proxy.direct("SELECT access_token FROM oauth_tokens")

    # pg_receivewal adds replication=true itself: a physical replication
    # connection, whose CopyBoth stream carries the WAL as the server wrote it.
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    run_client(
        logical_cluster,
        "pg_receivewal",
        "--dbname",
        f"host=127.0.0.1 port={logical_proxy.port} "
        f"user={logical_proxy.server.superuser} sslmode=disable",
        "--directory",
        str(wal_dir),
        "--endpos",
        end,
        "--no-loop",
    )
    wal = b"".join(path.read_bytes() for path in sorted(wal_dir.iterdir()))
    assert_sealed(stored, TOKEN)
    assert stored.encode() in wal
    assert TOKEN.encode() not in wal


def test_walsender_sql_sealed(
    logical_cluster: Cluster, logical_proxy: RunningProxy
) -> None:
    conninfo = replication_conninfo(logical_proxy)
    output = run_client(
        logical_cluster,
        "psql",
        "--no-psqlrc",
        "--tuples-only",
        "--no-align",
        "--dbname",
        conninfo,
        "--command",
        "IDENTIFY_SYSTEM",
        "--command",
        "INSERT INTO oauth_tokens (user_id, access_token) "
        f"VALUES (8, '{LITERAL_TOKEN}')",
        "--command",
        "SELECT access_token FROM oauth_tokens WHERE user_id = 8",
    )
    lines = output.splitlines()
    ((system_id,),) = logical_proxy.direct(
        "SELECT system_identifier::text FROM pg_control_system()"
    )
    assert lines[0].startswith(f"{system_id}|")
    assert lines[-1] == LITERAL_TOKEN
    ((stored,),) = logical_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, LITERAL_TOKEN)
