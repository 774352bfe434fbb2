"""Keyring sets from a config file: AWS KMS (moto) with a sodium backup for a
critical column, sodium alone for the others, and what happens when KMS stops.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from proxy.cli import main
from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.kms import AwsKmsKeyring
from proxy.crypto.values import dearmour, read_key_ref
from proxy.errors import ConfigError
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

StartProxy = Callable[..., RunningProxy]

TABLE = """
CREATE TABLE accounts (
    id integer PRIMARY KEY,
    card text,
    note text
)
"""
RULES = """\
tables:
  - name: public.accounts
    columns:
      - name: card
        keyring: critical
      - name: note
"""
CARD = "public.accounts.card"
NOTE = "public.accounts.note"
ROWS = [(n, f"4111-0000-0000-{n:04d}", f"note number {n}") for n in range(1, 21)]
SELECT_ALL = "SELECT id, card, note FROM accounts ORDER BY id"
KEY_UNAVAILABLE = "58000"


@dataclass
class StoppableKms:
    """A moto KMS server of this test's own, so the test can stop it."""

    server: ThreadedMotoServer
    endpoint_url: str
    alias: str

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def own_kms(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoppableKms]:
    """moto's KMS on a free loopback port, with one key and its alias."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    client = boto3.session.Session().client("kms", endpoint_url=endpoint)
    key_id = client.create_key(Description="pgseal sets test")["KeyMetadata"]["KeyId"]
    alias = f"alias/pgseal-sets-{uuid.uuid4().hex[:12]}"
    client.create_alias(AliasName=alias, TargetKeyId=key_id)
    kms = StoppableKms(server, endpoint, alias)
    try:
        yield kms
    finally:
        # Stopping a server that a test already stopped is harmless.
        server.stop()


@pytest.fixture
def sodium_spec(tmp_path: Path) -> str:
    keydir = tmp_path / "set-keys"
    SodiumKeyring.create(keydir)
    return f"sodium:{keydir}"


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "accounts.yaml").write_text(RULES)
    return folder


@pytest.fixture
def accounts_db(fresh_db: str, pg_cluster: PgServer) -> str:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLE)
    return fresh_db


def start_with_sets(
    start_proxy: StartProxy,
    database: str,
    rules_dir: Path,
    critical: list[str],
    default: list[str],
) -> RunningProxy:
    return start_proxy(
        database,
        rules_dir,
        keyrings=default,
        keyring_sets={"critical": tuple(critical)},
    )


def kms_of(running: RunningProxy) -> AwsKmsKeyring:
    (keyring,) = [k for k in running.proxy.keyrings if isinstance(k, AwsKmsKeyring)]
    return keyring


def insert_rows(running: RunningProxy, rows: list[tuple[int, str, str]]) -> None:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO accounts (id, card, note) VALUES (%s, %s, %s)", rows
        )


def read_rows(running: RunningProxy, sql: str = SELECT_ALL) -> list[tuple[object, ...]]:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def assert_table_sealed(running: RunningProxy, rows: list[tuple[int, str, str]]) -> None:
    stored = running.direct("SELECT card, note FROM accounts ORDER BY id")
    assert len(stored) == len(rows)
    for (card, note), (_, card_plain, note_plain) in zip(stored, rows):
        assert_sealed(card, card_plain)
        assert_sealed(note, note_plain)


def wrapped_by(running: RunningProxy, key_name: str) -> set[str]:
    rows = running.direct(
        "SELECT w.keyring FROM pgseal.wrapped_keys w "
        "JOIN pgseal.key_names n USING (key_id) WHERE n.key_name = %s",
        (key_name,),
    )
    return {ring for (ring,) in rows}


def test_sets_wrap_per_column(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)

    assert read_rows(writer) == ROWS
    assert_table_sealed(writer, ROWS)
    sodium_name = writer.proxy.keyrings[0].name
    assert wrapped_by(writer, CARD) == {kms_spec, sodium_name}
    assert wrapped_by(writer, NOTE) == {sodium_name}
    # One Encrypt for the one critical data key, none for the note column.
    assert kms_of(writer).operations["Encrypt"] == 1
    assert kms_of(writer).calls == 1

    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    assert read_rows(reader) == ROWS
    assert kms_of(reader).operations["Decrypt"] == 1
    assert kms_of(reader).calls == 1


def test_kms_stopped_cold_reads_backup(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    own_kms.stop()

    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    assert read_rows(reader) == ROWS
    assert_table_sealed(reader, ROWS)
    # KMS was tried for the critical key alone, then sodium opened both keys.
    assert kms_of(reader).operations["Decrypt"] == 1
    sodium_name = reader.proxy.keyrings[0].name
    assert reader.proxy.keystore.unwrap_calls_by_keyring[sodium_name] == 2


def test_unloaded_key_fails_statement(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    own_kms.stop()

    # The proxy that cached the key before KMS stopped keeps serving it.
    assert read_rows(writer) == ROWS

    # A proxy that starts now cannot unwrap the card key, but it starts.
    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )
    assert reader.proxy.keystore.unavailable == {CARD}
    notes = [(n, note) for n, _, note in ROWS]
    with psycopg.connect(reader.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT id, note FROM accounts ORDER BY id").fetchall() == notes
        with pytest.raises(psycopg.Error) as info:
            conn.execute(SELECT_ALL).fetchall()
        assert info.value.sqlstate == KEY_UNAVAILABLE
        assert CARD in str(info.value)
        assert conn.execute("SELECT id, note FROM accounts ORDER BY id").fetchall() == notes

        # The simple query protocol too.
        failed = conn.pgconn.exec_(b"SELECT card FROM accounts")
        assert failed.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"58000"
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (len(ROWS),)

        # And COPY TO STDOUT.
        copy_sql = "COPY accounts (id, card) TO STDOUT"
        with pytest.raises(psycopg.Error) as info, conn.cursor().copy(copy_sql) as copy:
            for _ in copy:
                pass
        assert info.value.sqlstate == KEY_UNAVAILABLE
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (len(ROWS),)


def test_unloaded_key_fails_transaction(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    own_kms.stop()
    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )

    with psycopg.connect(reader.dsn()) as conn:
        conn.execute("UPDATE accounts SET note = %s WHERE id = 1", ["changed"])
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT card FROM accounts WHERE id = 2").fetchall()
        assert info.value.sqlstate == KEY_UNAVAILABLE
        status = conn.info.transaction_status
        assert status == psycopg.pq.TransactionStatus.INERROR
        # The server's transaction failed too, so its update is lost.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT note FROM accounts WHERE id = 1").fetchone() == (
            ROWS[0][2],
        )


def test_unloaded_key_rejects_write(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS[:1])
    own_kms.stop()
    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )

    with psycopg.connect(reader.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(
                "INSERT INTO accounts (id, card, note) VALUES (%s, %s, %s)",
                ROWS[1],
            )
        assert info.value.sqlstate == KEY_UNAVAILABLE
        conn.execute("INSERT INTO accounts (id, note) VALUES (%s, %s)", [3, "plain"])
    assert reader.direct("SELECT id FROM accounts ORDER BY id") == [(1,), (3,)]
    (stored,) = reader.direct("SELECT note FROM accounts WHERE id = 3")[0]
    assert_sealed(stored, "plain")


def test_unknown_set_stops_start(
    accounts_db: str, sodium_spec: str, tmp_path: Path, start_proxy: StartProxy
) -> None:
    folder = tmp_path / "bad-rules"
    folder.mkdir()
    (folder / "accounts.yaml").write_text(RULES.replace("critical", "vault"))
    with pytest.raises(ConfigError) as info:
        start_with_sets(start_proxy, accounts_db, folder, [sodium_spec], [sodium_spec])

    assert "accounts.yaml line 4" in str(info.value)
    assert "'vault'" in str(info.value)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path: Path, critical: list[str], default: list[str]) -> Path:
    path = tmp_path / "pgseal.yaml"
    lines = ["keyrings:", f"  default: {default}", f"  critical: {critical}"]
    lines.append(f"audit_file: {tmp_path / 'audit.jsonl'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_key_commands_use_column_set(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    tmp_path: Path,
    start_proxy: StartProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    config = write_config(tmp_path, [kms_spec, sodium_spec], [sodium_spec])
    connection = ["--upstream", writer.direct_dsn(), "--config", str(config)]
    sodium_name = writer.proxy.keyrings[0].name

    for column in (CARD, NOTE):
        code, _, err = cli(
            capsys, "keys", "rotate", *connection, "--rules", str(rules_dir),
            "--column", column,
        )
        assert code == 0, err
    versions = writer.direct(
        "SELECT n.key_name, w.keyring FROM pgseal.wrapped_keys w "
        "JOIN pgseal.key_names n USING (key_id) WHERE w.version = 2"
    )
    assert sorted(versions) == sorted(
        [(CARD, kms_spec), (CARD, sodium_name), (NOTE, sodium_name)]
    )

    code, out, err = cli(capsys, "keys", "list", *connection)
    assert code == 0, err
    assert out.count(CARD) == 2

    code, out, err = cli(
        capsys, "reencrypt", *connection, "--rules", str(rules_dir),
        "--table", "public.accounts", "--no-progress",
    )
    assert code == 0, err
    stored = writer.direct("SELECT card FROM accounts ORDER BY id")
    for (value,) in stored:
        assert read_key_ref(dearmour(value.encode("ascii")))[1] == 2
    # The writer loads version 2 at its next key refresh; a new proxy at once.
    reader = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec, sodium_spec], [sodium_spec]
    )
    assert read_rows(reader) == ROWS
    audit = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(audit) >= 3


def test_rotate_needs_rules_with_sets(
    accounts_db: str,
    sodium_spec: str,
    rules_dir: Path,
    tmp_path: Path,
    start_proxy: StartProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [sodium_spec], [sodium_spec]
    )
    config = write_config(tmp_path, [sodium_spec], [sodium_spec])
    code, _, err = cli(
        capsys, "keys", "rotate", "--upstream", writer.direct_dsn(),
        "--config", str(config), "--column", CARD,
    )

    assert code == 1
    assert "give --rules" in err
    assert writer.direct("SELECT max(version) FROM pgseal.data_keys") == [(1,)]


def test_rewrap_fills_grown_set(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    tmp_path: Path,
    start_proxy: StartProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [sodium_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    sodium_name = writer.proxy.keyrings[0].name
    assert wrapped_by(writer, CARD) == {sodium_name}

    # KMS joins the critical set: rewrap gives the card key its KMS copy.
    config = write_config(tmp_path, [kms_spec, sodium_spec], [sodium_spec])
    code, out, err = cli(
        capsys, "keys", "rewrap", "--upstream", writer.direct_dsn(),
        "--config", str(config), "--rules", str(rules_dir),
    )
    assert code == 0, err
    assert "1 wrapped copies added" in out
    assert wrapped_by(writer, CARD) == {kms_spec, sodium_name}
    assert wrapped_by(writer, NOTE) == {sodium_name}


def test_backup_restore_take_config(
    accounts_db: str,
    pg_cluster: PgServer,
    sodium_spec: str,
    rules_dir: Path,
    tmp_path: Path,
    start_proxy: StartProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [sodium_spec], [sodium_spec]
    )
    config = write_config(tmp_path, [sodium_spec], [sodium_spec])
    out_dir = tmp_path / "backup"
    code, out, err = cli(
        capsys, "keys", "backup", "--upstream", writer.direct_dsn(),
        "--config", str(config), "--shares", "3", "--threshold", "2",
        "--out", str(out_dir),
    )

    assert code == 0, err
    assert "2 data keys" in out
    assert (out_dir / "share-1.txt").exists()

    # Restore into another database; the key pair goes to the config's folder.
    target = f"{accounts_db}_restored"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{target}"')
    try:
        new_keydir = tmp_path / "restored-keys"
        restored = write_config(
            tmp_path, [f"sodium:{new_keydir}"], [f"sodium:{new_keydir}"]
        )
        code, out, err = cli(
            capsys, "keys", "restore", "--upstream", pg_cluster.dsn(target),
            "--config", str(restored), "--from", str(out_dir),
            "--share", str(out_dir / "share-1.txt"),
            "--share", str(out_dir / "share-3.txt"),
        )
        assert code == 0, err
        assert "unwrapped 2 of them" in out
        assert (new_keydir / "private.key").exists()
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


def test_key_loads_when_kms_returns(
    accounts_db: str,
    own_kms: StoppableKms,
    sodium_spec: str,
    rules_dir: Path,
    start_proxy: StartProxy,
) -> None:
    kms_spec = f"aws-kms:{own_kms.alias}"
    writer = start_with_sets(
        start_proxy, accounts_db, rules_dir, [kms_spec], [sodium_spec]
    )
    insert_rows(writer, ROWS)
    own_kms.stop()
    reader = start_proxy(
        accounts_db,
        rules_dir,
        keyrings=[sodium_spec],
        keyring_sets={"critical": (kms_spec,)},
        key_refresh_seconds=0.2,
    )
    with pytest.raises(psycopg.Error) as info:
        read_rows(reader)
    assert info.value.sqlstate == KEY_UNAVAILABLE

    # moto keeps its keys in this process, so a server on the same port
    # serves the same KMS key again.
    host, port = own_kms.endpoint_url.removeprefix("http://").split(":")
    restarted = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
    restarted.start()
    try:
        deadline = time.monotonic() + 30
        while reader.proxy.keystore.unavailable and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reader.proxy.keystore.unavailable == set()
        assert read_rows(reader) == ROWS
    finally:
        restarted.stop()


def test_rules_check_reads_config(
    accounts_db: str,
    pg_cluster: PgServer,
    sodium_spec: str,
    rules_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    check = ["rules", "check", "--upstream", pg_cluster.dsn(accounts_db)]
    check += ["--rules", str(rules_dir), "--config"]
    good = write_config(tmp_path, [sodium_spec], [sodium_spec])
    code, out, _ = cli(capsys, *check, str(good))
    assert code == 0, out

    bad = tmp_path / "no-critical.yaml"
    bad.write_text(f"keyrings:\n  default: [{sodium_spec}]\n")
    code, out, _ = cli(capsys, *check, str(bad))
    assert code == 1
    assert "accounts.yaml line 4" in out
    assert "'critical'" in out
