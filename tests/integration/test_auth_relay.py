"""Authentication relayed unchanged: each method the server asks for, through the proxy."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.embedded import Cluster, make_dsn
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
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
    assert "pgseal: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr


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
