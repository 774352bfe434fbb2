"""Back up the key store, restore it into a fresh cluster, and read old rows."""

from __future__ import annotations

import json
import secrets
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from proxy.cli import main
from proxy.embedded import Cluster, find_bin_dir
from proxy.errors import ClusterError
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import OAUTH_TABLE, SHIPPED_RULES, RunningProxy
from tests.integration.sealing import assert_sealed

StartProxy = Callable[..., RunningProxy]

ACCESS = "public.oauth_tokens.access_token"
TOKENS = [(n, f"gho_access_{n:05d}", f"ghr_refresh_{n:05d}") for n in range(1, 6)]
SHARES, THRESHOLD = 5, 3


@pytest.fixture(scope="module")
def second_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of its own, standing in for a rebuilt server."""
    try:
        bin_dir = find_bin_dir()
    except ClusterError as exc:
        pytest.skip(f"no PostgreSQL binaries for a second cluster: {exc}")
    # The `pgseal` service user, used under root, must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="pgseal-restore-"))
    base.chmod(0o755)
    try:
        with Cluster(
            bin_dir, base / "data", password=secrets.token_urlsafe(24)
        ) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def new_db(second_cluster: Cluster) -> str:
    """An empty database on the second cluster, with the OAuth table."""
    name = f"restored_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(second_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(second_cluster.dsn(name), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    return name


@pytest.fixture
def source(
    fresh_db: str, pg_cluster: PgServer, start_proxy: StartProxy
) -> RunningProxy:
    """A proxy over the session's cluster, with sealed token rows written."""
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(OAUTH_TABLE)
    running = start_proxy(fresh_db)
    with (
        psycopg.connect(running.dsn(), autocommit=True) as conn,
        conn.cursor() as cursor,
    ):
        cursor.executemany(
            "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            "VALUES (%s, %s, %s)",
            TOKENS,
        )
    return running


