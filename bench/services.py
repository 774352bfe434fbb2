"""The servers a benchmark run measures: PostgreSQL, PgBouncer and pgseal.

Everything listens on 127.0.0.1 and lives in one temporary folder that is
removed when the stack stops. PostgreSQL and PgBouncer refuse to run as
root, so under root both run as the `pgseal` system user that
`proxy.embedded` creates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from proxy.embedded import SERVICE_USER, Cluster, find_bin_dir, free_port, make_dsn

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DATABASE = "bench"
SUPERUSER = "postgres"

# Room for the idle-connection test: one server backend per client of pgseal,
# plus the proxy's own pool and the benchmark's control connections.
MAX_CONNECTIONS = 1100

# A commit waits for its WAL flush only when synchronous_commit is on, and a
# disk flush can cost more than the proxy does. Turning it off keeps the
# figures about CPU and round trips, which is what a proxy changes.
SERVER_SETTINGS = {
    "max_connections": str(MAX_CONNECTIONS),
    "synchronous_commit": "off",
}

# `pgseal serve` on uvloop's event loop: asyncio.run() in Python 3.11 takes
# its loop from the event loop policy. With -c, sys.argv[0] is "-c".
_UVLOOP_LAUNCHER = (
    "import asyncio, sys, uvloop; "
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from proxy.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

TOKEN_TABLE = "bench_tokens"
LOOKUP_TABLE = "bench_lookup"
LOOKUP_PLAIN_TABLE = "bench_lookup_plain"
STREAM_TABLE = "stream_rows"
VALUES_TABLE = "bench_values"

_SCHEMA_SQL = f"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE {TOKEN_TABLE} (
    id bigint PRIMARY KEY,
    access_token text,
    refresh_token text
);
CREATE TABLE {LOOKUP_TABLE} (id bigint PRIMARY KEY, email text UNIQUE);
CREATE TABLE {LOOKUP_PLAIN_TABLE} (id bigint PRIMARY KEY, email text UNIQUE);
CREATE TABLE {STREAM_TABLE} (id bigint NOT NULL, token text);
CREATE TABLE {VALUES_TABLE} (
    id bigint PRIMARY KEY,
    token_text text,
    token_bytea bytea,
    token_det text
);
"""

# The rules that the "rules" proxy loads. The pgbench tables are not named,
# so pgbench -S through this proxy measures statements that match no rule.
RULES_YAML = f"""\
tables:
  - name: public.{TOKEN_TABLE}
    columns:
      - name: access_token
        encryption: randomized
      - name: refresh_token
        encryption: randomized
  - name: public.{LOOKUP_TABLE}
    columns:
      - name: email
        encryption: deterministic
  - name: public.{STREAM_TABLE}
    columns:
      - name: token
        encryption: randomized
  - name: public.{VALUES_TABLE}
    columns:
      - name: token_text
        encryption: randomized
      - name: token_bytea
        encryption: randomized
      - name: token_det
        encryption: deterministic
"""


class BenchSetupError(RuntimeError):
    """A server of the benchmark stack failed to install, start or accept
    connections."""


