"""`pgseal demo` run as a user would: the console script, twice in a row."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo import DEMO_ROWS

PGSEAL = Path(sys.executable).parent / "pgseal"


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    # The embedded server runs as an unprivileged user when tests run as
    # root, so the folder must be reachable by others.
    parent = Path(tempfile.mkdtemp(prefix="pgseal-demo-test-"))
    parent.chmod(0o755)
    yield parent / "demo"
    shutil.rmtree(parent, ignore_errors=True)


def _run_demo(folder: Path) -> str:
    result = subprocess.run(
        [str(PGSEAL), "demo", "--dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_demo_runs_twice(demo_dir: Path) -> None:
    for _ in range(2):
        output = _run_demo(demo_dir)
        seen, stored = output.split("what the table holds", 1)
        for _, access_token, _ in DEMO_ROWS:
            assert access_token in seen
            assert access_token not in stored
        assert stored.count("pgs:") == 5
        assert "stopped PostgreSQL" in output
