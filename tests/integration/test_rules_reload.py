"""`pgseal rules check`, and rules reloaded on a file change or SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.crypto.keyring import SodiumKeyring
from proxy.embedded import free_port, make_dsn
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, SHIPPED_RULES, RunningProxy
from tests.integration.sealing import assert_sealed

PGSEAL = Path(sys.executable).parent / "pgseal"
NOTES_RULE = "tables:\n  - name: public.notes\n    columns:\n      - name: body\n"


def _pgseal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PGSEAL), *args], capture_output=True, text=True, timeout=60
    )


def test_rules_check_reports_problems(fresh_db: str, pg_cluster: PgServer) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
        conn.execute(
            "ALTER TABLE oauth_tokens ADD CONSTRAINT token_prefix "
            "CHECK (access_token LIKE 'gho_%')"
        )
        conn.execute("CREATE UNIQUE INDEX ON oauth_tokens (refresh_token)")
    result = _pgseal(
        "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(SHIPPED_RULES)
    )
    assert result.returncode == 1
    assert "check constraint token_prefix" in result.stdout
    assert "access_token" in result.stdout
    assert "warning:" in result.stdout
    assert "unique index" in result.stdout


def test_rules_check_passes(fresh_db: str, pg_cluster: PgServer) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    result = _pgseal(
        "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(SHIPPED_RULES)
    )
    assert result.returncode == 0, result.stdout
    assert "ok: 1 table and 2 encrypted columns checked" in result.stdout


def test_rules_check_missing_table(fresh_db: str, pg_cluster: PgServer) -> None:
    result = _pgseal(
        "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(SHIPPED_RULES)
    )
    lines = (SHIPPED_RULES / "oauth_tokens.yaml").read_text().splitlines()
    line = lines.index("  - name: public.oauth_tokens") + 1
    assert result.returncode == 1
    expected = f"oauth_tokens.yaml line {line}: table public.oauth_tokens does not exist"
    assert expected in result.stdout
    assert "\n1 problem found in " in result.stdout
    assert result.stdout.count("does not exist") == 1


MANY_PROBLEMS_RULE = """\
tables:
  - name: public.many
    columns:
      - name: v
      - name: s
      - name: r
      - name: gone
"""


def test_rules_check_lists_every_problem(
    fresh_db: str, pg_cluster: PgServer, tmp_path: Path
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE many (id int PRIMARY KEY, v varchar(20), "
            "s text CHECK (s <> ''), r text UNIQUE)"
        )
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "many.yaml").write_text(MANY_PROBLEMS_RULE)
    result = _pgseal(
        "rules", "check", "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(rules)
    )
    assert result.returncode == 1
    assert "many.yaml line 4: column public.many.v cannot hold sealed values" in result.stdout
    assert "many.yaml line 7: unknown column 'gone' in public.many" in result.stdout
    assert "check constraint many_s_check" in result.stdout
    assert "unique index many_r_key includes randomized column public.many.r" in (
        result.stdout
    )
    assert "3 problems found in " in result.stdout


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, folder)
    return folder


def _wait_for_rejection(dsn: str, query: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                conn.execute(query)
            except psycopg.errors.FeatureNotSupported:
                return True
        time.sleep(0.2)
    return False


@pytest.fixture
def notes_proxy(
    fresh_db: str, pg_cluster: PgServer, start_proxy: Callable[..., RunningProxy], rules_dir: Path
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    return start_proxy(fresh_db, rules_dir, rules_poll_seconds=0.2)


def test_new_rule_file_takes_effect(notes_proxy: RunningProxy, rules_dir: Path) -> None:
    (rules_dir / "notes.yaml").write_text(NOTES_RULE)
    assert _wait_for_rejection(notes_proxy.dsn(), "SELECT id FROM notes WHERE body = 'x'")
    with psycopg.connect(notes_proxy.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO notes (body) VALUES (%s)", ("reloaded-secret-note",))
        read = conn.execute("SELECT body FROM notes").fetchall()
    assert read == [("reloaded-secret-note",)]
    ((stored,),) = notes_proxy.direct("SELECT body FROM notes")
    assert_sealed(stored, "reloaded-secret-note")


def test_broken_rule_file_keeps_rules(notes_proxy: RunningProxy, rules_dir: Path) -> None:
    (rules_dir / "oauth_tokens.yaml").write_text("tables:\n  - name: public.oauth_tokens\n")
    time.sleep(1.0)
    with psycopg.connect(notes_proxy.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) VALUES (1, %s)",
            ("still-sealed-token",),
        )
    ((stored,),) = notes_proxy.direct("SELECT access_token FROM oauth_tokens")
    assert_sealed(stored, "still-sealed-token")


@pytest.fixture
def served(
    fresh_db: str, pg_cluster: PgServer, rules_dir: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    SodiumKeyring.create(tmp_path / "keys")
    port = free_port()
    process = subprocess.Popen(
        [str(PGSEAL), "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", pg_cluster.dsn(fresh_db), "--rules", str(rules_dir),
         "--keyring", f"sodium:{tmp_path / 'keys'}", "--rules-poll-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    dsn = make_dsn("127.0.0.1", port, pg_cluster.superuser, pg_cluster.password, fresh_db)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            psycopg.connect(dsn).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.2)
    yield dsn, process
    process.send_signal(signal.SIGTERM)
    process.wait(20)


def test_sighup_reloads_rules(
    served: tuple[str, subprocess.Popen[str]], rules_dir: Path
) -> None:
    dsn, process = served
    (rules_dir / "notes.yaml").write_text(NOTES_RULE)
    time.sleep(0.5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT id FROM notes WHERE body = 'x'")
    os.kill(process.pid, signal.SIGHUP)
    assert _wait_for_rejection(dsn, "SELECT id FROM notes WHERE body = 'x'")
