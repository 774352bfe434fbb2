"""The benchmark suite runs end to end and produces every figure.

The values are not checked, because they depend on the machine. The run is
a reduced quick run, with one client count and smaller counts, which took 50
to 90 s on the project's 2-core machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import run, write_results
from bench.config import QUICK
from bench.pgbench import MODES

pytestmark = pytest.mark.slow

CLIENTS = (8,)
SELECT_TARGETS = ("direct", "pgbouncer", "pgseal", "pgseal-no-rules")
ENCRYPTED_TARGETS = ("pgseal", "pgseal-no-rules")

REDUCED = QUICK.with_overrides(
    clients=CLIENTS,
    encrypted_clients=(8,),
    values=500,
    pgcrypto_values=200,
    esdk_values=10,
    idle_connections=50,
    stream_rows=2_000,
    sealed_values=2_000,
    plots=False,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed (Debian: postgresql-client)")
    output = tmp_path_factory.mktemp("bench")
    measured = run(REDUCED, output)
    write_results(measured, output, plots=False)
    loaded: dict[str, Any] = json.loads((output / "latest.json").read_text())
    loaded["_output"] = str(output)
    return loaded


def _is_figure(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", SELECT_TARGETS)
def test_select_only_tps_per_target(
    results: dict[str, Any], mode: str, target: str
) -> None:
    for clients in CLIENTS:
        assert _is_figure(results["select_only"][mode][target][str(clients)]["tps"])


@pytest.mark.parametrize("workload", ["tokens", "lookup"])
@pytest.mark.parametrize("mode", MODES)
def test_encrypted_tps_per_mode(
    results: dict[str, Any], workload: str, mode: str
) -> None:
    for target in ENCRYPTED_TARGETS:
        assert _is_figure(results[workload][mode][target]["8"]["tps"])


def test_proxy_cpu_recorded(results: dict[str, Any]) -> None:
    figure = results["select_only"]["extended"]["pgseal"]["8"]
    assert _is_figure(figure["proxy_cpu_us_per_tx"])


def test_tokens_stored_as_ciphertext(results: dict[str, Any]) -> None:
    stored = results["tokens"]["stored_form"]
    assert stored["stored_is_ciphertext"] is True
    assert stored["proxy_returns_plaintext"] is True


@pytest.mark.parametrize(
    "name",
    [
        "seal_text_per_s",
        "seal_bytea_per_s",
        "seal_deterministic_text_per_s",
        "open_text_per_s",
        "open_bytea_per_s",
        "crypto_seal_only_per_s",
        "overhead_bytes_bytea",
        "overhead_bytes_text",
    ],
)
def test_value_path_pgseal_figure(results: dict[str, Any], name: str) -> None:
    assert _is_figure(results["value_path"]["pgseal"][name])


def test_value_path_comparisons(results: dict[str, Any]) -> None:
    values = results["value_path"]
    assert _is_figure(values["pynacl"]["encrypt_fresh_nonce_per_s"])
    assert _is_figure(values["pynacl"]["decrypt_per_s"])
    assert _is_figure(values["pgcrypto"]["encrypt_per_s"])
    assert _is_figure(values["pgcrypto"]["stored_bytes"])


def test_value_path_esdk_measured_or_explained(results: dict[str, Any]) -> None:
    esdk = results["value_path"]["aws_esdk"]
    if esdk["measured"]:
        assert _is_figure(esdk["default_signed"]["encrypt_per_s"])
        assert _is_figure(esdk["unsigned"]["stored_bytes"])
    else:
        assert esdk["reason"]


def test_memory_figures(results: dict[str, Any]) -> None:
    idle, stream = results["memory"]["idle"], results["memory"]["stream"]
    assert idle["connections"] == REDUCED.idle_connections
    assert isinstance(idle["per_connection_kib"], (int, float))
    assert stream["rows"] == REDUCED.stream_rows
    assert isinstance(stream["growth_kib"], int)
    assert _is_figure(stream["proxy_rows_per_s"])


def test_key_calls_counted(results: dict[str, Any]) -> None:
    calls = results["key_calls"]
    assert calls["data_keys_created"] >= 1
    assert len(calls["replicas"]) == 2
    for replica in calls["replicas"]:
        assert replica["wrap"] + replica["unwrap"] >= 1


def test_targets_evaluated(results: dict[str, Any]) -> None:
    names = [target["name"] for target in results["targets"]]
    assert any(name.startswith("select-only extended c=8") for name in names)
    assert any(name.startswith("RSS per idle connection") for name in names)


def test_markdown_written(results: dict[str, Any]) -> None:
    markdown = (Path(results["_output"]) / "latest.md").read_text()
    assert "### Targets" in markdown
