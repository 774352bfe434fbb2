"""Tests for the audit log of key operations in proxy.audit."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from proxy.audit import AuditLog, KeyVersionRef, audit_operation
from proxy.errors import KeyringError


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_file_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, db_user="pgseal").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_audit_operation_ok(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, db_user="pgseal")
    with audit.operation("rotate", keyrings=["sodium:00"], key_names=["k"]) as record:
        record.keys.append(KeyVersionRef("k", 3, 2))
        record.details["reason"] = "operator"
    audit.close()

    (line,) = read_lines(path)
    assert line["action"] == "rotate"
    assert line["outcome"] == "ok"
    assert line["keys"] == [{"name": "k", "key_id": 3, "version": 2}]
    assert line["keyrings"] == ["sodium:00"]
    assert line["details"] == {"reason": "operator"}
    actor = line["actor"]
    assert isinstance(actor, dict)
    assert actor["db_user"] == "pgseal"
    assert actor["os_user"]
    assert str(line["time"]).endswith("+00:00")


def test_audit_operation_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, db_user="pgseal")
    with pytest.raises(KeyringError), audit.operation("rewrap"):
        raise KeyringError("KMS down")
    audit.close()

    (line,) = read_lines(path)
    assert line["outcome"] == "error"
    assert line["error"] == "KeyringError"
    assert "KMS down" not in path.read_text()


def test_audit_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for action in ("create", "retire"):
        audit = AuditLog(path, db_user="pgseal")
        with audit.operation(action):
            pass
        audit.close()
    assert [line["action"] for line in read_lines(path)] == ["create", "retire"]


def test_audit_disabled_records_nothing(tmp_path: Path) -> None:
    with audit_operation(None, "rotate") as record:
        record.details["x"] = 1
    assert list(tmp_path.iterdir()) == []
