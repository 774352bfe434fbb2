"""The rotation_period option of rule files."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import RuleError
from proxy.rules import load_rules, parse_duration


def write_rules(tmp_path: Path, column: str) -> Path:
    (tmp_path / "notes.yaml").write_text(
        f"tables:\n  - name: public.notes\n    columns:\n{column}"
    )
    return tmp_path


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400.0), ("12h", 43200.0), ("30m", 1800.0), ("45s", 45.0)],
)
def test_parse_duration_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "0d", "1.5h", "-1d", "10", "10w", "1 d"])
def test_parse_duration_invalid(text: str) -> None:
    assert parse_duration(text) is None


def test_rotation_period_loaded(tmp_path: Path) -> None:
    folder = write_rules(tmp_path, "      - name: body\n        rotation_period: 90d\n")
    (table,) = load_rules(folder).tables
    assert table.columns[0].rotation_period == 90 * 86400.0


def test_rotation_period_default_none(tmp_path: Path) -> None:
    (table,) = load_rules(write_rules(tmp_path, "      - name: body\n")).tables
    assert table.columns[0].rotation_period is None


def test_rotation_period_deterministic_rejected(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path,
        "      - name: email\n"
        "        encryption: deterministic\n"
        "        rotation_period: 30d\n",
    )
    with pytest.raises(RuleError) as info:
        load_rules(folder)
    message = str(info.value)
    assert f"rule file {folder / 'notes.yaml'} line 6" in message
    assert "deterministic keys never rotate by themselves" in message


def test_rotation_period_invalid_value(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path, "      - name: body\n        rotation_period: soon\n"
    )
    with pytest.raises(RuleError, match="line 5: invalid rotation_period 'soon'"):
        load_rules(folder)
