"""A write-only proxy, which holds only the sodium public key: it seals, never opens."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.crypto.values import dearmour, read_key_ref
from proxy.errors import ConfigError
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

StartProxy = Callable[..., RunningProxy]

RULES = """\
tables:
  - name: public.notes
    columns:
      - name: lenient
        on_decrypt_error: null
      - name: strict
"""
DETERMINISTIC_RULES = (
    RULES + "      - name: lookup\n        encryption: deterministic\n"
)
TABLE = (
    "CREATE TABLE notes (id int PRIMARY KEY, lenient text, strict text, lookup text)"
)


@pytest.fixture
def notes_db(fresh_db: str, pg_cluster: PgServer) -> str:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    return fresh_db


def write_rules(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "notes.yaml").write_text(text)
    return folder


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules", RULES)


@pytest.fixture
def full(notes_db: str, rules: Path, start_proxy: StartProxy) -> RunningProxy:
    """A proxy with the private key, started first, so it creates version 1."""
    return start_proxy(notes_db, rules)


@pytest.fixture
def public_only(full: RunningProxy, tmp_path: Path) -> str:
    """Spec of a key directory that holds only the full proxy's public key."""
    keydir = tmp_path / "public-only"
    keydir.mkdir()
    shutil.copy(full.keydir / "public.key", keydir / "public.key")
    return f"sodium:{keydir}"


def insert(running: RunningProxy, row_id: int, lenient: str, strict: str) -> None:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notes (id, lenient, strict) VALUES (%s, %s, %s)",
            (row_id, lenient, strict),
        )


def select(running: RunningProxy, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        return conn.execute(query).fetchall()


def stored_version(running: RunningProxy, row_id: int) -> int:
    ((stored,),) = running.direct("SELECT strict FROM notes WHERE id = %s", (row_id,))
    _, version = read_key_ref(dearmour(stored.encode("ascii")))
    return version


def test_write_only_seals_full_reads(
    full: RunningProxy,
    public_only: str,
    notes_db: str,
    rules: Path,
    start_proxy: StartProxy,
) -> None:
    insert(full, 1, "lenient one", "strict one")
    writer = start_proxy(notes_db, rules, keyrings=[public_only])
    assert not writer.proxy.keystore.can_unwrap
    insert(writer, 2, "lenient two", "strict two")

    ((lenient, strict),) = writer.direct(
        "SELECT lenient, strict FROM notes WHERE id = 2"
    )
    assert_sealed(lenient, "lenient two")
    assert_sealed(strict, "strict two")
    assert stored_version(writer, 1) == 1
    assert stored_version(writer, 2) == 2

    reader = start_proxy(notes_db, rules)
    rows = select(reader, "SELECT id, lenient, strict FROM notes ORDER BY id")
    assert rows == [(1, "lenient one", "strict one"), (2, "lenient two", "strict two")]


def test_write_only_creates_version_at_start(
    full: RunningProxy,
    public_only: str,
    notes_db: str,
    rules: Path,
    start_proxy: StartProxy,
) -> None:
    start_proxy(notes_db, rules, keyrings=[public_only])
    versions = full.direct(
        "SELECT n.key_name, d.version, d.state FROM pgseal.data_keys d "
        "JOIN pgseal.key_names n USING (key_id) ORDER BY 1, 2"
    )
    assert versions == [
        ("public.notes.lenient", 1, "active"),
        ("public.notes.lenient", 2, "active"),
        ("public.notes.strict", 1, "active"),
        ("public.notes.strict", 2, "active"),
    ]
    # The new versions are wrapped for the same keyring, so a full proxy opens them.
    wrapped = full.direct(
        "SELECT DISTINCT keyring FROM pgseal.wrapped_keys WHERE version = 2"
    )
    assert wrapped == [(full.proxy.keyrings[0].name,)]


def test_write_only_reads_null(
    full: RunningProxy,
    public_only: str,
    notes_db: str,
    rules: Path,
    start_proxy: StartProxy,
) -> None:
    insert(full, 1, "lenient one", "strict one")
    writer = start_proxy(notes_db, rules, keyrings=[public_only])
    insert(writer, 2, "lenient two", "strict two")

    # Rows sealed by the full proxy and by the write-only one itself alike.
    rows = select(writer, "SELECT id, lenient FROM notes ORDER BY id")
    assert rows == [(1, None), (2, None)]


def test_write_only_read_fails_statement(
    full: RunningProxy,
    public_only: str,
    notes_db: str,
    rules: Path,
    start_proxy: StartProxy,
) -> None:
    writer = start_proxy(notes_db, rules, keyrings=[public_only])
    insert(writer, 2, "lenient two", "strict two")

    with psycopg.connect(writer.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DataCorrupted) as info:
            conn.execute("SELECT strict FROM notes WHERE id = 2").fetchall()
        assert info.value.sqlstate == "XX001"
        # Only the statement failed: the connection goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_write_only_rejects_deterministic(
    full: RunningProxy,
    public_only: str,
    notes_db: str,
    tmp_path: Path,
    start_proxy: StartProxy,
) -> None:
    rules = write_rules(tmp_path / "deterministic-rules", DETERMINISTIC_RULES)
    with pytest.raises(ConfigError) as info:
        start_proxy(notes_db, rules, keyrings=[public_only])
    message = str(info.value)
    assert "public.notes.lookup" in message
    assert "write-only" in message
    names = full.direct("SELECT key_name FROM pgseal.key_names ORDER BY 1")
    assert ("public.notes.lookup",) not in names