@pytest.fixture
def backup_dir(source: RunningProxy, tmp_path: Path) -> Path:
    out = tmp_path / "backup"
    code = main(
        [
            "keys",
            "backup",
            "--upstream",
            source.direct_dsn(),
            "--keyring",
            f"sodium:{source.keydir}",
            "--shares",
            str(SHARES),
            "--threshold",
            str(THRESHOLD),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def restore(
    cluster: Cluster, database: str, backup: Path, shares: list[int], keydir: Path
) -> int:
    args = ["keys", "restore", "--upstream", cluster.dsn(database)]
    args += ["--from", str(backup), "--keydir", str(keydir)]
    for index in shares:
        args += ["--share", str(backup / f"share-{index}.txt")]
    return main(args)


def copy_table(source: RunningProxy, cluster: Cluster, database: str) -> None:
    """Copy the sealed rows as stored, as a pg_dump of the table would."""
    copy_out = "COPY oauth_tokens TO STDOUT (FORMAT binary)"
    copy_in = "COPY oauth_tokens FROM STDIN (FORMAT binary)"
    with (
        psycopg.connect(source.direct_dsn()) as old,
        psycopg.connect(cluster.dsn(database)) as new,
        old.cursor().copy(copy_out) as reader,
        new.cursor().copy(copy_in) as writer,
    ):
        for block in reader:
            writer.write(block)


def read_tokens(running: RunningProxy) -> list[tuple[int, str, str]]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
            "ORDER BY user_id"
        ).fetchall()
    return [(int(user), str(access), str(refresh)) for user, access, refresh in rows]


def key_names(cluster: Cluster, database: str) -> list[tuple[str]]:
    with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('pgseal.key_names')").fetchone()
        if exists is None or exists[0] is None:
            return []
        return conn.execute("SELECT key_name FROM pgseal.key_names").fetchall()


def test_restore_reads_old_rows(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    start_proxy: StartProxy,
) -> None:
    copy_table(source, second_cluster, new_db)
    keydir = tmp_path / "restored-keys"
    assert restore(second_cluster, new_db, backup_dir, [1, 3, 5], keydir) == 0

    restored = start_proxy(new_db, keyrings=[f"sodium:{keydir}"], server=second_cluster)
    assert read_tokens(restored) == TOKENS
    stored = restored.direct("SELECT access_token FROM oauth_tokens ORDER BY user_id")
    for (access,), (_, plain, _) in zip(stored, TOKENS):
        assert_sealed(access, plain)


def test_restore_keeps_store_id(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
) -> None:
    assert restore(second_cluster, new_db, backup_dir, [2, 4, 5], tmp_path / "k") == 0
    old = source.direct("SELECT store_id FROM pgseal.key_store")
    with psycopg.connect(second_cluster.dsn(new_db), autocommit=True) as conn:
        new = conn.execute("SELECT store_id FROM pgseal.key_store").fetchall()
        next_id = conn.execute(
            "SELECT nextval(pg_get_serial_sequence('pgseal.key_names', 'key_id'))"
        ).fetchone()
    assert new == old
    (max_id,) = source.direct("SELECT max(key_id) FROM pgseal.key_names")[0]
    assert next_id == (max_id + 1,)


def test_restored_keydir_matches(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
) -> None:
    keydir = tmp_path / "restored-keys"
    assert restore(second_cluster, new_db, backup_dir, [1, 2, 3], keydir) == 0
    for name in ("public.key", "private.key"):
        assert (keydir / name).read_text() == (source.keydir / name).read_text()
    assert stat.S_IMODE((keydir / "private.key").stat().st_mode) == 0o600


def test_backup_files_hide_keys(source: RunningProxy, backup_dir: Path) -> None:
    private_hex = (source.keydir / "private.key").read_text().strip()
    store = source.proxy.keystore
    refs = source.direct("SELECT key_id, version FROM pgseal.data_keys")
    data_keys = [source.run(store.get_key(key_id, version)) for key_id, version in refs]
    assert len(data_keys) == 2

    files = sorted(backup_dir.iterdir())
    assert [f.name for f in files] == ["keystore.backup"] + [
        f"share-{i}.txt" for i in range(1, SHARES + 1)
    ]
    for path in files:
        text = path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert private_hex not in text
        for key in data_keys:
            assert key.material.hex() not in text


def test_too_few_shares_fail(
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keydir = tmp_path / "restored-keys"
    assert restore(second_cluster, new_db, backup_dir, [1, 4], keydir) == 1
    assert "not enough valid shares" in capsys.readouterr().err
    assert key_names(second_cluster, new_db) == []
    assert not keydir.exists()


def test_forged_threshold_fails(
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Lowering the threshold in the header lets 2 shares combine, into a
    # wrong key, which the authentication tag then rejects.
    path = backup_dir / "keystore.backup"
    document = json.loads(path.read_text())
    document["threshold"] = 2
    path.write_text(json.dumps(document))
    for index in (1, 2, 3, 4, 5):
        share = backup_dir / f"share-{index}.txt"
        share.write_text(
            share.read_text().replace(f":{THRESHOLD}:{index}:", f":2:{index}:")
        )

    assert restore(second_cluster, new_db, backup_dir, [1, 2], tmp_path / "k") == 1
    assert "not enough valid shares" in capsys.readouterr().err


def test_damaged_share_skipped(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    start_proxy: StartProxy,
) -> None:
    damaged = backup_dir / "share-2.txt"
    text = damaged.read_text()
    last = text.rstrip()[-1]
    damaged.write_text(text.rstrip()[:-1] + ("0" if last != "0" else "1") + "\n")

    keydir = tmp_path / "restored-keys"
    assert restore(second_cluster, new_db, backup_dir, [1, 2, 3, 4], keydir) == 0
    copy_table(source, second_cluster, new_db)
    restored = start_proxy(new_db, keyrings=[f"sodium:{keydir}"], server=second_cluster)
    assert read_tokens(restored) == TOKENS


def test_share_of_other_backup_rejected(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other-backup"
    args = ["keys", "backup", "--upstream", source.direct_dsn()]
    args += ["--keyring", f"sodium:{source.keydir}", "--shares", "3"]
    assert main(args + ["--threshold", "2", "--out", str(other)]) == 0
    shutil.copy(other / "share-1.txt", backup_dir / "share-9.txt")

    assert restore(second_cluster, new_db, backup_dir, [1, 2, 9], tmp_path / "k") == 1
    assert "belongs to backup" in capsys.readouterr().err


def restore_args(upstream: str, backup: Path, keydir: Path) -> list[str]:
    args = ["keys", "restore", "--upstream", upstream, "--from", str(backup)]
    args += ["--keydir", str(keydir)]
    for index in (1, 2, 3):
        args += ["--share", str(backup / f"share-{index}.txt")]
    return args


def keys_cli(source: RunningProxy, *args: str) -> None:
    """Run a `pgseal` key command on the source database; it must succeed."""
    upstream = ["--upstream", source.direct_dsn(), "--keyring", f"sodium:{source.keydir}"]
    assert main([*args, *upstream]) == 0


def test_restore_into_used_store_rejected(
    source: RunningProxy,
    backup_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A version created after the backup makes the store differ from it.
    keys_cli(source, "keys", "rotate", "--column", ACCESS)
    before = source.direct("SELECT key_id, version FROM pgseal.data_keys ORDER BY 1, 2")
    capsys.readouterr()

    assert main(restore_args(source.direct_dsn(), backup_dir, tmp_path / "k")) == 1
    err = capsys.readouterr().err
    assert "already has a key store" in err
    assert "the store this backup was taken from, but with other data keys" in err
    assert "nothing was changed" in err
    assert not (tmp_path / "k" / "private.key").exists()
    after = source.direct("SELECT key_id, version FROM pgseal.data_keys ORDER BY 1, 2")
    assert after == before


def test_restore_key_pair_into_same_store(
    source: RunningProxy,
    backup_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = source.direct("SELECT * FROM pgseal.wrapped_keys ORDER BY 1, 2, 3")
    keydir = tmp_path / "k"
    assert main(restore_args(source.direct_dsn(), backup_dir, keydir)) == 0
    out = capsys.readouterr().out
    assert "already contains key store" in out
    assert "no row was written" in out
    assert "wrote the key pair sodium:" in out
    assert (keydir / "private.key").read_text() == (
        source.keydir / "private.key"
    ).read_text()
    assert source.direct("SELECT * FROM pgseal.wrapped_keys ORDER BY 1, 2, 3") == before


def test_restore_keeps_retired_versions(
    source: RunningProxy,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    start_proxy: StartProxy,
) -> None:
    rules = ["--rules", str(SHIPPED_RULES)]
    keys_cli(source, "keys", "rotate", "--column", ACCESS)
    keys_cli(source, "reencrypt", "--table", "public.oauth_tokens", *rules, "--no-progress")
    keys_cli(source, "keys", "retire", "--column", ACCESS, *rules)
    backup = tmp_path / "backup"
    keys_cli(
        source, "keys", "backup", "--shares", "3", "--threshold", "2", "--out", str(backup)
    )
    copy_table(source, second_cluster, new_db)
    keydir = tmp_path / "restored-keys"
    capsys.readouterr()

    assert main(restore_args(second_cluster.dsn(new_db), backup, keydir)) == 0
    out = capsys.readouterr().out
    assert "restored key store" in out
    assert "1 data key version of them is retired, and stay retired" in out
    with psycopg.connect(second_cluster.dsn(new_db), autocommit=True) as conn:
        states = conn.execute(
            "SELECT d.version, d.state FROM pgseal.data_keys d "
            "JOIN pgseal.key_names n USING (key_id) WHERE n.key_name = %s "
            "ORDER BY d.version",
            (ACCESS,),
        ).fetchall()
    assert states == [(1, "retired"), (2, "active")]
    restored = start_proxy(new_db, keyrings=[f"sodium:{keydir}"], server=second_cluster)
    assert read_tokens(restored) == TOKENS

    # A second run finds everything in place and reports it.
    assert main(restore_args(second_cluster.dsn(new_db), backup, keydir)) == 0
    out = capsys.readouterr().out
    assert "nothing to restore: the database already contains key store" in out
    assert f"{keydir} contains its key pair" in out


def test_backup_refuses_overwrite(
    source: RunningProxy, backup_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (backup_dir / "keystore.backup").read_text()
    args = ["keys", "backup", "--upstream", source.direct_dsn()]
    args += ["--keyring", f"sodium:{source.keydir}", "--shares", "3"]
    assert main(args + ["--threshold", "2", "--out", str(backup_dir)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (backup_dir / "keystore.backup").read_text() == before


def test_backup_needs_private_key(
    source: RunningProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public_only = tmp_path / "public-only"
    public_only.mkdir()
    shutil.copy(source.keydir / "public.key", public_only / "public.key")
    args = ["keys", "backup", "--upstream", source.direct_dsn()]
    args += ["--keyring", f"sodium:{public_only}", "--shares", "3", "--threshold", "2"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 1
    assert "no private key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# Argon2id at the moderate cost of `keys restore` takes seconds.
@pytest.mark.slow
def test_restore_with_passphrase(
    source: RunningProxy,
    backup_dir: Path,
    second_cluster: Cluster,
    new_db: str,
    tmp_path: Path,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGSEAL_TEST_PASSPHRASE", "restore passphrase")
    keydir = tmp_path / "restored-keys"
    args = ["keys", "restore", "--upstream", second_cluster.dsn(new_db)]
    args += ["--from", str(backup_dir), "--keydir", str(keydir)]
    args += ["--passphrase-env", "PGSEAL_TEST_PASSPHRASE"]
    for index in (3, 4, 5):
        args += ["--share", str(backup_dir / f"share-{index}.txt")]
    assert main(args) == 0
    assert (keydir / "private.key.enc").exists()
    assert not (keydir / "private.key").exists()

    copy_table(source, second_cluster, new_db)
    spec = f"sodium:{keydir}?passphrase_env=PGSEAL_TEST_PASSPHRASE"
    restored = start_proxy(new_db, keyrings=[spec], server=second_cluster)
    assert read_tokens(restored) == TOKENS
