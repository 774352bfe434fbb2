"""Rule options: shared deterministic keys and on_decrypt_error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.errors import RuleError
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

RULES = """\
tables:
  - name: public.patients
    columns:
      - name: national_id
        encryption: deterministic
        key: person-id
      - name: note
        on_decrypt_error: null
      - name: raw_note
        on_decrypt_error: ciphertext
      - name: strict_note
  - name: public.claims
    columns:
      - name: national_id
        encryption: deterministic
        key: person-id
"""
TABLES = """
CREATE TABLE patients (id int PRIMARY KEY, national_id text, note text,
                       raw_note text, strict_note text);
CREATE TABLE claims (id int PRIMARY KEY, national_id text, amount int);
"""


@pytest.fixture
def clinic(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLES)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "clinic.yaml").write_text(RULES)
    return start_proxy(fresh_db, rules)


def test_join_on_shared_key(clinic: RunningProxy) -> None:
    with psycopg.connect(clinic.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO patients (id, national_id) VALUES (1, %s)", ("850101-1234",))
        conn.execute("INSERT INTO claims VALUES (10, %s, 250), (11, %s, 90)",
                     ("850101-1234", "990101-9999"))
        joined = conn.execute(
            "SELECT p.id, c.amount, c.national_id FROM patients p "
            "JOIN claims c ON c.national_id = p.national_id"
        ).fetchall()
    assert joined == [(1, 250, "850101-1234")]
    ((patient,),) = clinic.direct("SELECT national_id FROM patients")
    ((claim,),) = clinic.direct("SELECT national_id FROM claims WHERE id = 10")
    assert_sealed(patient, "850101-1234")
    assert patient == claim


def test_join_across_keys_rejected(clinic: RunningProxy) -> None:
    with psycopg.connect(clinic.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(
                "SELECT 1 FROM patients p JOIN claims c ON c.national_id = p.note"
            )


def _plant_garbage(clinic: RunningProxy) -> None:
    clinic.direct(
        "INSERT INTO patients (id, note, raw_note, strict_note) "
        "VALUES (2, 'pgs:garbage', 'pgs:garbage', 'pgs:garbage')"
    )


def test_on_decrypt_error_null_and_ciphertext(clinic: RunningProxy) -> None:
    _plant_garbage(clinic)
    with psycopg.connect(clinic.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT note, raw_note FROM patients WHERE id = 2").fetchone()
    assert row == (None, "pgs:garbage")


def test_on_decrypt_error_default_fails_statement(clinic: RunningProxy) -> None:
    _plant_garbage(clinic)
    with psycopg.connect(clinic.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DataCorrupted):
            conn.execute("SELECT strict_note FROM patients WHERE id = 2").fetchall()
        # Only the statement failed: the connection goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ("      - name: acess_token\n", "line 4: unknown column 'acess_token' in public.t"),
        ("      - name: amount\n", "cannot hold sealed values"),
        ("      - name: plan\n", "has a default"),
    ],
)
def test_rule_mismatch_fails_start(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
    columns: str,
    expected: str,
) -> None:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (access_token text, amount int, plan text DEFAULT 'x')")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "t.yaml").write_text("tables:\n  - name: public.t\n    columns:\n" + columns)
    with pytest.raises(RuleError) as info:
        start_proxy(fresh_db, rules)
    assert f"rule file {rules / 't.yaml'}" in str(info.value)
    assert expected in str(info.value)


def test_rule_for_another_database(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> None:
    other = f"{fresh_db}_other"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {other}")
    try:
        with psycopg.connect(pg_cluster.dsn(other), autocommit=True) as conn:
            conn.execute("CREATE TABLE secrets (id int, value text)")
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "other.yaml").write_text(
            f"tables:\n  - name: secrets\n    database: {other}\n"
            "    columns:\n      - name: value\n"
        )
        proxy = start_proxy(fresh_db, rules)
        dsn = proxy.dsn().replace(f"/{fresh_db}", f"/{other}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO secrets VALUES (1, %s)", ("other-db-secret",))
            read = conn.execute("SELECT value FROM secrets").fetchall()
        with psycopg.connect(pg_cluster.dsn(other)) as conn:
            ((stored,),) = conn.execute("SELECT value FROM secrets").fetchall()
        assert read == [("other-db-secret",)]
        assert_sealed(stored, "other-db-secret")
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
