"""Rule file validation: every mistake names the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import RuleError
from proxy.rules import Encryption, KeyScope, OnDecryptError, load_rules

SHIPPED = Path(__file__).resolve().parents[1] / "rules"


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "tokens.yaml").write_text(text)
    return tmp_path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(RuleError) as info:
        load_rules(_write(tmp_path, text))
    return str(info.value)


def test_shipped_rules_load() -> None:
    (table,) = load_rules(SHIPPED).tables
    assert table.qualified_name == "public.oauth_tokens"
    assert [c.column for c in table.columns] == ["access_token", "refresh_token"]
    assert all(c.encryption is Encryption.RANDOMIZED for c in table.columns)


def test_defaults_and_options(tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path, """\
tables:
  - name: users
    database: crm
    columns:
      - name: email
        encryption: deterministic
        key: people
        on_decrypt_error: "null"
"""))
    (table,) = rules.tables
    (column,) = table.columns
    assert table.schema == "public"
    assert rules.for_database("crm", "app") == (table,)
    assert rules.for_database("app", "app") == ()
    assert column.key_name == "key:people"
    assert column.on_decrypt_error is OnDecryptError.NULL


def test_unknown_key_named_with_line(tmp_path: Path) -> None:
    message = _error(tmp_path, """\
tables:
  - name: public.oauth_tokens
    columns:
      - name: access_token
        encrypton: randomized
""")
    assert "tokens.yaml line 5" in message
    assert "'encrypton'" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tables: {}\n", "line 1: 'tables' must be a list"),
        ("tables:\n  - columns: []\n", "missing key 'name'"),
        ("tables:\n  - name: t\n", "has no 'columns'"),
        ("tables:\n  - name: t\n    columns: []\n", "lists no columns"),
        (
            "tables:\n  - name: t\n    columns:\n      - name: c\n        encryption: aes\n",
            "line 5: invalid encryption 'aes'",
        ),
        (
            "tables:\n  - name: t\n    columns:\n      - name: c\n        key: k\n",
            "only deterministic columns can share a data key",
        ),
        ("tables:\n  - name: t\n    columns:\n      - name: c\n      - name: c\n",
         "already ruled"),
        ("tables: [\n", "invalid YAML"),
    ],
)
def test_invalid_rules(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_associated_columns_loaded(tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path, """\
tables:
  - name: oauth_tokens
    columns:
      - name: access_token
        encryption: randomized
        associated_columns: [user_id, provider]
      - name: refresh_token
"""))
    access, refresh = rules.tables[0].columns
    assert access.associated_columns == ("user_id", "provider")
    assert refresh.associated_columns == ()


_ASSOCIATED = "tables:\n  - name: t\n    columns:\n      - name: c\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            _ASSOCIATED + "        associated_columns: user_id\n",
            "line 5: 'associated_columns' must be a list",
        ),
        (
            _ASSOCIATED + "        associated_columns: []\n",
            "line 5: 'associated_columns' of column c is an empty list",
        ),
        (
            _ASSOCIATED + "        associated_columns: [user_id, c]\n",
            "line 5: column c lists itself in 'associated_columns'",
        ),
        (
            _ASSOCIATED + "        associated_columns:\n          - user_id\n          - user_id\n",
            "line 7: column c lists 'user_id' twice in 'associated_columns'",
        ),
        (
            _ASSOCIATED + "        associated_columns: [[user_id]]\n",
            "line 5: 'associated_columns' must be a non-empty string",
        ),
        (
            _ASSOCIATED + "        associated_columns: ['']\n",
            "'associated_columns' must be a non-empty string",
        ),
        (
            _ASSOCIATED
            + "        encryption: deterministic\n        associated_columns: [user_id]\n",
            "line 6: column c is deterministic and sets 'associated_columns'",
        ),
        (
            _ASSOCIATED
            + "        associated_columns:\n          - user_id\n          - d\n"
            + "      - name: d\n",
            "line 7: column c lists encrypted column 'd' in 'associated_columns'",
        ),
        (
            _ASSOCIATED + "        associated_colums: [user_id]\n",
            "line 5: unknown key 'associated_colums'",
        ),
    ],
)
def test_invalid_associated_columns(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text)
    assert "tokens.yaml" in message
    assert expected in message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(tmp_path / "nowhere")


SUBJECT_RULE = """\
tables:
  - name: posts
    columns:
      - name: body
        encryption: {encryption}
{extra}"""


def test_subject_scope_loads(tmp_path: Path) -> None:
    extra = "        key_scope: subject\n        subject_column: creator_id\n"
    rules = load_rules(_write(tmp_path, SUBJECT_RULE.format(encryption="randomized", extra=extra)))
    (column,) = rules.tables[0].columns
    assert column.key_scope is KeyScope.SUBJECT
    assert column.subject_column == "creator_id"


def test_key_scope_defaults_to_column(tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path, SUBJECT_RULE.format(encryption="randomized", extra="")))
    (column,) = rules.tables[0].columns
    assert column.key_scope is KeyScope.COLUMN
    assert column.subject_column is None


@pytest.mark.parametrize(
    ("encryption", "extra", "line", "expected"),
    [
        (
            "deterministic",
            "        key_scope: subject\n        subject_column: creator_id\n",
            6,
            "is deterministic and cannot be keyed per subject",
        ),
        ("randomized", "        key_scope: subject\n", 4, "no 'subject_column'"),
        (
            "randomized",
            "        subject_column: creator_id\n",
            6,
            "sets 'subject_column' but not 'key_scope: subject'",
        ),
        ("randomized", "        key_scope: owner\n", 6, "invalid key_scope 'owner'"),
        (
            "randomized",
            "        key_scope: subject\n        subject_column: body\n",
            7,
            "names itself as its subject_column",
        ),
        (
            "randomized",
            (
                "        key_scope: subject\n        subject_column: creator_id\n"
                "        rotation_period: 30d\n"
            ),
            6,
            "'rotation_period', which only rotates column keys",
        ),
    ],
    ids=["deterministic", "no subject column", "no key scope", "bad scope", "itself", "rotation"],
)
def test_subject_scope_rejected(
    tmp_path: Path, encryption: str, extra: str, line: int, expected: str
) -> None:
    message = _error(tmp_path, SUBJECT_RULE.format(encryption=encryption, extra=extra))
    assert f"tokens.yaml line {line}:" in message
    assert expected in message


def test_encrypted_subject_column_rejected(tmp_path: Path) -> None:
    text = SUBJECT_RULE.format(
        encryption="randomized",
        extra="        key_scope: subject\n        subject_column: title\n"
        "      - name: title\n",
    )
    message = _error(tmp_path, text)
    assert "tokens.yaml line 4:" in message
    assert "takes its subject from title, which is encrypted" in message
