"""Profiles of the pgseal process under pgbench load, and of the value path.

Each scenario runs pgbench against a proxy while `py-spy record` samples
that proxy's process. The raw output (one line per distinct stack, with its
sample count) is kept next to the results, and a summary lists the functions
with the most samples on top of the stack (self) and anywhere in it (total).

py-spy samples wall-clock time, so a proxy that is ready to run but waits
for one of 2 shared cores shows up inside whichever call it waits in. In
trials on the project's 2-core machine, 64 % of plain samples landed in the
socket write, while in a like run /proc showed 82 % of its CPU time in
user space. `--gil` keeps only the samples in which the proxy held the GIL,
which is the time it ran Python code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings

from bench import valuepath
from bench.pgbench import run_pgbench
from bench.services import Stack
from bench.workloads import Workloads
from proxy.crypto.values import armour, dearmour, seal
from proxy.wire.messages import TEXT_FORMAT

log = logging.getLogger(__name__)

DURATION_S = 8
RECORD_DELAY_S = 1.5
RECORD_S = 5
SAMPLE_RATE_HZ = 200
TOP_FUNCTIONS = 15
VALUE_PATH_CALLS = 20_000
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Scenario:
    """A pgbench workload to profile, and the proxy it goes through."""

    name: str
    proxy: str
    mode: str
    workload: str


SCENARIOS = (
    Scenario("select-only-extended-rules", "pgseal", "extended", "select-only"),
    Scenario(
        "select-only-extended-no-rules", "pgseal-no-rules", "extended", "select-only"
    ),
    Scenario("tokens-prepared-rules", "pgseal", "prepared", "tokens"),
    Scenario("tokens-simple-rules", "pgseal", "simple", "tokens"),
)
CLIENTS = 8


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found; install it with: pip install py-spy")
    return found


def summarize(raw: str) -> dict[str, Any]:
    """Count self and total samples per function in py-spy's raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    return {
        "samples": samples,
        "self": _shares(own, samples),
        "total": _shares(total, samples),
    }


def _function(frame: str) -> str:
    # A frame reads "name (path/to/file.py:123)"; the line number is dropped
    # so that one function's samples add up.
    name, _, location = frame.partition(" (")
    return f"{name} ({_short_path(location.rsplit(':', 1)[0])})"


def _short_path(path: str) -> str:
    """Drop the folders before a package or standard library path."""
    for marker in ("site-packages/", "/lib/python3.", str(PROJECT_ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[-1]
    return path


def _shares(counter: Counter[str], samples: int) -> list[list[Any]]:
    return [
        [name, round(100.0 * count / samples, 1)]
        for name, count in counter.most_common(TOP_FUNCTIONS)
    ]


def profile_scenario(
    stack: Stack, workloads: Workloads, scenario: Scenario, folder: Path
) -> dict[str, Any]:
    """Run one scenario under py-spy; return its summary and TPS."""
    service = stack.pgseal if scenario.proxy == "pgseal" else stack.pgseal_no_rules
    job = workloads.job(
        scenario.workload, scenario.mode, scenario.proxy, CLIENTS, DURATION_S
    )
    raw_path = folder / f"profile-{scenario.name}.txt"
    command = [
        _py_spy(), "record",
        "--pid", str(service.pid),
        "--duration", str(RECORD_S),
        "--rate", str(SAMPLE_RATE_HZ),
        "--format", "raw",
        "--nonblocking",
        "--gil",
        "--output", str(raw_path),
    ]  # fmt: skip

    # Recording starts once the clients have connected, so the profile shows
    # the transactions, not the SCRAM logins.
    with ThreadPoolExecutor(max_workers=1) as executor:
        running = executor.submit(run_pgbench, job, stack.client_env(), service.pid)
        time.sleep(RECORD_DELAY_S)
        spy = subprocess.run(
            command, capture_output=True, timeout=RECORD_S + 30, check=False
        )
        run = running.result()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr.decode(errors='replace')}")

    summary = summarize(raw_path.read_text(encoding="utf-8"))
    summary["tps"] = run.tps
    summary["raw"] = raw_path.name
    log.info(
        "profiled %s: %.0f tps, %d samples", scenario.name, run.tps, summary["samples"]
    )
    return summary


def profile_value_path(stack: Stack, count: int = VALUE_PATH_CALLS) -> dict[str, Any]:
    """Time each step of sealing and opening a text value on its own.

    A deterministic profiler adds a fixed cost to every call, which would
    inflate the many small calls of this path, so each step is timed in a
    loop of its own instead. Figures are CPU microseconds per call.
    """
    fixture = asyncio.run(valuepath.load_planner(stack))
    planner, view, column = fixture.planner, fixture.view, fixture.text
    fields = fixture.candidates(column)
    key = fixture.keys[column.name]
    store_id = view.store_id
    value = b"v" * valuepath.VALUE_SIZE
    blob = seal(key, value, store_id=store_id, context=column.key_name)
    armoured = armour(blob)
    encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
    nonce = os.urandom(valuepath.NONCE_SIZE)
    sealer = view.sealer(column)
    opener = view.opener(blob, column.key_name)

    steps: dict[str, Callable[[], object]] = {
        "seal_param, text column": lambda: planner.seal_param(
            column, value, TEXT_FORMAT
        ),
        "  KeyView.sealer (memoized cipher)": lambda: view.sealer(column),
        "  ValueCipher.seal": lambda: sealer.seal(value),
        "    PyNaCl encrypt alone": lambda: encrypt(value, None, nonce, key.material),
        "  values.armour": lambda: armour(blob),
        "open_value, text column": lambda: planner.open_value(
            fields, armoured, TEXT_FORMAT
        ),
        "  values.dearmour": lambda: dearmour(armoured),
        "  KeyView.opener (memoized cipher)": lambda: view.opener(blob, column.key_name),
        "  ValueCipher.open": lambda: opener.open(blob),
    }
    per_second = valuepath.rates(steps, count)
    return {
        "calls": count,
        "cpu_us_per_call": {name: 1e6 / rate for name, rate in per_second.items()},
    }


def profile_all(stack: Stack, workloads: Workloads, folder: Path) -> dict[str, Any]:
    """Profile every scenario and the value path; return the summaries."""
    folder.mkdir(parents=True, exist_ok=True)
    summaries = {
        scenario.name: profile_scenario(stack, workloads, scenario, folder)
        for scenario in SCENARIOS
    }
    summaries["value-path"] = profile_value_path(stack)
    return summaries
