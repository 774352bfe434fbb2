"""Key lifecycle commands against a real server and running proxies.

rotate, reencrypt and retire on one table, rewrap to another keyring and to
AWS KMS (moto), automatic rotation by rotation_period and by
max_values_per_key, and the audit log they write.
"""

from __future__ import annotations

import base64
import json
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.cli import main
from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.keystore import KeyStore
from proxy.crypto.values import dearmour, read_key_ref
from proxy.embedded import make_dsn
from proxy.errors import KeyringError
from tests.fixtures.kms import KmsKey
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy

StartProxy = Callable[..., RunningProxy]

RULES = """\
tables:
  - name: public.notes
    columns:
      - name: body
        on_decrypt_error: "null"
      - name: secret
      - name: email
        encryption: deterministic
"""
TABLE = """
CREATE TABLE notes (
    id integer PRIMARY KEY,
    body text,
    secret bytea,
    email text UNIQUE
)
"""
BODY = "public.notes.body"
EMAIL = "public.notes.email"
REFRESH = 0.2


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "notes.yaml").write_text(RULES)
    return folder


@pytest.fixture
def notes(
    fresh_db: str, pg_cluster: PgServer, start_proxy: StartProxy, rules_dir: Path
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    return start_proxy(fresh_db, rules_dir, key_refresh_seconds=REFRESH)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `pgseal ARGS` in this process; return the exit code, stdout and stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def connection(running: RunningProxy, *keyrings: str) -> list[str]:
    specs = keyrings or (f"sodium:{running.keydir}",)
    args = ["--upstream", running.direct_dsn()]
    for spec in specs:
        args += ["--keyring", spec]
    return args


def insert(running: RunningProxy, first: int, count: int) -> None:
    rows = [
        (n, f"note {n}", f"secret {n}".encode(), f"user{n}@example.com")
        for n in range(first, first + count)
    ]
    with (
        psycopg.connect(running.dsn(), autocommit=True) as conn,
        conn.cursor() as cursor,
    ):
        cursor.executemany(
            "INSERT INTO notes (id, body, secret, email) VALUES (%s, %s, %s, %s)",
            rows,
        )


def read_bodies(running: RunningProxy) -> dict[int, str | None]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
    return {int(row[0]): row[1] for row in rows}


def stored_versions(running: RunningProxy, column: str = "body") -> dict[int, int]:
    """Map each row id to the key version of its stored value, read directly."""
    versions = {}
    for row_id, value in running.direct(f"SELECT id, {column} FROM notes ORDER BY id"):
        blob = (
            bytes(value)
            if isinstance(value, (bytes, memoryview))
            else dearmour(value.encode("ascii"))
        )
        versions[int(row_id)] = read_key_ref(blob)[1]
    return versions


def active_version(running: RunningProxy, key_name: str) -> int | None:
    ref = running.proxy._cache.active_ref(key_name)
    return None if ref is None else ref[1]


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def key_versions(running: RunningProxy, key_name: str) -> list[tuple[int, str]]:
    rows = running.direct(
        "SELECT d.version, d.state FROM pgseal.data_keys d "
        "JOIN pgseal.key_names n USING (key_id) WHERE n.key_name = %s "
        "ORDER BY d.version",
        (key_name,),
    )
    return [(int(version), str(state)) for version, state in rows]


def rotate(
    capsys: pytest.CaptureFixture[str], running: RunningProxy, column: str, *extra: str
) -> None:
    code, _, err = cli(
        capsys, "keys", "rotate", *connection(running), "--column", column, *extra
    )
    assert code == 0, err
    wait_until(lambda: active_version(running, column) == 2)


def reencrypt(
    capsys: pytest.CaptureFixture[str],
    running: RunningProxy,
    rules_dir: Path,
    *extra: str,
) -> tuple[int, str, str]:
    return cli(
        capsys,
        "reencrypt",
        *connection(running),
        "--table",
        "public.notes",
        "--rules",
        str(rules_dir),
        *extra,
    )


def test_rotate_new_writes_use_new_version(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    insert(notes, 1, 3)
    rotate(capsys, notes, BODY)
    insert(notes, 4, 2)

    assert stored_versions(notes) == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2}
    assert read_bodies(notes) == {n: f"note {n}" for n in range(1, 6)}
    assert key_versions(notes, BODY) == [(1, "active"), (2, "active")]
    assert key_versions(notes, EMAIL) == [(1, "active")]


def test_rotate_unknown_column_fails(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(
        capsys, "keys", "rotate", *connection(notes), "--column", "public.notes.nope"
    )
    assert code == 1
    assert "has no data key in the key store" in err


def test_rotate_deterministic_warns(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "keys", "rotate", *connection(notes), "--column", EMAIL)
    assert code == 0
    assert "is deterministic" in err


def test_reencrypt_moves_all_rows(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 120)
    rotate(capsys, notes, BODY)
    code, out, err = reencrypt(capsys, notes, rules_dir, "--batch-size", "50")

    assert code == 0, err
    assert "finished" in out
    assert "120 values re-sealed" in out
    assert set(stored_versions(notes).values()) == {2}
    assert set(stored_versions(notes, "secret").values()) == {1}
    assert read_bodies(notes) == {n: f"note {n}" for n in range(1, 121)}
    assert "rows/s" in err
    assert "\r" in err


def test_reencrypt_resumes(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 25)
    rotate(capsys, notes, BODY)
    code, out, _ = reencrypt(
        capsys, notes, rules_dir, "--batch-size", "10", "--max-batches", "1"
    )
    assert code == 0
    assert "stopped; run again to resume" in out
    versions = stored_versions(notes)
    assert [versions[n] for n in range(1, 11)] == [2] * 10
    assert [versions[n] for n in range(11, 26)] == [1] * 15
    progress = notes.direct(
        "SELECT last_key, finished_at FROM pgseal.reencrypt_progress"
    )
    assert progress == [(["10"], None)]

    code, out, _ = reencrypt(capsys, notes, rules_dir, "--batch-size", "10")
    assert code == 0
    assert "15 rows read" in out
    assert set(stored_versions(notes).values()) == {2}
    assert notes.direct(
        "SELECT last_key IS NULL, finished_at IS NOT NULL "
        "FROM pgseal.reencrypt_progress"
    ) == [(True, True)]


def test_reencrypt_rate_limited(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 20)
    started = time.monotonic()
    code, _, _ = reencrypt(
        capsys, notes, rules_dir, "--batch-size", "5", "--max-rows-per-second", "40"
    )
    assert code == 0
    # 20 rows at 40 rows per second take at least half a second.
    assert time.monotonic() - started >= 0.5


def test_reencrypt_plaintext_needs_flag(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    notes.direct(
        "INSERT INTO notes (id, body, secret) VALUES (1, 'plain one', '\\x0102'), "
        "(2, 'plain two', NULL)"
    )
    code, _, err = reencrypt(capsys, notes, rules_dir)
    assert code == 1
    assert "run again with --seal-plaintext" in err
    assert "plain one" not in err
    assert notes.direct("SELECT body FROM notes ORDER BY id") == [
        ("plain one",),
        ("plain two",),
    ]

    code, out, err = reencrypt(capsys, notes, rules_dir, "--seal-plaintext")
    assert code == 0, err
    assert "3 plaintext values sealed" in out
    assert stored_versions(notes) == {1: 1, 2: 1}
    assert read_bodies(notes) == {1: "plain one", 2: "plain two"}
    with psycopg.connect(notes.dsn(), autocommit=True) as conn:
        secret = conn.execute("SELECT secret FROM notes WHERE id = 1").fetchone()
    assert secret == (b"\x01\x02",)


def test_reencrypt_skips_garbage(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 2)
    rotate(capsys, notes, BODY)
    # A well-formed value of another column, and armour that does not decode.
    notes.direct(
        "UPDATE notes SET body = (SELECT email FROM notes WHERE id = 2) WHERE id = 1"
    )
    notes.direct("UPDATE notes SET body = 'pgs:not-a-value' WHERE id = 2")
    before = notes.direct("SELECT id, body FROM notes ORDER BY id")

    code, out, err = reencrypt(capsys, notes, rules_dir, "--seal-plaintext")
    assert code == 1
    assert "2 skipped" in out
    assert "row (id)=(1), column public.notes.body: the value does not open" in err
    assert "row (id)=(2), column public.notes.body: the value does not open" in err
    assert notes.direct("SELECT id, body FROM notes ORDER BY id") == before


def test_reencrypt_reports_unique_conflict(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 1)
    rotate(capsys, notes, EMAIL)
    # Under version 2 the same address seals differently, so the unique
    # constraint does not see the duplicate until reencrypt.
    with psycopg.connect(notes.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notes (id, email) VALUES (2, %s)", ("user1@example.com",)
        )
    code, out, err = reencrypt(capsys, notes, rules_dir)
    assert code == 1
    assert "1 skipped" in out
    assert "notes_email_key" in err
    assert stored_versions(notes, "email") == {1: 1, 2: 2}


def test_retire_refused_then_allowed(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 4)
    (old_value,) = notes.direct("SELECT body FROM notes WHERE id = 1")[0]
    rotate(capsys, notes, BODY)
    retire = ["keys", "retire", *connection(notes), "--rules", str(rules_dir)]

    code, out, err = cli(capsys, *retire, "--column", BODY)
    assert code == 1
    assert f"{BODY}: 4 values sealed under version 1" in out
    assert "4 values are still sealed under versions 1" in err
    assert key_versions(notes, BODY) == [(1, "active"), (2, "active")]

    assert reencrypt(capsys, notes, rules_dir)[0] == 0
    code, out, err = cli(capsys, *retire, "--column", BODY)
    assert code == 0, err
    assert f"retired {BODY} versions 1" in out
    assert key_versions(notes, BODY) == [(1, "retired"), (2, "active")]

    # The proxy drops version 1 at its next refresh; a value still sealed
    # under it then reads as NULL, by the column's on_decrypt_error.
    key_id = notes.direct(
        "SELECT key_id FROM pgseal.key_names WHERE key_name = %s", (BODY,)
    )[0][0]
    wait_until(lambda: notes.proxy._cache.get(key_id, 1) is None)
    notes.direct("UPDATE notes SET body = %s WHERE id = 1", (old_value,))
    assert read_bodies(notes)[1] is None
    assert read_bodies(notes)[2] == "note 2"


def test_retire_newest_rejected(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    rotate(capsys, notes, BODY)
    code, _, err = cli(
        capsys,
        "keys",
        "retire",
        *connection(notes),
        "--rules",
        str(rules_dir),
        "--column",
        BODY,
        "--below-version",
        "3",
    )
    assert code == 1
    assert "the newest active version" in err


def test_get_key_rejects_retired(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    rotate(capsys, notes, BODY)
    code, _, err = cli(
        capsys,
        "keys",
        "retire",
        *connection(notes),
        "--rules",
        str(rules_dir),
        "--column",
        BODY,
    )
    assert code == 0, err
    with pytest.raises(KeyringError, match="is retired"):
        notes.run(_get_key(notes, BODY, 1))


def test_rewrap_new_keyring_reads_alone(
    notes: RunningProxy,
    capsys: pytest.CaptureFixture[str],
    start_proxy: StartProxy,
    rules_dir: Path,
    tmp_path: Path,
) -> None:
    insert(notes, 1, 3)
    new_dir = tmp_path / "new-keys"
    new = SodiumKeyring.create(new_dir)
    stored_before = notes.direct("SELECT body FROM notes ORDER BY id")

    code, out, err = cli(
        capsys,
        "keys",
        "rewrap",
        *connection(notes),
        "--new-keyring",
        f"sodium:{new_dir}",
    )
    assert code == 0, err
    assert "3 wrapped copies added" in out
    assert notes.direct("SELECT body FROM notes ORDER BY id") == stored_before

    reader = start_proxy(notes.database, rules_dir, keyrings=[f"sodium:{new_dir}"])
    assert read_bodies(reader) == {n: f"note {n}" for n in range(1, 4)}

    # Running it again adds nothing.
    code, out, _ = cli(
        capsys,
        "keys",
        "rewrap",
        *connection(notes),
        "--new-keyring",
        f"sodium:{new_dir}",
    )
    assert "0 wrapped copies added, 3 already present" in out
    assert new.name in out


def test_rewrap_to_kms_and_drop_sodium(
    notes: RunningProxy,
    capsys: pytest.CaptureFixture[str],
    start_proxy: StartProxy,
    rules_dir: Path,
    kms_key: KmsKey,
) -> None:
    insert(notes, 1, 3)
    old_name = SodiumKeyring.load(notes.keydir).name
    kms_spec = f"aws-kms:{kms_key.alias}"
    code, out, err = cli(
        capsys,
        "keys",
        "rewrap",
        *connection(notes),
        "--new-keyring",
        kms_spec,
        "--drop-keyring",
        f"sodium:{notes.keydir}",
    )
    assert code == 0, err
    assert f"dropped keyrings {old_name}: 3 wrapped copies deleted" in out
    keyrings = notes.direct("SELECT DISTINCT keyring FROM pgseal.wrapped_keys")
    assert keyrings == [(kms_spec,)]

    reader = start_proxy(notes.database, rules_dir, keyrings=[kms_spec])
    assert read_bodies(reader) == {n: f"note {n}" for n in range(1, 4)}


def test_rewrap_drop_last_copy_refused(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    name = SodiumKeyring.load(notes.keydir).name
    code, _, err = cli(
        capsys, "keys", "rewrap", *connection(notes), "--drop-keyring", name
    )
    assert code == 1
    assert "without any wrapped copy" in err
    assert len(notes.direct("SELECT * FROM pgseal.wrapped_keys")) == 3


def test_rotation_period_rotates(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "notes.yaml").write_text(
        RULES.replace('on_decrypt_error: "null"', "rotation_period: 1s")
    )
    running = start_proxy(fresh_db, folder, key_refresh_seconds=REFRESH)
    insert(running, 1, 1)

    wait_until(lambda: (active_version(running, BODY) or 0) >= 2)
    insert(running, 2, 1)
    versions = stored_versions(running)
    assert versions[1] == 1
    assert versions[2] >= 2
    assert key_versions(running, EMAIL) == [(1, "active")]
    assert read_bodies(running) == {1: "note 1", 2: "note 2"}


def test_max_values_per_key_rolls_over(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: StartProxy,
    rules_dir: Path,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    running = start_proxy(
        fresh_db, rules_dir, key_refresh_seconds=REFRESH, max_values_per_key=5
    )
    insert(running, 1, 5)
    wait_until(lambda: active_version(running, BODY) == 2)
    insert(running, 6, 5)

    versions = stored_versions(running)
    assert [versions[n] for n in range(1, 6)] == [1] * 5
    assert [versions[n] for n in range(6, 11)] == [2] * 5
    assert key_versions(running, EMAIL) == [(1, "active")]
    assert read_bodies(running) == {n: f"note {n}" for n in range(1, 11)}


def test_audit_log_records_operations(
    notes: RunningProxy,
    capsys: pytest.CaptureFixture[str],
    rules_dir: Path,
    tmp_path: Path,
    pg_cluster: PgServer,
) -> None:
    audit = tmp_path / "audit.jsonl"
    log = ["--audit-log", str(audit)]
    insert(notes, 1, 3)
    new_dir = tmp_path / "new-keys"
    SodiumKeyring.create(new_dir)

    cli(capsys, "keys", "rotate", *connection(notes), *log, "--column", BODY)
    cli(
        capsys,
        "keys",
        "retire",
        *connection(notes),
        *log,
        "--rules",
        str(rules_dir),
        "--column",
        BODY,
    )
    reencrypt(capsys, notes, rules_dir, *log)
    cli(
        capsys,
        "keys",
        "retire",
        *connection(notes),
        *log,
        "--rules",
        str(rules_dir),
        "--column",
        BODY,
    )
    cli(
        capsys,
        "keys",
        "rewrap",
        *connection(notes),
        *log,
        "--new-keyring",
        f"sodium:{new_dir}",
    )

    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["action"], line["outcome"]) for line in lines] == [
        ("rotate", "ok"),
        ("retire", "error"),
        ("reencrypt_start", "ok"),
        ("reencrypt_finish", "ok"),
        ("retire", "ok"),
        ("rewrap", "ok"),
    ]
    assert lines[0]["keys"][0]["name"] == BODY
    assert lines[0]["keys"][0]["version"] == 2
    assert lines[1]["error"] == "KeysInUseError"
    assert lines[3]["details"]["values_resealed"] == 3
    assert lines[4]["keys"] == [
        {"name": BODY, "key_id": lines[0]["keys"][0]["key_id"], "version": 1}
    ]
    assert all(line["actor"]["db_user"] == pg_cluster.superuser for line in lines)
    assert_no_key_material(notes, audit.read_text())


def test_serve_audits_key_creation(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: StartProxy,
    rules_dir: Path,
    tmp_path: Path,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    audit = tmp_path / "serve-audit.jsonl"
    running = start_proxy(fresh_db, rules_dir, audit_log=audit)

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(line["keys"][0]["name"] for line in lines) == sorted(
        [BODY, EMAIL, "public.notes.secret"]
    )
    assert {line["action"] for line in lines} == {"create"}
    assert_no_key_material(running, audit.read_text())


def assert_no_key_material(running: RunningProxy, text: str) -> None:
    """Unwrap every stored data key and check that no encoding of it is in text."""
    keys = running.run(_all_keys(running))
    assert keys
    for material in keys:
        assert material.hex() not in text
        assert material.hex().upper() not in text
        assert base64.b64encode(material).decode() not in text
        assert base64.urlsafe_b64encode(material).decode().rstrip("=") not in text


async def _get_key(running: RunningProxy, key_name: str, version: int) -> None:
    pool = await asyncpg.create_pool(running.direct_dsn(), min_size=1, max_size=2)
    try:
        store = KeyStore(pool, [SodiumKeyring.load(running.keydir)])
        await store.setup()
        key_id = await pool.fetchval(
            "SELECT key_id FROM pgseal.key_names WHERE key_name = $1", key_name
        )
        await store.get_key(key_id, version)
    finally:
        await pool.close()


async def _all_keys(running: RunningProxy) -> list[bytes]:
    pool = await asyncpg.create_pool(running.direct_dsn(), min_size=1, max_size=2)
    try:
        store = KeyStore(pool, [SodiumKeyring.load(running.keydir)])
        await store.setup()
        rows = await pool.fetch("SELECT key_id, version FROM pgseal.data_keys")
        keys = [await store.unwrap_stored(r["key_id"], r["version"]) for r in rows]
        return [bytes(key.material) for key in keys]
    finally:
        await pool.close()


def test_rotate_needs_every_keyring(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other-keys"
    SodiumKeyring.create(other)
    code, _, err = cli(
        capsys,
        "keys",
        "rotate",
        *connection(notes, f"sodium:{other}"),
        "--column",
        BODY,
    )
    assert code == 1
    assert "was not given" in err
    assert key_versions(notes, BODY) == [(1, "active")]


def test_deterministic_lookup_during_rotation(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 2)
    rotate(capsys, notes, EMAIL)

    def find(address: str) -> list[tuple[int]]:
        with psycopg.connect(notes.dsn(), autocommit=True) as conn:
            query = "SELECT id FROM notes WHERE email = %s"
            return [(int(row[0]),) for row in conn.execute(query, (address,))]

    # The parameter is sealed under versions 1 and 2, so the row still
    # under version 1 is found before reencrypt moves it, and after.
    assert stored_versions(notes, "email") == {1: 1, 2: 1}
    assert find("user1@example.com") == [(1,)]
    assert reencrypt(capsys, notes, rules_dir)[0] == 0
    assert stored_versions(notes, "email") == {1: 2, 2: 2}
    assert find("user1@example.com") == [(1,)]


def test_keys_list_shows_versions(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    rotate(capsys, notes, BODY)
    code, out, _ = cli(capsys, "keys", "list", *connection(notes), "--key-name", BODY)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["KEY", "NAME", "ID", "VERSION"]
    assert [line.split()[2] for line in lines[1:]] == ["1", "2"]
    assert all(BODY in line and "active" in line for line in lines[1:])


def test_reencrypt_one_run_per_table(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    with psycopg.connect(notes.direct_dsn(), autocommit=True) as other_run:
        other_run.execute(
            "SELECT pg_advisory_lock(%s, hashtext('public.notes'))", (0x70677302,)
        )
        code, _, err = reencrypt(capsys, notes, rules_dir)
    assert code == 1
    assert "another pgseal reencrypt is running on public.notes" in err


def test_unloaded_version_fetched_on_read(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: StartProxy,
    rules_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A proxy that refreshes its keys only once an hour reads a value sealed
    # under a version another proxy created after it started: it fetches the
    # version from the key store instead of failing the read.
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    slow = start_proxy(fresh_db, rules_dir, key_refresh_seconds=3600)
    insert(slow, 1, 1)
    rotate_code, _, err = cli(
        capsys, "keys", "rotate", *connection(slow), "--column", BODY
    )
    assert rotate_code == 0, err
    fresh = start_proxy(fresh_db, rules_dir, key_refresh_seconds=3600)
    insert(fresh, 2, 1)

    assert stored_versions(slow) == {1: 1, 2: 2}
    assert read_bodies(slow) == {1: "note 1", 2: "note 2"}


@pytest.fixture
def limited_login(
    notes: RunningProxy, pg_cluster: PgServer
) -> Iterator[tuple[str, str]]:
    """A login that owns the key store but has no privilege on public.notes.

    Yields the role name and its --upstream URI.
    """
    role = f"sealer_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    owner = sql.Identifier(role)
    with psycopg.connect(notes.direct_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                owner, sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(notes.database), owner
            )
        )
        conn.execute(sql.SQL("ALTER SCHEMA pgseal OWNER TO {}").format(owner))
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgseal'"
        ).fetchall()
        for (table,) in tables:
            conn.execute(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier("pgseal", table), owner
                )
            )
    upstream = make_dsn(
        pg_cluster.host, pg_cluster.port, role, password, notes.database
    )
    yield role, upstream
    with psycopg.connect(notes.direct_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(owner)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(owner))
        conn.execute(sql.SQL("DROP ROLE {}").format(owner))


def test_reencrypt_names_missing_privileges(
    notes: RunningProxy,
    capsys: pytest.CaptureFixture[str],
    rules_dir: Path,
    limited_login: tuple[str, str],
) -> None:
    role, upstream = limited_login
    insert(notes, 1, 3)
    rotate(capsys, notes, BODY)
    args = [
        "reencrypt", "--upstream", upstream, "--keyring", f"sodium:{notes.keydir}",
        "--table", "public.notes", "--rules", str(rules_dir), "--no-progress",
    ]

    code, _, err = cli(capsys, *args)
    assert code == 1
    assert f"the login {role} in --upstream lacks privileges on table public.notes" in err
    assert "SELECT on columns id, body, secret, email" in err
    assert "UPDATE on columns body, secret, email" in err
    assert f"GRANT SELECT, UPDATE ON public.notes TO {role}" in err
    assert "rejected the proxy's own connection" not in err

    notes.direct(sql.SQL("GRANT SELECT ON notes TO {}").format(sql.Identifier(role)))
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert "SELECT on columns" not in err
    assert "UPDATE on columns body, secret, email" in err
    assert set(stored_versions(notes).values()) == {1}

    notes.direct(sql.SQL("GRANT UPDATE ON notes TO {}").format(sql.Identifier(role)))
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert set(stored_versions(notes).values()) == {2}


def test_retire_single_version_nothing_older(
    notes: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert(notes, 1, 1)
    code, out, err = cli(
        capsys, "keys", "retire", *connection(notes), "--rules", str(rules_dir),
        "--column", BODY,
    )
    assert code == 0, err
    assert "version 1 is its only active version" in out
    assert "no older version to retire" in out
    assert "no active version" not in out
    assert key_versions(notes, BODY) == [(1, "active")]


def test_retire_names_missing_privilege(
    notes: RunningProxy,
    capsys: pytest.CaptureFixture[str],
    rules_dir: Path,
    limited_login: tuple[str, str],
) -> None:
    _, upstream = limited_login
    insert(notes, 1, 1)
    rotate(capsys, notes, BODY)
    code, _, err = cli(
        capsys, "keys", "retire", "--upstream", upstream,
        "--keyring", f"sodium:{notes.keydir}", "--rules", str(rules_dir),
        "--column", BODY,
    )
    assert code == 1
    assert "the login in --upstream lacks a privilege: permission denied" in err
    assert "Privileges of the proxy's login" in err
    assert "rejected the proxy's own connection" not in err
    assert key_versions(notes, BODY) == [(1, "active"), (2, "active")]
