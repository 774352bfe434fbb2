"""node-postgres (the npm package `pg`) through the proxy.

tests/compat/node/round_trip.js runs parameterized inserts, a named prepared
statement, a pool and a simple query, and prints what it read as JSON.
`npm ci` installs the locked `pg` into tests/compat/node on first use, when
.ci/run has not already done it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.compat.clients import libpq_env, run_program
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_DIR = Path(__file__).parent / "node"
TOKENS: list[tuple[int, str]] = [
    (i, f"gho_node_{i}_" + "Xc4vB" * 8) for i in range(1, 7)
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE is None or NPM is None, reason="node and npm are not on PATH"
    ),
]


@pytest.fixture(scope="session")
def node_pg() -> Path:
    """The round-trip script, with the `pg` package installed beside it."""
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        assert NPM is not None
        installed = run_program([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR)
        assert installed.returncode == 0, installed.stderr
    return NODE_DIR / "round_trip.js"


def test_round_trip(oauth_proxy: RunningProxy, node_pg: Path) -> None:
    assert NODE is not None
    result = run_program(
        [NODE, node_pg, json.dumps(TOKENS)], env=libpq_env(oauth_proxy)
    )

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["returned"] == [
        {"user_id": user_id, "access_token": token} for user_id, token in TOKENS[:3]
    ]
    assert (
        output["named"]
        == [
            {"access_token": token, "refresh_token": f"refresh-{user_id}"}
            for user_id, token in TOKENS[:3]
        ]
        * 3
    )
    assert output["all"] == [list(pair) for pair in TOKENS]
    assert output["rejected"]["code"] == "0A000"
    assert "access_token" in output["rejected"]["message"]

    stored = oauth_proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _ in stored] == [user_id for user_id, _ in TOKENS]
    for (_, value), (_, token) in zip(stored, TOKENS):
        assert_sealed(value, token)
