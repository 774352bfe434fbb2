"""Option checks of `pgseal serve` that run before any connection is made."""

from __future__ import annotations

import pytest

from proxy.cli import MIN_MAX_MESSAGE, main

SERVE = [
    "serve",
    "--upstream",
    "postgresql://pgseal@127.0.0.1:1/app",
    "--keyring",
    "sodium:/nonexistent",
]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--max-message-size",
            str(MIN_MAX_MESSAGE - 1),
            "--max-message-size must be at least",
        ),
        ("--startup-timeout", "0", "--startup-timeout must be more than 0"),
        ("--startup-timeout", "-5", "--startup-timeout must be more than 0"),
        ("--startup-timeout", "nan", "--startup-timeout must be more than 0"),
        ("--startup-timeout", "inf", "--startup-timeout must be more than 0"),
    ],
)
def test_serve_rejects_limit(
    capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    assert main([*SERVE, option, value]) == 1
    assert message in capsys.readouterr().err


def test_serve_rejects_upstream_port(capsys: pytest.CaptureFixture[str]) -> None:
    upstream = "postgresql://pgseal:hunter2@127.0.0.1:99999/app"
    args = ["serve", "--upstream", upstream, "--keyring", "sodium:/nonexistent"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "upstream port must be a number from 1 to 65535, got '99999'" in err
    assert "Traceback" not in err
    assert "hunter2" not in err


def test_serve_rejects_listen_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SERVE, "--listen", "127.0.0.1:70000"]) == 1
    assert "port from 0 to 65535" in capsys.readouterr().err


def test_failed_start_logs_no_stop(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(SERVE) == 1
    assert "pgseal: error:" in capsys.readouterr().err
    assert "pgseal stopped" not in caplog.text
