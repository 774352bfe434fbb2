"""Randomized literals moved into hidden parameters, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.catalog import Catalog, EncryptedColumn, RuledTable, Storage
from proxy.errors import StatementRejected
from proxy.rules import ColumnRule, Encryption, Source
from proxy.sql.analyze import Analyzer
from proxy.sql.hidden_params import HiddenParams, hide_randomized_literals

SOURCE = Source(Path("rules/test.yaml"), 1)


def _column(
    name: str,
    attnum: int,
    encryption: Encryption,
    storage: Storage = Storage.TEXT,
    logical: str | None = None,
) -> EncryptedColumn:
    rule = ColumnRule("public", "accounts", name, encryption, SOURCE, type=logical)
    return EncryptedColumn(rule, attnum, storage)


TOKEN = _column("token", 3, Encryption.RANDOMIZED)
EMAIL = _column("email", 4, Encryption.DETERMINISTIC)
PHOTO = _column("photo", 5, Encryption.RANDOMIZED, Storage.BYTEA)
AGE = _column("age", 6, Encryption.RANDOMIZED, logical="int4")
ACCOUNTS = RuledTable(
    oid=16400,
    schema="public",
    name="accounts",
    columns=("id", "owner", "token", "email", "photo", "age"),
    encrypted={"token": TOKEN, "email": EMAIL, "photo": PHOTO, "age": AGE},
)
ANALYZER = Analyzer(Catalog.build([ACCOUNTS]))


def _hide(sql: str, declared_count: int = 0) -> HiddenParams | None:
    return hide_randomized_literals(sql, ANALYZER.plan(sql).literals, declared_count)


def test_randomized_literals_numbered_after_client_params() -> None:
    hidden = _hide(
        "INSERT INTO accounts (owner, token, photo) VALUES ($2, 'tok', '\\x01')", 1
    )
    assert hidden is not None
    assert (
        hidden.sql == "INSERT INTO accounts (owner, token, photo) VALUES ($2, $3, $4)"
    )
    assert hidden.client_count == 2
    assert [slot.column for slot in hidden.slots] == [TOKEN, PHOTO]
    assert hidden.param_types((23,)) == (23, 0, 25, 17)


def test_declared_types_count_as_client_params() -> None:
    hidden = _hide("INSERT INTO accounts (token) VALUES ('tok')", 3)
    assert hidden is not None
    assert hidden.sql == "INSERT INTO accounts (token) VALUES ($4)"
    assert hidden.param_types((0, 0, 0)) == (0, 0, 0, 25)


def test_deterministic_literal_kept_at_new_position() -> None:
    sql = "UPDATE accounts SET token = 'a-long-token' WHERE email = 'e@x' AND id = $1"
    hidden = _hide(sql)
    assert hidden is not None
    assert (
        hidden.sql == "UPDATE accounts SET token = $2 WHERE email = 'e@x' AND id = $1"
    )
    (kept,) = hidden.sealed_at_parse
    assert hidden.sql[kept.start : kept.end] == "'e@x'"
    assert kept.column == EMAIL


def test_only_deterministic_literals_not_hidden() -> None:
    assert _hide("SELECT id FROM accounts WHERE email = 'e@x'") is None


def test_array_literal_hidden_as_array_param() -> None:
    hidden = _hide(
        "INSERT INTO accounts (owner, token) SELECT * FROM "
        "UNNEST('{1,2}'::int[], '{a,b}'::text[])"
    )
    assert hidden is not None
    assert hidden.sql.endswith("UNNEST('{1,2}'::int[], $1::text[])")
    assert hidden.param_types(()) == (1009,)


def test_typed_literal_form_rejected() -> None:
    with pytest.raises(StatementRejected) as info:
        _hide("INSERT INTO accounts (token) VALUES (text 'tok')")
    assert info.value.sqlstate == "0A000"
    assert "public.accounts.token" in info.value.message
    assert info.value.hint


def test_invalid_literal_rejected_at_parse() -> None:
    with pytest.raises(StatementRejected) as info:
        _hide("INSERT INTO accounts (age) VALUES ('not a number')")
    assert info.value.sqlstate == "22P02"
    assert "not a number" not in info.value.message


def test_sql_prepare_literals_not_hidden() -> None:
    # $1 inside PREPARE names the PREPARE's own parameter.
    assert (
        _hide(
            "PREPARE p(int) AS INSERT INTO accounts (owner, token) VALUES ($1, 'tok')"
        )
        is None
    )


def test_parameter_limit_rejected() -> None:
    with pytest.raises(StatementRejected) as info:
        _hide("INSERT INTO accounts (owner, token) VALUES ($1, 'tok')", 65535)
    assert info.value.sqlstate == "54000"
    assert "public.accounts.token" in info.value.message
    assert "65535" in info.value.hint
