"""Data keys per subject, and `pgseal keys shred` for the right to erasure.

A rule with `key_scope: subject` seals each row's value under the data key of
the row's creator. Shredding one creator's keys makes that creator's values
unreadable through fresh and running proxies and from a logical backup taken
afterwards, while the other creator's values stay readable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from proxy.cli import main
from proxy.crypto.keycache import KeyRef
from proxy.crypto.subjects import SubjectKeyRequest, subject_digest, subject_key_name
from proxy.crypto.values import Algorithm, dearmour, read_key_ref
from proxy.embedded import find_bin_dir
from tests.fixtures.kms import KmsKey
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

StartProxy = Callable[..., RunningProxy]

TABLE = """
CREATE TABLE posts (
    id serial PRIMARY KEY,
    creator_id integer,
    title text,
    body text
)
"""
RULES = """\
tables:
  - name: posts
    columns:
      - name: body
        key_scope: subject
        subject_column: creator_id
        on_decrypt_error: {policy}
      - name: title
"""
REFRESH = 0.5
ALICE, BOB = 1, 2


def _rules(tmp_path: Path, policy: str = '"null"') -> Path:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "posts.yaml").write_text(RULES.format(policy=policy))
    return folder


@pytest.fixture
def posts_db(fresh_db: str, pg_cluster: PgServer) -> str:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    return fresh_db


@pytest.fixture
def posts(posts_db: str, start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    return start_proxy(posts_db, _rules(tmp_path), key_refresh_seconds=REFRESH)


def write(running: RunningProxy, creator: int, body: str, title: str = "t") -> None:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO posts (creator_id, title, body) VALUES (%s, %s, %s)",
            (creator, title, body),
        )


def bodies(running: RunningProxy) -> dict[str, int | None]:
    """Read every body through the proxy: {body or 'NULL #id': creator_id}."""
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT id, creator_id, body FROM posts ORDER BY id").fetchall()
    return {body if body is not None else f"NULL #{id_}": creator for id_, creator, body in rows}


def stored_key(running: RunningProxy, creator: int) -> set[KeyRef]:
    """Return the (key_id, version) of every stored body of a creator."""
    rows = running.direct("SELECT body FROM posts WHERE creator_id = %s", (creator,))
    return {read_key_ref(dearmour(body.encode("ascii"))) for (body,) in rows}


def row_count(running: RunningProxy) -> int:
    return int(running.direct("SELECT count(*) FROM posts")[0][0])


def shred(capsys: pytest.CaptureFixture[str], running: RunningProxy, *extra: str) -> str:
    capsys.readouterr()
    code = main(["keys", "shred", "--upstream", running.direct_dsn(), *extra])
    out, _ = capsys.readouterr()
    assert code == 0
    return out


def wait_for(check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


# Keys per subject


def test_subject_values_sealed_per_creator(posts: RunningProxy) -> None:
    write(posts, ALICE, "alice diary 1")
    write(posts, ALICE, "alice diary 2")
    write(posts, BOB, "bob diary")

    assert bodies(posts) == {"alice diary 1": ALICE, "alice diary 2": ALICE, "bob diary": BOB}
    for (body,) in posts.direct("SELECT body FROM posts"):
        assert_sealed(body, "diary")
    alice, bob = stored_key(posts, ALICE), stored_key(posts, BOB)
    assert len(alice) == 1
    assert len(bob) == 1
    assert alice != bob


def test_key_store_holds_no_subject_value(posts: RunningProxy) -> None:
    write(posts, 424242, "a post")
    names = [name for (name,) in posts.direct("SELECT key_name FROM pgseal.key_names")]
    subjects = posts.direct("SELECT column_key_name FROM pgseal.subject_keys")
    assert subjects == [("public.posts.body",)]
    assert not any("424242" in name for name in names)
    assert any(name.startswith("public.posts.body@subject:") for name in names)


def test_subject_from_literal_and_binary_parameter(posts: RunningProxy) -> None:
    with psycopg.connect(posts.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO posts (creator_id, body) VALUES (7, 'literal post')")
        conn.execute(
            "INSERT INTO posts (creator_id, body) VALUES (%b, %s)", (7, "binary post")
        )
        conn.execute("INSERT INTO posts (creator_id, body) VALUES (' 7', 'spaced post')")

    assert set(bodies(posts)) == {"literal post", "binary post", "spaced post"}
    assert len(stored_key(posts, 7)) == 1


def test_update_pinned_by_subject(posts: RunningProxy) -> None:
    write(posts, ALICE, "first draft")
    write(posts, BOB, "bob draft")
    with psycopg.connect(posts.dsn(), autocommit=True) as conn:
        conn.execute(
            "UPDATE posts SET body = %s WHERE creator_id = %s AND id > 0",
            ("second draft", ALICE),
        )
        conn.execute("UPDATE posts SET creator_id = 3, body = 'moved' WHERE creator_id = 2")

    assert bodies(posts) == {"second draft": ALICE, "moved": 3}
    assert len(stored_key(posts, ALICE)) == 1
    assert stored_key(posts, 3) != stored_key(posts, ALICE)


def test_copy_from_seals_per_subject(posts: RunningProxy) -> None:
    write(posts, ALICE, "inserted")
    with (
        psycopg.connect(posts.dsn(), autocommit=True) as conn,
        conn.cursor().copy("COPY posts (creator_id, body) FROM STDIN") as copy,
    ):
        copy.write_row((ALICE, "copied alice"))
        copy.write_row((BOB, "copied bob"))

    assert bodies(posts) == {"inserted": ALICE, "copied alice": ALICE, "copied bob": BOB}
    assert len(stored_key(posts, ALICE)) == 1
    assert stored_key(posts, BOB) != stored_key(posts, ALICE)
    for (body,) in posts.direct("SELECT body FROM posts"):
        assert_sealed(body, "copied")


def test_fresh_proxy_loads_subject_keys(
    posts: RunningProxy, start_proxy: StartProxy, posts_db: str, tmp_path: Path
) -> None:
    write(posts, ALICE, "written by the first proxy")
    other = start_proxy(posts_db, _rules(tmp_path))
    assert bodies(other) == {"written by the first proxy": ALICE}


# Rule checks against the database


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("owner_id", "unknown subject_column 'owner_id' in public.posts"),
        ("published", "subject_column public.posts.published has a type that cannot"),
    ],
    ids=["missing", "unsupported type"],
)
def test_rules_check_subject_column(
    posts_db: str,
    pg_cluster: PgServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    subject: str,
    expected: str,
) -> None:
    with psycopg.connect(pg_cluster.dsn(posts_db), autocommit=True) as conn:
        conn.execute("ALTER TABLE posts ADD COLUMN published timestamptz")
    rules = _rules(tmp_path)
    text = (rules / "posts.yaml").read_text().replace("creator_id", subject)
    (rules / "posts.yaml").write_text(text)

    capsys.readouterr()
    code = main(["rules", "check", "--upstream", pg_cluster.dsn(posts_db), "--rules", str(rules)])
    out, _ = capsys.readouterr()
    assert code == 1
    assert "posts.yaml line 4:" in out
    assert expected in out


# Rejections

REJECTED = [
    ("INSERT INTO posts (body) VALUES ('no subject')", "0A000", "does not set its subject"),
    (
        "INSERT INTO posts (creator_id, body) VALUES (1 + 1, 'computed subject')",
        "0A000",
        "not a parameter or a non-null literal",
    ),
    (
        "INSERT INTO posts (creator_id, body) VALUES (NULL, 'null subject')",
        "0A000",
        "not a parameter or a non-null literal",
    ),
    ("UPDATE posts SET body = 'unpinned' WHERE id = 1", "0A000", "does not set its subject"),
    (
        "UPDATE posts SET body = 'or' WHERE creator_id = 1 OR id = 1",
        "0A000",
        "does not set its subject",
    ),
    (
        "INSERT INTO posts (creator_id, body) VALUES ('x1', 'bad subject')",
        "22P02",
        "not valid input",
    ),
    ("PREPARE p AS INSERT INTO posts (creator_id, body) VALUES ($1, $2)", "0A000", "PREPARE"),
]


@pytest.mark.parametrize(
    ("statement", "sqlstate", "reason"), REJECTED, ids=[r[2] for r in REJECTED]
)
def test_write_without_subject_rejected(
    posts: RunningProxy, statement: str, sqlstate: str, reason: str
) -> None:
    write(posts, ALICE, "kept")
    with (
        psycopg.connect(posts.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
    ):
        conn.execute(statement, prepare=False)
    assert info.value.sqlstate == sqlstate
    assert reason in str(info.value)
    assert row_count(posts) == 1
    assert bodies(posts) == {"kept": ALICE}


def test_null_subject_parameter_rejected(posts: RunningProxy) -> None:
    with (
        psycopg.connect(posts.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
    ):
        conn.execute(
            "INSERT INTO posts (creator_id, body) VALUES (%s, %s)", (None, "secret")
        )
    assert info.value.sqlstate == "0A000"
    assert "public.posts.body" in str(info.value)
    assert row_count(posts) == 0


def test_literal_with_parameter_subject_rejected(posts: RunningProxy) -> None:
    with (
        psycopg.connect(posts.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
    ):
        conn.execute("INSERT INTO posts (creator_id, body) VALUES (%s, 'lit')", (ALICE,))
    assert info.value.sqlstate == "0A000"
    assert "from parameter $1" in str(info.value)
    assert row_count(posts) == 0


def test_copy_without_subject_rejected(posts: RunningProxy) -> None:
    with (
        psycopg.connect(posts.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
        conn.cursor().copy("COPY posts (body) FROM STDIN") as copy,
    ):
        copy.write_row(("copied without subject",))
    assert info.value.sqlstate == "0A000"
    assert "COPY into public.posts" in str(info.value)
    assert row_count(posts) == 0


# Shredding


def test_shred_one_subject(
    posts: RunningProxy,
    start_proxy: StartProxy,
    posts_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write(posts, ALICE, "alice secret", title="alice title")
    write(posts, BOB, "bob secret", title="bob title")
    assert set(bodies(posts)) == {"alice secret", "bob secret"}
    (alice_key,) = stored_key(posts, ALICE)

    out = shred(capsys, posts, "--subject", str(ALICE))
    assert "destroyed 1 data key versions" in out

    # The running proxy drops the key at its next refresh and wipes its copy.
    wait_for(lambda: posts.proxy._cache.get(*alice_key) is None)
    wait_for(lambda: "alice secret" not in bodies(posts))
    assert bodies(posts) == {"NULL #1": ALICE, "bob secret": BOB}

    fresh = start_proxy(posts_db, _rules(tmp_path))
    assert bodies(fresh) == {"NULL #1": ALICE, "bob secret": BOB}
    with psycopg.connect(fresh.dsn(), autocommit=True) as conn:
        titles = conn.execute("SELECT title FROM posts ORDER BY id").fetchall()
    assert titles == [("alice title",), ("bob title",)]
    assert posts.direct("SELECT count(*) FROM pgseal.subject_keys") == [(1,)]


def test_new_post_after_shred_gets_new_key(
    posts: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    write(posts, ALICE, "before")
    (old,) = stored_key(posts, ALICE)
    shred(capsys, posts, "--subject", str(ALICE))
    wait_for(lambda: posts.proxy._cache.get(*old) is None)

    write(posts, ALICE, "after")
    assert bodies(posts) == {"NULL #1": ALICE, "after": ALICE}
    assert len(stored_key(posts, ALICE)) == 2


def test_shred_narrowed_to_column(
    posts: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    write(posts, ALICE, "kept")
    out = shred(capsys, posts, "--subject", "1", "--column", "public.other.body")
    assert "nothing was destroyed" in out
    out = shred(capsys, posts, "--subject", "1", "--column", "public.posts.body")
    assert "destroyed 1 data key versions" in out


def test_shred_error_policy(
    posts_db: str,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_proxy(posts_db, _rules(tmp_path, policy="error"))
    write(running, ALICE, "alice secret")
    write(running, BOB, "bob secret")
    shred(capsys, running, "--subject", str(ALICE))

    fresh = start_proxy(posts_db, _rules(tmp_path, policy="error"))
    with psycopg.connect(fresh.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT body FROM posts WHERE creator_id = %s", (BOB,)).fetchone()
        assert row == ("bob secret",)
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT body FROM posts WHERE creator_id = %s", (ALICE,)).fetchall()
        assert info.value.sqlstate == "XX001"
        assert "shredded" in str(info.value)
        # Only the statement failed: the connection goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # Inside a transaction block the error aborts the transaction.
    with psycopg.connect(fresh.dsn()) as conn:
        conn.execute("SELECT body FROM posts WHERE creator_id = %s", (BOB,)).fetchall()
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT body FROM posts WHERE creator_id = %s", (ALICE,)).fetchall()
        assert info.value.sqlstate == "XX001"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_shred_audit_line(
    posts: RunningProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(posts, ALICE, "audited")
    (key_id, version) = next(iter(stored_key(posts, ALICE)))
    key = posts.proxy._cache.get(key_id, version)
    assert key is not None
    material = bytes(key.material)
    wrapped = posts.direct("SELECT wrapped FROM pgseal.wrapped_keys WHERE key_id = %s", (key_id,))
    audit = tmp_path / "audit.jsonl"
    shred(capsys, posts, "--subject", str(ALICE), "--audit-log", str(audit))

    (line,) = [json.loads(text) for text in audit.read_text().splitlines()]
    assert line["action"] == "shred"
    assert line["outcome"] == "ok"
    assert line["keys"][0]["key_id"] == key_id
    assert line["keys"][0]["version"] == version
    assert line["actor"]["db_user"] == posts.server.superuser
    assert line["details"]["destroyed_versions"] == 1
    text = audit.read_text()
    assert '"1"' not in text
    assert material.hex() not in text
    assert base64.b64encode(material).decode() not in text
    assert bytes(wrapped[0][0]).hex() not in text


def test_subject_key_creation_audited(
    posts_db: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    audit = tmp_path / "serve-audit.jsonl"
    running = start_proxy(posts_db, _rules(tmp_path), audit_log=audit)
    write(running, 987654321, "audited post")

    lines = [json.loads(text) for text in audit.read_text().splitlines()]
    created = [line for line in lines if "@subject:" in line.get("key_names", [""])[0]]
    assert len(created) == 1
    assert created[0]["action"] == "create"
    assert created[0]["outcome"] == "ok"
    assert created[0]["details"]["reason"] == "first value of a subject"
    assert "987654321" not in audit.read_text()


@pytest.fixture
def logical_copy(
    pg_cluster: PgServer, tmp_path: Path
) -> Iterator[Callable[[RunningProxy], str]]:
    """Return a function that copies posts and schema pgseal with pg_dump.

    The copy goes into a new database, whose name it returns.
    """
    pg_dump = find_bin_dir("system") / "pg_dump"
    psql = find_bin_dir("system") / "psql"
    if not pg_dump.exists() or not psql.exists():
        pytest.skip("pg_dump and psql are not installed next to initdb")
    created: list[str] = []

    def copy(running: RunningProxy) -> str:
        dump = tmp_path / f"dump-{len(created)}.sql"
        subprocess.run(
            [str(pg_dump), "--no-owner", "-t", "public.posts", "-t", "pgseal.*",
             "-f", str(dump), running.direct_dsn()],
            check=True,
            timeout=120,
        )
        restored = f"{running.database}_copy{len(created)}"
        with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(restored)))
        created.append(restored)
        # pg_dump -t dumps tables without their schema.
        with psycopg.connect(pg_cluster.dsn(restored), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA pgseal")
        subprocess.run(
            [str(psql), "-v", "ON_ERROR_STOP=1", "-q", "-f", str(dump),
             pg_cluster.dsn(restored)],
            check=True,
            timeout=120,
            capture_output=True,
        )
        return restored

    yield copy
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        for name in created:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def test_logical_backup_after_shred(
    posts: RunningProxy,
    start_proxy: StartProxy,
    tmp_path: Path,
    logical_copy: Callable[[RunningProxy], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    write(posts, ALICE, "alice secret")
    write(posts, BOB, "bob secret")
    shred(capsys, posts, "--subject", str(ALICE))

    restored = logical_copy(posts)
    copy = start_proxy(restored, _rules(tmp_path))
    assert bodies(copy) == {"NULL #1": ALICE, "bob secret": BOB}
    stored = copy.direct("SELECT body FROM posts WHERE creator_id = 1")
    assert_sealed(stored[0][0], "alice secret")
    copy.run(copy.proxy.stop())


def test_shred_repeated_after_older_restore(
    posts: RunningProxy,
    start_proxy: StartProxy,
    tmp_path: Path,
    logical_copy: Callable[[RunningProxy], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    write(posts, ALICE, "alice secret")
    write(posts, BOB, "bob secret")
    older = logical_copy(posts)
    audit = tmp_path / "audit.jsonl"
    shred(capsys, posts, "--subject", str(ALICE), "--audit-log", str(audit))
    (line,) = [json.loads(text) for text in audit.read_text().splitlines()]

    # A backup from before the shred brings the subject's keys back.
    copy = start_proxy(older, _rules(tmp_path))
    assert bodies(copy) == {"alice secret": ALICE, "bob secret": BOB}
    copy.run(copy.proxy.stop())

    args = []
    for digest in line["details"]["subject_hmac"]:
        args += ["--subject-hmac", digest]
    out = shred(capsys, copy, *args)
    assert "destroyed 1 data key versions" in out
    again = start_proxy(older, _rules(tmp_path))
    assert bodies(again) == {"NULL #1": ALICE, "bob secret": BOB}


def test_shred_invalid_subject_hmac(
    posts: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    write(posts, ALICE, "kept")
    code = main(["keys", "shred", "--upstream", posts.direct_dsn(), "--subject-hmac", "abc"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "--subject-hmac must be 64 hex digits" in err
    assert bodies(posts) == {"kept": ALICE}


# Concurrent creation


def test_concurrent_subject_key_creation(
    posts_db: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    first = start_proxy(posts_db, _rules(tmp_path))
    second = start_proxy(posts_db, _rules(tmp_path))
    secret = first.proxy.keystore.subject_secret
    requests = []
    for creator in range(100, 120):
        digest = subject_digest(secret, str(creator))
        name = subject_key_name("public.posts.body", digest)
        requests.append(
            SubjectKeyRequest(name, "public.posts.body", digest, Algorithm.XCHACHA20_POLY1305)
        )

    async def race() -> list[object]:
        calls = []
        for request in requests:
            calls.append(first.proxy.keystore.subject_key(request))
            calls.append(second.proxy.keystore.subject_key(request))
        return await asyncio.gather(*calls)

    keys = first.run(race())
    pairs = list(zip(keys[0::2], keys[1::2]))
    assert all(a.key_id == b.key_id for a, b in pairs)  # type: ignore[attr-defined]
    assert first.direct("SELECT count(*) FROM pgseal.subject_keys") == [(20,)]
    versions = "SELECT count(*) FROM pgseal.data_keys JOIN pgseal.subject_keys USING (key_id)"
    assert first.direct(versions) == [(20,)]


def test_concurrent_first_writes_share_key(
    posts_db: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxies = [start_proxy(posts_db, _rules(tmp_path)) for _ in range(2)]
    barrier = threading.Barrier(2)

    def writer(running: RunningProxy) -> None:
        barrier.wait()
        for creator in range(200, 210):
            write(running, creator, f"post of {creator}")

    threads = [threading.Thread(target=writer, args=(p,)) for p in proxies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    for creator in range(200, 210):
        assert len(stored_key(proxies[0], creator)) == 1
    assert proxies[0].direct("SELECT count(*) FROM pgseal.subject_keys") == [(10,)]
    with psycopg.connect(proxies[1].dsn(), autocommit=True) as conn:
        read = conn.execute("SELECT body FROM posts").fetchall()
    assert len(read) == 20
    assert min(body for (body,) in read) == "post of 200"


# AWS KMS


def test_shred_with_kms_keyring(
    posts_db: str,
    kms_key: KmsKey,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = f"aws-kms:{kms_key.key_id}"
    writer = start_proxy(posts_db, _rules(tmp_path), keyrings=[spec])
    write(writer, ALICE, "alice via kms")
    write(writer, ALICE, "alice again")
    write(writer, BOB, "bob via kms")
    assert writer.direct("SELECT DISTINCT keyring FROM pgseal.wrapped_keys") == [(spec,)]
    # One Encrypt per data key: title's column key and one key per creator.
    assert writer.proxy.keyrings[0].operations["Encrypt"] == 3  # type: ignore[attr-defined]
    assert writer.proxy.keyrings[0].operations["Decrypt"] == 0  # type: ignore[attr-defined]

    shred(capsys, writer, "--subject", str(ALICE))
    reader = start_proxy(posts_db, _rules(tmp_path), keyrings=[spec])
    assert bodies(reader) == {"NULL #1": ALICE, "NULL #2": ALICE, "bob via kms": BOB}
    assert bodies(reader) == {"NULL #1": ALICE, "NULL #2": ALICE, "bob via kms": BOB}
    keyring = reader.proxy.keyrings[0]
    # Title's column key and Bob's subject key, each unwrapped once.
    assert keyring.operations["Decrypt"] == 2  # type: ignore[attr-defined]
