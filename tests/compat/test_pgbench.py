"""pgbench through the proxy: a custom script over an encrypted column.

The token is a literal of the script, since a value that the server would
compute (`'tok-' || :id`) is rightly rejected. In simple mode pgbench
substitutes `:id` into the text. In extended and prepared modes it sends
`:id` as a parameter. Prepared mode parses each statement once per
connection and then only binds and executes it.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.compat.clients import libpq_env, run_program, system_binary
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

PGBENCH = system_binary("pgbench")
CLIENTS = 4
TRANSACTIONS = 50

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PGBENCH is None, reason="pgbench is not on PATH"),
]


def _script(token: str) -> str:
    return "\n".join(
        [
            "\\set id random(1, 100000)",
            (
                "INSERT INTO oauth_tokens (user_id, provider, access_token) "
                f"VALUES (:id, :client_id, '{token}');"
            ),
            "SELECT access_token FROM oauth_tokens WHERE user_id = :id;",
            (
                "UPDATE oauth_tokens SET refresh_token = 'refresh-bench' "
                "WHERE user_id = :id;"
            ),
            "",
        ]
    )


def _run_pgbench(
    proxy: RunningProxy,
    mode: str,
    script: Path,
    clients: int = CLIENTS,
    transactions: int = TRANSACTIONS,
) -> str:
    assert PGBENCH is not None
    result = run_program(
        [
            PGBENCH,
            "--no-vacuum",
            f"--protocol={mode}",
            f"--file={script}",
            f"--transactions={transactions}",
            f"--client={clients}",
        ],
        env=libpq_env(proxy),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_custom_script_modes(
    oauth_proxy: RunningProxy, mode: str, tmp_path: Path
) -> None:
    token = f"gho_pgbench_{mode}_Zq8xLm3Kp9"
    script = tmp_path / "tokens.sql"
    script.write_text(_script(token), encoding="utf-8")

    output = _run_pgbench(oauth_proxy, mode, script)

    total = CLIENTS * TRANSACTIONS
    assert f"processed: {total}/{total}" in output
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        providers = conn.execute(
            "SELECT DISTINCT provider FROM oauth_tokens"
        ).fetchall()
        rows = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens"
        ).fetchall()
    assert sorted(provider for (provider,) in providers) == [
        str(i) for i in range(CLIENTS)
    ]
    assert len(rows) == total
    assert set(rows) == {(token, "refresh-bench")}
    stored = oauth_proxy.direct("SELECT access_token, refresh_token FROM oauth_tokens")
    for access, refresh in stored:
        assert_sealed(access, token)
        assert_sealed(refresh, "refresh-bench")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_literal_fresh_ciphertext_per_row(
    oauth_proxy: RunningProxy, mode: str, tmp_path: Path
) -> None:
    token = f"gho_pgbench_{mode}_Zq8xLm3Kp9"
    script = tmp_path / "tokens.sql"
    script.write_text(_script(token), encoding="utf-8")

    _run_pgbench(oauth_proxy, mode, script, clients=1, transactions=10)

    stored = oauth_proxy.direct("SELECT access_token FROM oauth_tokens")
    # A randomized column seals every value with a fresh nonce, so equal
    # tokens must not show up as equal ciphertexts in the table.
    assert len({access for (access,) in stored}) == 10
