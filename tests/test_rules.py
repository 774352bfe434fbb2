"""Rule file validation: every mistake names the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import RuleError
from proxy.rules import Encryption, OnDecryptError, load_rules

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
