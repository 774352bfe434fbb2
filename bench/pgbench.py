"""Run pgbench against one target and read its figures.

Besides pgbench's own TPS and latency, each run records the CPU time that
the proxy process (pgseal or PgBouncer) spent during it, read from
/proc/PID/stat, so a figure can be split into the proxy's share and the rest.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.services import DATABASE, HOST, SUPERUSER

MODES = ("simple", "extended", "prepared")

# pgbench divides clients among threads; with -j above -c it uses one thread
# per client.
THREADS = 2

# Headroom over the run's own duration before a pgbench run counts as hung.
TIMEOUT_MARGIN_S = 60.0

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


class PgbenchError(RuntimeError):
    """pgbench exited with an error or printed no TPS figure."""


@dataclass(frozen=True, slots=True)
class PgbenchRun:
    """One pgbench run's figures."""

    tps: float
    latency_ms: float
    transactions: int
    failed: int
    proxy_cpu_s: float | None
    """CPU seconds (user + system) of the proxy process during the run."""

    @property
    def proxy_cpu_us_per_tx(self) -> float | None:
        if self.proxy_cpu_s is None or not self.transactions:
            return None
        return self.proxy_cpu_s / self.transactions * 1e6


@dataclass(frozen=True, slots=True)
class PgbenchJob:
    """A pgbench invocation: target port, protocol mode, clients and script."""

    port: int
    mode: str
    clients: int
    duration_s: int
    """pgbench's -T, which includes the time the clients take to connect."""
    script: Path | None = None
    """A custom script file; None runs the built-in select-only script (-S)."""
    variables: tuple[tuple[str, str], ...] = ()
    """Script variables, passed as -D NAME=VALUE."""

    def command(self) -> list[str]:
        workload = ["-f", str(self.script)] if self.script else ["-S"]
        for name, value in self.variables:
            workload += ["-D", f"{name}={value}"]
        return [
            "pgbench", "-n", *workload,
            "-M", self.mode,
            "-c", str(self.clients),
            "-j", str(min(THREADS, self.clients)),
            "-T", str(self.duration_s),
            "-h", HOST, "-p", str(self.port), "-U", SUPERUSER,
            DATABASE,
        ]  # fmt: skip


def run_pgbench(
    job: PgbenchJob, env: dict[str, str], proxy_pid: int | None
) -> PgbenchRun:
    """Run one pgbench job and return its figures.

    Raises PgbenchError if pgbench fails or a transaction failed, because a
    TPS figure with failures in it measures the errors, not the target.
    """
    cpu_before = process_cpu_seconds(proxy_pid) if proxy_pid else None
    result = subprocess.run(
        job.command(),
        capture_output=True,
        text=True,
        env=env,
        timeout=job.duration_s + TIMEOUT_MARGIN_S,
        check=False,
    )
    cpu_after = process_cpu_seconds(proxy_pid) if proxy_pid else None
    if result.returncode != 0:
        raise PgbenchError(
            f"pgbench exited {result.returncode}: "
            f"{_tail(result.stderr or result.stdout)}"
        )

    run = _parse(result.stdout)
    if cpu_before is not None and cpu_after is not None:
        run = PgbenchRun(
            run.tps,
            run.latency_ms,
            run.transactions,
            run.failed,
            cpu_after - cpu_before,
        )
    if run.failed:
        raise PgbenchError(f"{run.failed} transactions failed")
    return run


def _parse(stdout: str) -> PgbenchRun:
    tps = _TPS.search(stdout)
    if tps is None:
        raise PgbenchError(f"no TPS figure in pgbench output: {_tail(stdout)}")
    latency = _LATENCY.search(stdout)
    failed = _FAILED.search(stdout)
    done = _DONE.search(stdout)
    return PgbenchRun(
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)) if latency else float("nan"),
        transactions=int(done.group(1)) if done else 0,
        failed=int(failed.group(1)) if failed else 0,
        proxy_cpu_s=None,
    )


def process_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name in field 2 may contain spaces, so split after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> int:
    """Return a process's resident set size in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS line in /proc/{pid}/status")


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_quiet(seconds: float = 0.2) -> None:
    """Pause between runs, so that one run's closing connections do not
    overlap the next run's start."""
    time.sleep(seconds)
