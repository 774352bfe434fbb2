"""The upstream password from the URI, PGPASSWORD or a password file, as libpq."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.server import Upstream

NO_PASSWORD = "postgresql://pgseal@db.internal:5433/app"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start each test without PGPASSWORD, and with an empty home directory."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGPASSFILE", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def write_passfile(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_no_password_anywhere() -> None:
    assert Upstream.parse(NO_PASSWORD).password == ""


def test_pgpassword_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env")
    assert Upstream.parse(NO_PASSWORD).password == "from-env"


def test_uri_password_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env")
    upstream = Upstream.parse("postgresql://pgseal:from-uri@db.internal:5433/app")
    assert upstream.password == "from-uri"


def test_pgpassword_wins_over_passfile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    passfile = write_passfile(tmp_path / "pass", "*:*:*:*:from-file\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGPASSWORD", "from-env")
    assert Upstream.parse(NO_PASSWORD).password == "from-env"


def test_passfile_first_match(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    passfile = write_passfile(
        tmp_path / "pass",
        "# comment\n"
        "db.internal:5432:app:pgseal:wrong-port\n"
        "db.internal:5433:other:pgseal:wrong-database\n"
        "db.internal:5433:app:someone:wrong-user\n"
        "other.host:*:*:*:wrong-host\n"
        "db.internal:5433:*:pgseal:right\n"
        "*:*:*:*:too-late\n",
    )
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    assert Upstream.parse(NO_PASSWORD).password == "right"


def test_passfile_escapes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    passfile = write_passfile(tmp_path / "pass", r"*:*:*:pgseal:a\:b\\c:d" + "\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    assert Upstream.parse(NO_PASSWORD).password == r"a:b\c:d"


def test_default_passfile_in_home(tmp_path: Path) -> None:
    write_passfile(tmp_path / "home" / ".pgpass", "*:*:app:pgseal:from-home\n")
    assert Upstream.parse(NO_PASSWORD).password == "from-home"


def test_passfile_group_readable_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passfile = write_passfile(tmp_path / "pass", "*:*:*:*:exposed\n", mode=0o640)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with caplog.at_level(logging.WARNING, logger="proxy.pgpass"):
        upstream = Upstream.parse(NO_PASSWORD)
    assert upstream.password == ""
    assert f"chmod 600 {passfile}" in caplog.text
    assert "exposed" not in caplog.text


def test_passfile_directory_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(tmp_path))
    assert Upstream.parse(NO_PASSWORD).password == ""


def test_password_hidden_from_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env-secret")
    assert "from-env-secret" not in repr(Upstream.parse(NO_PASSWORD))


@pytest.mark.parametrize("port", ["99999", "0", "65536", "port"])
def test_invalid_port_rejected(port: str) -> None:
    with pytest.raises(ConfigError) as info:
        Upstream.parse(f"postgresql://pgseal:hunter2@127.0.0.1:{port}/app")
    assert "1 to 65535" in str(info.value)
    assert repr(port) in str(info.value)
    assert "hunter2" not in str(info.value)


def test_port_defaults_to_5432() -> None:
    assert Upstream.parse("postgresql://pgseal@db.internal/app").port == 5432
