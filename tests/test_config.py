"""The config file: keyring sets and the audit file, validated with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.app import ProxySettings
from proxy.cli import main
from proxy.config import keyring_options, load_config
from proxy.crypto.keyring import SodiumKeyring
from proxy.errors import ConfigError, RuleError
from proxy.keyring_sets import load_keyring_sets
from proxy.rules import load_rule_file

GOOD = """\
keyrings:
  default: ["sodium:/etc/pgseal/keys"]
  critical: ["aws-kms:alias/pgseal", "sodium:/etc/pgseal/keys"]
audit_file: /var/log/pgseal/audit.jsonl
"""

# (file text, line named in the error, words the error contains)
BAD = [
    ("keyrings:\n  default: [sodium:/k]\nlisten: 1\n", 3, "unknown key 'listen'"),
    ("keyrings:\n  critical: [sodium:/k]\n", 2, "no set named 'default'"),
    ("keyrings:\n  default: []\n", 2, "is empty"),
    ("keyrings:\n  default: sodium:/k\n", 2, "must be a list"),
    ("keyrings:\n  default:\n    - sodium:/k\n    - kms:x\n", 4, "invalid keyring spec"),
    ("keyrings:\n  default:\n    - sodium:/k\n    - sodium:/k\n", 4, "twice"),
    ("keyrings:\n  default: [sodium:/k]\n  default: [sodium:/j]\n", 3, "appears twice"),
    ("keyrings:\n  default: [sodium:/k]\n  'bad name': [sodium:/k]\n", 3, "set name"),
    ("keyrings: [sodium:/k]\n", 1, "must be a mapping"),
    ("audit_file: /tmp/a\n", 1, "missing key 'keyrings'"),
    ("keyrings:\n  default: [sodium:/k]\naudit_file: ''\n", 3, "non-empty string"),
    ("keyrings:\n  default: [{a: 1}]\n", 2, "non-empty string"),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgseal.yaml"
    path.write_text(text)
    return path


def test_config_loads_sets(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))

    assert config.default_set == ("sodium:/etc/pgseal/keys",)
    assert config.named_sets() == {
        "critical": ("aws-kms:alias/pgseal", "sodium:/etc/pgseal/keys")
    }
    assert config.audit_file == Path("/var/log/pgseal/audit.jsonl")
    assert config.all_specs() == ("sodium:/etc/pgseal/keys", "aws-kms:alias/pgseal")


@pytest.mark.parametrize(("text", "line", "words"), BAD)
def test_bad_config_names_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert f"config file {path} line {line}:" in str(info.value)
    assert words in str(info.value)


def test_invalid_yaml_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "keyrings: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")


def test_keyring_and_config_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="both given"):
        keyring_options(["sodium:/k"], path, None)


def test_audit_log_and_audit_file_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="audit_file"):
        keyring_options(None, path, tmp_path / "audit.jsonl")


def test_keyring_alone_is_default_set() -> None:
    options = keyring_options(["sodium:/a", "sodium:/b"], None, None)

    assert options.default == ("sodium:/a", "sodium:/b")
    assert options.named == {}


def test_serve_reports_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "keyrings:\n  default: [sodium:/k]\nlisten: 1\n")
    code = main(
        ["serve", "--upstream", "postgresql://u:p@127.0.0.1:1/db", "--config", str(path)]
    )

    assert code == 1
    assert f"config file {path} line 3: unknown key 'listen'" in capsys.readouterr().err


def test_rule_keyring_key_read(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "tables:\n  - name: t\n    columns:\n      - name: c\n        keyring: critical\n"
    )
    (table,) = load_rule_file(path)

    assert table.columns[0].keyring == "critical"


def test_rule_keyring_empty_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "tables:\n  - name: t\n    columns:\n      - name: c\n        keyring: ''\n"
    )
    with pytest.raises(RuleError, match="line 5"):
        load_rule_file(path)


def rule_columns(tmp_path: Path, text: str) -> list[object]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return [column for table in load_rule_file(path) for column in table.columns]


def test_unknown_set_names_rule_line(tmp_path: Path) -> None:
    SodiumKeyring.create(tmp_path / "keys")
    sets = load_keyring_sets([f"sodium:{tmp_path / 'keys'}"], {})
    columns = rule_columns(
        tmp_path,
        "tables:\n  - name: t\n    columns:\n      - name: a\n      - name: c\n"
        "        keyring: critical\n",
    )
    with pytest.raises(ConfigError) as info:
        sets.for_columns(columns)  # type: ignore[arg-type]

    assert "rules.yaml line 5" in str(info.value)
    assert "'critical'" in str(info.value)


def test_shared_key_needs_one_set(tmp_path: Path) -> None:
    SodiumKeyring.create(tmp_path / "keys")
    spec = f"sodium:{tmp_path / 'keys'}"
    sets = load_keyring_sets([spec], {"critical": [spec]})
    columns = rule_columns(
        tmp_path,
        "tables:\n  - name: t\n    columns:\n"
        "      - {name: a, encryption: deterministic, key: shared}\n"
        "      - {name: b, encryption: deterministic, key: shared, keyring: critical}\n",
    )
    with pytest.raises(ConfigError, match="give both the same set"):
        sets.for_columns(columns)  # type: ignore[arg-type]


def test_spec_in_two_sets_loads_once(tmp_path: Path) -> None:
    SodiumKeyring.create(tmp_path / "keys")
    spec = f"sodium:{tmp_path / 'keys'}"
    sets = load_keyring_sets([spec], {"critical": [spec]})

    assert sets.sets["critical"][0] is sets.default[0]
    assert len(sets.keyrings) == 1


def test_serve_passes_config_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[ProxySettings] = []

    async def record(settings: ProxySettings) -> None:
        captured.append(settings)

    monkeypatch.setattr("proxy.cli._run_proxy", record)
    path = write(tmp_path, GOOD)
    code = main(
        ["serve", "--upstream", "postgresql://u:p@127.0.0.1:1/db", "--config", str(path)]
    )

    assert code == 0
    (settings,) = captured
    assert settings.keyrings == ("sodium:/etc/pgseal/keys",)
    assert dict(settings.keyring_sets) == {
        "critical": ("aws-kms:alias/pgseal", "sodium:/etc/pgseal/keys")
    }
    assert settings.audit_log == Path("/var/log/pgseal/audit.jsonl")


def test_serve_rejects_keyring_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    code = main(
        [
            "serve", "--upstream", "postgresql://u:p@127.0.0.1:1/db",
            "--config", str(path), "--keyring", "sodium:/k",
        ]
    )

    assert code == 1
    assert "give one or the other" in capsys.readouterr().err
