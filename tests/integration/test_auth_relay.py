"""Authentication relayed unchanged: each method the server asks for, through the proxy."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.cli import main
from proxy.embedded import Cluster, free_port, make_dsn
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, RunningProxy
from tests.integration.sealing import assert_sealed

PGSEAL = Path(sys.executable).parent / "pgseal"
METHODS = ["trust", "password", "md5", "scram-sha-256"]


@pytest.fixture
def method_users(oauth_proxy: RunningProxy, pg_cluster: PgServer) -> Iterator[dict[str, str]]:
    """Create one login per method, and put an hba line for each first."""
    if not isinstance(pg_cluster, Cluster):
        pytest.skip("needs the throwaway cluster, whose pg_hba.conf the test may edit")
    hba = pg_cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    passwords = {method: secrets.token_urlsafe(12) for method in METHODS}
    users = {method: _user(method) for method in METHODS}
    database = oauth_proxy.database
    with psycopg.connect(pg_cluster.dsn(database), autocommit=True) as conn:
        for method in METHODS:
            encryption = "md5" if method == "md5" else "scram-sha-256"
            conn.execute(f"SET password_encryption = '{encryption}'")
            conn.execute(
                f"CREATE ROLE {users[method]} LOGIN PASSWORD '{passwords[method]}'"
            )
            conn.execute(f"GRANT ALL ON oauth_tokens, oauth_tokens_id_seq TO {users[method]}")
    lines = [f"host all {users[m]} 127.0.0.1/32 {m}" for m in METHODS]
    hba.write_text("\n".join(lines) + "\n" + original)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    yield {users[m]: passwords[m] for m in METHODS}
    hba.write_text(original)
    with psycopg.connect(pg_cluster.dsn(database), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        for method in METHODS:
            conn.execute(f"DROP OWNED BY {users[method]}")
            conn.execute(f"DROP ROLE {users[method]}")


def _user(method: str) -> str:
    return f"auth_{method.replace('-', '_')}"


def test_each_method_through_proxy(
    oauth_proxy: RunningProxy, method_users: dict[str, str]
) -> None:
    for number, (user, password) in enumerate(method_users.items()):
        dsn = make_dsn("127.0.0.1", oauth_proxy.port, user, password, oauth_proxy.database)
        token = f"token-of-{user}-{number}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
                (number, token),
            )
            (read,) = conn.execute(
                "SELECT access_token FROM oauth_tokens WHERE user_id = %s", (number,)
            ).fetchone() or ()
        assert read == token
        ((stored,),) = oauth_proxy.direct(
            "SELECT access_token FROM oauth_tokens WHERE user_id = %s", (number,)
        )
        assert_sealed(stored, token)


@pytest.mark.parametrize("method", ["password", "md5", "scram-sha-256"])
def test_wrong_password_each_method(
    oauth_proxy: RunningProxy, method_users: dict[str, str], method: str
) -> None:
    user = _user(method)
    dsn = make_dsn("127.0.0.1", oauth_proxy.port, user, "not-the-password", oauth_proxy.database)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn)
    assert f'password authentication failed for user "{user}"' in str(info.value)


def test_database_without_rules_passes_through(
    oauth_proxy: RunningProxy, pg_cluster: PgServer
) -> None:
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS oauth_tokens (user_id int, access_token text)")
    try:
        dsn = make_dsn(
            "127.0.0.1", oauth_proxy.port, pg_cluster.superuser, pg_cluster.password, "postgres"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO oauth_tokens VALUES (1, %s)", ("unruled-database-token",)
            )
        with psycopg.connect(pg_cluster.dsn("postgres")) as conn:
            rows = conn.execute("SELECT access_token FROM oauth_tokens").fetchall()
        assert rows == [("unruled-database-token",)]
    finally:
        with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP TABLE oauth_tokens")


def test_serve_refuses_readable_private_key(oauth_proxy: RunningProxy) -> None:
    private = oauth_proxy.keydir / "private.key"
    private.chmod(0o644)
    result = subprocess.run(
        [str(PGSEAL), "serve", "--listen", "127.0.0.1:0",
         "--upstream", oauth_proxy.direct_dsn(), "--keyring", f"sodium:{oauth_proxy.keydir}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert f"chmod 600 {private}" in result.stderr


def test_serve_reports_unreachable_upstream(tmp_path: Path) -> None:
    from proxy.crypto.keyring import SodiumKeyring
    from proxy.embedded import free_port

    SodiumKeyring.create(tmp_path / "keys")
    closed = free_port()
    result = subprocess.run(
        [str(PGSEAL), "serve", "--listen", "127.0.0.1:0",
         "--upstream", f"postgresql://nobody:secret@127.0.0.1:{closed}/app",
         "--keyring", f"sodium:{tmp_path / 'keys'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert (
        f"pgseal: error: cannot connect to the upstream server at 127.0.0.1:{closed}"
        in result.stderr
    )
    assert "check that PostgreSQL is running there" in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr
    assert "pgseal stopped" not in result.stderr


def test_serve_reports_wrong_proxy_password(oauth_proxy: RunningProxy) -> None:
    upstream = oauth_proxy.direct_dsn().replace(oauth_proxy.server.password, "wrong-one")
    result = subprocess.run(
        [str(PGSEAL), "serve", "--listen", "127.0.0.1:0", "--upstream", upstream,
         "--keyring", f"sodium:{oauth_proxy.keydir}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "rejected the proxy's own connection" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reports_busy_listen_port(
    oauth_proxy: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", oauth_proxy.direct_dsn(),
             "--keyring", f"sodium:{oauth_proxy.keydir}", "--rules-poll-interval", "0"]
        )
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "choose another --listen port" in err


def test_negative_startup_length_shown_signed(oauth_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", oauth_proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!iI", -5, 0x00030000))
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received[:1] == b"E"
    assert b"C08P01\0" in received
    assert b"invalid startup packet length -5\0" in received


def test_serve_logs_tables_and_views(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
        conn.execute("CREATE VIEW tokens_view AS SELECT id, access_token FROM oauth_tokens")
    with caplog.at_level(logging.INFO, logger="proxy.app"):
        start_proxy(fresh_db)
    assert "1 ruled tables and 1 views over them" in caplog.text


def _passwordless_upstream(proxy: RunningProxy) -> str:
    server = proxy.server
    return f"postgresql://{server.superuser}@{server.host}:{server.port}/{proxy.database}"


def test_keys_list_reads_pgpassword(
    oauth_proxy: RunningProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.setenv("PGPASSWORD", oauth_proxy.server.password)
    args = ["keys", "list", "--upstream", _passwordless_upstream(oauth_proxy)]
    assert main([*args, "--keyring", f"sodium:{oauth_proxy.keydir}"]) == 0
    assert "public.oauth_tokens.access_token" in capsys.readouterr().out


def test_serve_reads_passfile(oauth_proxy: RunningProxy, tmp_path: Path) -> None:
    server = oauth_proxy.server
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        f"{server.host}:{server.port}:{oauth_proxy.database}:{server.superuser}:"
        + server.password.replace("\\", "\\\\").replace(":", "\\:")
        + "\n"
    )
    passfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    env["PGPASSFILE"] = str(passfile)
    port = free_port()

    process = subprocess.Popen(
        [str(PGSEAL), "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", _passwordless_upstream(oauth_proxy),
         "--keyring", f"sodium:{oauth_proxy.keydir}", "--rules-poll-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        output = ""
        for line in process.stdout:
            output += line
            if "pgseal listening" in line or "error" in line:
                break
        assert "pgseal listening" in output, output

        dsn = make_dsn("127.0.0.1", port, server.superuser, server.password,
                       oauth_proxy.database)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)",
                ("passfile-token",),
            )
        ((stored,),) = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
        assert_sealed(stored, "passfile-token")
    finally:
        process.terminate()
        process.wait(30)

    # A password file that others can read is ignored, so the login fails.
    passfile.chmod(0o644)
    result = subprocess.run(
        [str(PGSEAL), "keys", "list", "--upstream", _passwordless_upstream(oauth_proxy),
         "--keyring", f"sodium:{oauth_proxy.keydir}"],
        check=False, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 1
    assert f"password file {passfile} has group or world access" in result.stderr
    assert server.password not in result.stderr
