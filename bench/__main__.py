"""`python -m bench`: run the benchmark suite and write its results.

The full run took 18 minutes on the project's 2-core machine, and `--quick`,
for CI, about 3. Both start their own PostgreSQL 15, PgBouncer and pgseal
on 127.0.0.1 and stop them at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import keycalls, memory, report, valuepath
from bench.config import FULL, QUICK, BenchConfig
from bench.services import SERVER_SETTINGS, ensure_pgbouncer, running_stack
from bench.workloads import Workloads

log = logging.getLogger("bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run(config: BenchConfig, output: Path, profile: bool = False) -> dict[str, Any]:
    """Start the stack, take every measurement of `config`, and return them."""
    started = time.monotonic()
    load: dict[str, list[str]] = {}
    results: dict[str, Any] = {"config": asdict(config), "load_average": load}
    with running_stack(uvloop=config.uvloop) as stack:
        results["machine"] = machine_info(stack.cluster.bin_dir)
        workloads = Workloads(stack, config)

        _step("select_only", load)
        results["select_only"] = workloads.pass_through()
        _step("tokens", load)
        results["tokens"] = workloads.encrypted()
        _step("lookup", load)
        results["lookup"] = workloads.lookup()
        _step("value_path", load)
        results["value_path"] = valuepath.measure(
            stack, config.values, config.pgcrypto_values, config.esdk_values
        )
        _step("memory", load)
        results["memory"] = {
            "idle": memory.measure_idle(stack, config.idle_connections),
            "stream": memory.measure_stream(stack, config.stream_rows),
        }
        _step("key_calls", load)
        results["key_calls"] = keycalls.measure(stack, config.sealed_values)
        if profile:
            from bench import profile as profiling

            _step("profiles", load)
            results["profiles"] = profiling.profile_all(stack, workloads, output)
        _step("end", load)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def _step(name: str, load: dict[str, list[str]]) -> None:
    """Log the start of a step and note the machine's load average at it.

    The load average shows whether other processes shared the 2 cores.
    """
    load[name] = Path("/proc/loadavg").read_text(encoding="ascii").split(" ", 3)[:3]
    log.info("measuring: %s (load average %s)", name, " ".join(load[name]))


def machine_info(bin_dir: Path) -> dict[str, Any]:
    """Describe the machine and the software versions of this run."""
    return {
        "cpus": _command(["nproc"]),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_mem_total_kib() / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": _command([str(bin_dir / "postgres"), "--version"]),
        "pgbench": _command(["pgbench", "--version"]),
        "pgbouncer": _command([ensure_pgbouncer(), "--version"]).splitlines()[0],
        "server_settings": SERVER_SETTINGS,
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
    }


def _command(command: list[str]) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout.strip()


def _cpu_model() -> str:
    for line in _command(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def write_results(results: dict[str, Any], folder: Path, plots: bool) -> str:
    """Write latest.json, latest.md and the plots into folder; return the Markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = report.evaluate(results)
    results["targets"] = [target.as_dict() for target in targets]
    markdown = report.render_markdown(results, targets)
    (folder / "latest.json").write_text(
        json.dumps(results, indent=2) + "\n", encoding="utf-8"
    )
    (folder / "latest.md").write_text(markdown, encoding="utf-8")
    if plots:
        for path in report.plot(results, folder):
            log.info("wrote %s", path)
    return markdown


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pgseal against PostgreSQL and PgBouncer on this machine.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs and small counts, for CI"
    )
    parser.add_argument("--duration", type=int, help="seconds of each pgbench run")
    parser.add_argument(
        "--repeats", type=int, help="runs of each pgbench configuration"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR,
        help=f"folder for latest.json, latest.md and the plots (default: {RESULTS_DIR})",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run pgseal on uvloop's event loop (pip install uvloop)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record py-spy profiles of the proxy under load",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = (QUICK if args.quick else FULL).with_overrides(
        duration_s=args.duration,
        repeats=args.repeats,
        plots=False if args.no_plots else None,
        uvloop=args.uvloop or None,
    )
    results = run(config, args.output, profile=args.profile)
    markdown = write_results(results, args.output, plots=config.plots)
    print(markdown)
    print(f"results in {args.output}, {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