@dataclass
class Service:
    """A server process started by the stack, with the port it listens on."""

    name: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """The running servers, and how to reach each of them."""

    workdir: Path
    cluster: Cluster = field(repr=False)
    keydir: Path
    rules_dir: Path
    pgbouncer: Service
    pgseal: Service
    pgseal_no_rules: Service

    @property
    def password(self) -> str:
        return self.cluster.password

    def dsn(self, port: int | None = None, dbname: str = DATABASE) -> str:
        """Build a URI for the superuser, direct or through the port given."""
        target = self.cluster.port if port is None else port
        return make_dsn(HOST, target, SUPERUSER, self.password, dbname)

    def ports(self) -> dict[str, int]:
        """Return the port of each target that pgbench can be pointed at."""
        return {
            "direct": self.cluster.port,
            "pgbouncer": self.pgbouncer.port,
            "pgseal": self.pgseal.port,
            "pgseal-no-rules": self.pgseal_no_rules.port,
        }

    def client_env(self) -> dict[str, str]:
        """Return the environment for libpq tools such as pgbench and psql."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = self.password
        # No target here is set up for TLS, so asking for it adds a round trip.
        env["PGSSLMODE"] = "disable"
        return env


@contextlib.contextmanager
def running_stack(scale: int = 1, uvloop: bool = False) -> Iterator[Stack]:
    """Start PostgreSQL 15, PgBouncer and two pgseal proxies; stop them after.

    With uvloop, both proxies run on uvloop's event loop.
    """
    workdir = Path(tempfile.mkdtemp(prefix="pgseal-bench-"))
    # The service user must reach the data and PgBouncer folders inside.
    workdir.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            cluster = _start_cluster(workdir)
            stack.callback(cluster.stop)
            _prepare_database(cluster, scale)

            keydir = workdir / "keys"
            _run_pgseal(["keys", "init", "--keyring", f"sodium:{keydir}"])
            rules = _write_rules(workdir / "rules", RULES_YAML)
            no_rules = _write_rules(workdir / "rules-empty", None)

            bouncer = stack.enter_context(_pgbouncer(workdir, cluster))
            command = _pgseal_command(uvloop)
            pgseal = stack.enter_context(
                _pgseal(command, workdir, cluster, keydir, rules)
            )
            plain = stack.enter_context(
                _pgseal(command, workdir, cluster, keydir, no_rules)
            )
            yield Stack(workdir, cluster, keydir, rules, bouncer, pgseal, plain)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _start_cluster(workdir: Path) -> Cluster:
    password = secrets.token_urlsafe(18)
    cluster = Cluster(find_bin_dir("system"), workdir / "data", password=password)
    cluster.init()
    conf = cluster.data_dir / "postgresql.conf"
    with conf.open("a", encoding="utf-8") as handle:
        handle.write("\n# pgseal benchmark\n")
        for name, value in SERVER_SETTINGS.items():
            handle.write(f"{name} = '{value}'\n")
    cluster.start()
    return cluster


def _prepare_database(cluster: Cluster, scale: int) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(cluster.dsn(DATABASE), autocommit=True) as conn:
        conn.execute(_SCHEMA_SQL)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = cluster.password
    command = [
        "pgbench", "-i", "-q", "-s", str(scale),
        "-h", HOST, "-p", str(cluster.port), "-U", SUPERUSER, DATABASE,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if result.returncode != 0:
        raise BenchSetupError(f"pgbench -i failed: {result.stderr.strip()}")


def _write_rules(folder: Path, text: str | None) -> Path:
    folder.mkdir()
    if text is not None:
        (folder / "bench.yaml").write_text(text, encoding="utf-8")
    return folder


def _pgseal_command(uvloop: bool = False) -> list[str]:
    if uvloop:
        return [sys.executable, "-c", _UVLOOP_LAUNCHER]
    # The console script next to this interpreter, when the project is
    # installed; the module otherwise, which runs the same main().
    script = Path(sys.executable).parent / "pgseal"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "proxy.cli"]


def _run_pgseal(arguments: list[str]) -> None:
    command = _pgseal_command() + arguments
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise BenchSetupError(f"pgseal {' '.join(arguments)} failed: {result.stderr}")


@contextlib.contextmanager
def _pgseal(
    launcher: list[str], workdir: Path, cluster: Cluster, keydir: Path, rules: Path
) -> Iterator[Service]:
    port = free_port()
    name = f"pgseal-{rules.name}"
    command = launcher + [
        "serve",
        "--listen", f"{HOST}:{port}",
        "--upstream", cluster.dsn(DATABASE),
        "--rules", str(rules),
        "--keyring", f"sodium:{keydir}",
    ]  # fmt: skip
    with _service(name, port, command, workdir / f"{name}.log", None) as service:
        yield service


@contextlib.contextmanager
def _pgbouncer(workdir: Path, cluster: Cluster) -> Iterator[Service]:
    binary = ensure_pgbouncer()
    folder = workdir / "pgbouncer"
    folder.mkdir(mode=0o700)
    port = free_port()
    config = folder / "pgbouncer.ini"
    config.write_text(_pgbouncer_ini(folder, cluster.port, port), encoding="utf-8")

    # PgBouncer compares the client's SCRAM proof with this password and logs
    # in to the server with it, so one line serves both directions.
    users = folder / "userlist.txt"
    users.write_text(f'"{SUPERUSER}" "{cluster.password}"\n', encoding="utf-8")
    users.chmod(0o600)

    account = _service_account()
    if account is not None:
        for path in (folder, config, users):
            os.chown(path, account.pw_uid, account.pw_gid)
    command = [binary, str(config)]
    with _service("pgbouncer", port, command, workdir / "pgbouncer.log", account) as s:
        yield s


def _pgbouncer_ini(folder: Path, server_port: int, port: int) -> str:
    # Session pooling: each client keeps one server connection, as with pgseal.
    # The pool is larger than the most clients a run opens (32).
    return f"""\
[databases]
{DATABASE} = host={HOST} port={server_port} dbname={DATABASE}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {folder / "userlist.txt"}
pool_mode = session
max_client_conn = 200
default_pool_size = 64
pidfile = {folder / "pgbouncer.pid"}
"""


def ensure_pgbouncer() -> str:
    """Return the pgbouncer binary, installing Debian's package when missing."""
    found = shutil.which("pgbouncer") or _existing("/usr/sbin/pgbouncer")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchSetupError(
            "pgbouncer not found; install it (Debian: apt-get install pgbouncer)"
        )
    log.info("installing pgbouncer with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "pgbouncer"],
    ):
        subprocess.run(command, env=env, capture_output=True, timeout=600, check=False)
    found = shutil.which("pgbouncer") or _existing("/usr/sbin/pgbouncer")
    if not found:
        raise BenchSetupError("apt-get install pgbouncer did not install pgbouncer")
    return found


def _existing(path: str) -> str | None:
    return path if Path(path).is_file() else None


def _service_account() -> pwd.struct_passwd | None:
    # Cluster.init() has created the user by now when running as root.
    return pwd.getpwnam(SERVICE_USER) if os.geteuid() == 0 else None


@contextlib.contextmanager
def _service(
    name: str,
    port: int,
    command: list[str],
    log_path: Path,
    account: pwd.struct_passwd | None,
) -> Iterator[Service]:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )
    service = Service(name, port, process, log_path)
    try:
        _wait_listening(service)
        log.info("started %s on %s:%d (pid %d)", name, HOST, port, process.pid)
        yield service
    finally:
        _stop(service)


def _wait_listening(service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise BenchSetupError(
                f"{service.name} exited with {service.process.returncode} at "
                f"start; last log lines:\n{service.log_tail()}"
            )
        with contextlib.suppress(OSError):
            socket.create_connection((HOST, service.port), timeout=1).close()
            return
        time.sleep(0.1)
    raise BenchSetupError(
        f"{service.name} did not listen on {HOST}:{service.port} within "
        f"{READY_TIMEOUT_S:g} s; last log lines:\n{service.log_tail()}"
    )


def _stop(service: Service) -> None:
    process = service.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM; killing it", service.name, process.pid
            )
            process.kill()
            process.wait(STOP_TIMEOUT_S)
    log.info("stopped %s", service.name)
