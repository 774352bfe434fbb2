"""psql through the proxy: literals in simple queries, and its \\d catalog queries."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

PSQL = shutil.which("psql")

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql is not on PATH")

TOKEN = "gho_psql_" + "Lm4nP" * 10
NON_ASCII = "jeton-żółć-🔑"


def psql(proxy: RunningProxy, *commands: str) -> subprocess.CompletedProcess[str]:
    """Run psql against the proxy with one -c per command, unaligned, no headers."""
    assert PSQL is not None
    args = [
        PSQL,
        "--no-psqlrc",
        "--no-align",
        "--tuples-only",
        "--set=ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        str(proxy.port),
        "-U",
        proxy.server.superuser,
        "-d",
        proxy.database,
    ]
    for command in commands:
        args += ["-c", command]
    env = {**os.environ, "PGPASSWORD": proxy.server.password, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGSERVICE", None)
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_insert_literals_and_select(oauth_proxy: RunningProxy) -> None:
    result = psql(
        oauth_proxy,
        "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
        f"VALUES (1, '{TOKEN}', 'it''s-{NON_ASCII}'), (2, NULL, E'tab\\there')",
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY user_id",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "INSERT 0 2",
        f"1|{TOKEN}|it's-{NON_ASCII}",
        "2||tab\there",
    ]
    stored = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    assert_sealed(stored[0][0], TOKEN)
    assert_sealed(stored[0][1], NON_ASCII)
    assert stored[1][0] is None
    assert_sealed(stored[1][1], "tab\there")


def test_several_statements_in_one_command(oauth_proxy: RunningProxy) -> None:
    # One -c string is one simple Query message that contains every
    # statement. psql 15 and later print the result of each.
    result = psql(
        oauth_proxy,
        f"INSERT INTO oauth_tokens (user_id, access_token) VALUES (3, '{TOKEN}'); "
        "UPDATE oauth_tokens SET refresh_token = 'refreshed' WHERE user_id = 3; "
        "SELECT access_token, refresh_token FROM oauth_tokens",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "INSERT 0 1",
        "UPDATE 1",
        f"{TOKEN}|refreshed",
    ]
    ((access, refresh),) = oauth_proxy.direct(
        "SELECT access_token, refresh_token FROM oauth_tokens"
    )
    assert_sealed(access, TOKEN)
    assert_sealed(refresh, "refreshed")


def test_rejected_statement_message(oauth_proxy: RunningProxy) -> None:
    result = psql(
        oauth_proxy, "SELECT id FROM oauth_tokens WHERE access_token LIKE 'gho%'"
    )

    assert result.returncode != 0
    assert "access_token" in result.stderr
    assert "LIKE" in result.stderr


def test_describe_table(oauth_proxy: RunningProxy) -> None:
    result = psql(oauth_proxy, "\\d oauth_tokens")

    assert result.returncode == 0, result.stderr
    columns = {
        line.split("|")[0]: line.split("|")[1]
        for line in result.stdout.splitlines()
        if line.count("|") >= 4
    }
    assert columns["access_token"] == "text"
    assert columns["refresh_token"] == "text"
    assert columns["user_id"] == "integer"
