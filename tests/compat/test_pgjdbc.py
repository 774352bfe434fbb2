"""pgjdbc (Debian's libpostgresql-jdbc-java) through the proxy.

tests/compat/java/RoundTrip.java is compiled with the machine's javac at
test time. Its prepared statements run ten times each, so pgjdbc moves from
unnamed statements to named server-prepared ones after prepareThreshold=5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.compat.clients import libpq_env, run_program
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

JAVA = shutil.which("java")
JAVAC = shutil.which("javac")
PGJDBC = Path("/usr/share/java/postgresql.jar")
SOURCE = Path(__file__).parent / "java" / "RoundTrip.java"
COUNT = 10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        JAVA is None or JAVAC is None, reason="java and javac are not on PATH"
    ),
    pytest.mark.skipif(
        not PGJDBC.is_file(),
        reason="apt-get install libpostgresql-jdbc-java for pgjdbc",
    ),
]


def _token(user_id: int) -> str:
    # The same token as RoundTrip.token in the Java program.
    return f"gho_jdbc_{user_id}_" + "Nm8bV0" * 4


@pytest.fixture(scope="session")
def classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Classpath with pgjdbc and the compiled RoundTrip class."""
    assert JAVAC is not None
    classes = tmp_path_factory.mktemp("java-classes")
    compiled = run_program([JAVAC, "-cp", PGJDBC, "-d", classes, SOURCE])
    assert compiled.returncode == 0, compiled.stderr
    return f"{PGJDBC}:{classes}"


OPTIONS = {
    "server-prepared": "prepareThreshold=5",
    "rewritten-batch": "prepareThreshold=5&reWriteBatchedInserts=true",
    "simple-mode": "preferQueryMode=simple",
}


def _run(
    proxy: RunningProxy, classpath: str, options: str, batch: int
) -> list[list[str]]:
    """Run RoundTrip and return its output records, split on tabs."""
    assert JAVA is not None
    url = (
        f"jdbc:postgresql://127.0.0.1:{proxy.port}/{proxy.database}"
        f"?sslmode=disable&{options}"
    )
    result = run_program(
        [
            JAVA,
            "-cp",
            classpath,
            "RoundTrip",
            url,
            proxy.server.superuser,
            str(COUNT),
            str(batch),
        ],
        env=libpq_env(proxy),
    )
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def _check(proxy: RunningProxy, records: list[list[str]], total: int) -> None:
    assert [r[1:] for r in records if r[0] == "one"] == [
        [str(i), _token(i), f"refresh-{i}" if i % 2 == 0 else "null"]
        for i in range(1, COUNT + 1)
    ]
    assert [r[1:] for r in records if r[0] == "all"] == [
        [str(i), _token(i)] for i in range(1, total + 1)
    ]
    assert [r[1] for r in records if r[0] == "rejected"] == ["0A000"]

    stored = proxy.direct(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _, _ in stored] == list(range(1, total + 1))
    for user_id, access, refresh in stored:
        assert_sealed(access, _token(user_id))
        if user_id % 2 == 0 and user_id <= COUNT:
            assert_sealed(refresh, f"refresh-{user_id}")
        else:
            assert refresh is None


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_round_trip(oauth_proxy: RunningProxy, classpath: str, options: str) -> None:
    records = _run(oauth_proxy, classpath, options, batch=0)

    _check(oauth_proxy, records, COUNT)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            OPTIONS["server-prepared"], id="server-prepared"
        ),
        pytest.param(OPTIONS["rewritten-batch"], id="rewritten-batch"),
        pytest.param(OPTIONS["simple-mode"], id="simple-mode"),
    ],
)
def test_execute_batch(oauth_proxy: RunningProxy, classpath: str, options: str) -> None:
    records = _run(oauth_proxy, classpath, options, batch=3)

    _check(oauth_proxy, records, COUNT + 3)
