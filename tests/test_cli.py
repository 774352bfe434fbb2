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
