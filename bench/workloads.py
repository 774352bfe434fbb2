"""The pgbench workloads: select-only pass-through and two encrypted ones.

The encrypted workloads insert two tokens and read them back by id, and look
a row up by a deterministic encrypted column.

Repeats are interleaved: every configuration runs once before any runs a
second time, so a slow spell of the machine lands on all targets alike
instead of on whichever ran during it.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench.config import BenchConfig
from bench.pgbench import (
    MODES,
    PgbenchError,
    PgbenchJob,
    PgbenchRun,
    run_pgbench,
    wait_quiet,
)
from bench.services import LOOKUP_PLAIN_TABLE, LOOKUP_TABLE, TOKEN_TABLE, Stack

log = logging.getLogger(__name__)

TOKEN_SIZE = 64
_TOKEN_ALPHABET = string.ascii_letters + string.digits

# pgbench substitutes :name as raw text in simple mode and as a parameter in
# extended and prepared modes, so only the simple script quotes the tokens.
# The table is emptied before each run. For 100,000 rows in a run, two equal
# random ids have a chance of about 1 in 10^9, and they would fail the run
# with a failed transaction, not skew it.
_INSERT_SELECT = """\
\\set id random(1, 9000000000000000000)
INSERT INTO {table} (id, access_token, refresh_token) VALUES (:id, {tok1}, {tok2});
SELECT access_token, refresh_token FROM {table} WHERE id = :id;
"""

_LOOKUP = """\
SELECT id, email FROM {table} WHERE email = {token};
"""

# Rows in the lookup tables. The looked-up value is one of them, so each
# lookup returns one row through the index on the column.
LOOKUP_ROWS = 10_000

ENCRYPTED_TARGETS = ("pgseal", "pgseal-no-rules")

RETRIES = 1
RETRY_PAUSE_S = 5.0


@dataclass(frozen=True, slots=True)
class Case:
    """One configuration that a workload runs `repeats` times."""

    workload: str
    mode: str
    target: str
    clients: int


@dataclass
class CaseResult:
    """The runs of one case, and the error of each run that failed."""

    runs: list[PgbenchRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Return the median TPS, latency and proxy CPU of the runs that passed."""
        runs = self.runs
        cpu = [r.proxy_cpu_us_per_tx for r in runs if r.proxy_cpu_us_per_tx is not None]
        return {
            "tps": statistics.median(r.tps for r in runs) if runs else None,
            "tps_runs": [round(r.tps, 1) for r in runs],
            "latency_ms": statistics.median(r.latency_ms for r in runs)
            if runs
            else None,
            "proxy_cpu_us_per_tx": statistics.median(cpu) if cpu else None,
            "errors": self.errors,
        }


def run_cases(
    cases: list[Case],
    repeats: int,
    run_one: Callable[[Case], PgbenchRun],
) -> dict[Case, CaseResult]:
    """Run every case `repeats` times, interleaved, and return the results.

    A run that fails is recorded with its error and tried once more after a
    pause, so one failure costs a case one figure, not the whole benchmark.
    """
    results: dict[Case, CaseResult] = {case: CaseResult() for case in cases}
    for repeat in range(repeats):
        for case in cases:
            result = results[case]
            for attempt in range(1 + RETRIES):
                try:
                    run = run_one(case)
                except PgbenchError as exc:
                    log.warning("%s repeat %d failed: %s", case, repeat + 1, exc)
                    result.errors.append(f"repeat {repeat + 1}: {exc}")
                    if attempt < RETRIES:
                        time.sleep(RETRY_PAUSE_S)
                    continue
                log.info(
                    "%s %s %s c=%d repeat %d: %.0f tps",
                    case.workload, case.mode, case.target, case.clients,
                    repeat + 1, run.tps,
                )  # fmt: skip
                result.runs.append(run)
                break
            wait_quiet()
    return results


def nest(results: dict[Case, CaseResult]) -> dict[str, object]:
    """Arrange case results as {mode: {target: {clients: summary}}}."""
    tree: dict[str, dict[str, dict[str, object]]] = {}
    for case, result in results.items():
        by_target = tree.setdefault(case.mode, {})
        by_clients = by_target.setdefault(case.target, {})
        by_clients[str(case.clients)] = result.summary()
    return dict(tree)


class Workloads:
    """Build and run the pgbench cases of one benchmark run."""

    def __init__(self, stack: Stack, config: BenchConfig) -> None:
        self._stack = stack
        self._config = config
        self._ports = stack.ports()
        self._pids = {
            "pgbouncer": stack.pgbouncer.pid,
            "pgseal": stack.pgseal.pid,
            "pgseal-no-rules": stack.pgseal_no_rules.pid,
        }
        self._scripts = self._write_scripts(stack.workdir)
        self._tokens = (random_token(), random_token())
        self._lookup_token = ""

    def pass_through(self) -> dict[str, object]:
        """Run pgbench -S in every mode, against every target and client count."""
        cases = [
            Case("select-only", mode, target, clients)
            for mode in MODES
            for target in self._ports
            for clients in self._config.clients
        ]
        return nest(run_cases(cases, self._config.repeats, self._run))

    def encrypted(self) -> dict[str, object]:
        """Run the insert-and-select token script with and without rules."""
        results = self._encrypted_cases("tokens")
        results["stored_form"] = self._check_stored_form()
        results["token_bytes"] = TOKEN_SIZE
        return results

    def lookup(self) -> dict[str, object]:
        """Run the select-by-deterministic-column script with and without rules.

        Without rules the same statement runs on a plaintext copy of the
        table, because the proxy then seals nothing and the ciphertext in the
        ruled table would match no row.
        """
        self._fill_lookup_tables()
        results = self._encrypted_cases("lookup")
        results["rows"] = LOOKUP_ROWS
        return results

    def _encrypted_cases(self, workload: str) -> dict[str, object]:
        cases = [
            Case(workload, mode, target, clients)
            for mode in MODES
            for target in ENCRYPTED_TARGETS
            for clients in self._config.encrypted_clients
        ]
        return nest(run_cases(cases, self._config.repeats, self._run))

    def job(
        self, workload: str, mode: str, target: str, clients: int, duration_s: int
    ) -> PgbenchJob:
        """Build the pgbench job of one case, with its script and variables."""
        variables: tuple[tuple[str, str], ...] = ()
        if workload == "tokens":
            variables = (("tok1", self._tokens[0]), ("tok2", self._tokens[1]))
        elif workload == "lookup":
            variables = (("tok", self._lookup_token),)
        return PgbenchJob(
            port=self._ports[target],
            mode=mode,
            clients=clients,
            duration_s=duration_s,
            script=self._scripts.get((workload, mode, target)),
            variables=variables,
        )

    def _run(self, case: Case) -> PgbenchRun:
        if case.workload == "tokens":
            self._truncate_tokens()
        job = self.job(
            case.workload, case.mode, case.target, case.clients, self._config.duration_s
        )
        return run_pgbench(job, self._stack.client_env(), self._pids.get(case.target))

    def _truncate_tokens(self) -> None:
        # Every run starts from an empty table, so no run pays for the
        # index that an earlier run grew.
        with psycopg.connect(self._stack.dsn(), autocommit=True) as conn:
            conn.execute(f"TRUNCATE {TOKEN_TABLE}")

    def _check_stored_form(self) -> dict[str, object]:
        """Insert one row through the rules proxy and read it back both ways."""
        token = self._tokens[0]
        row_id = 1
        proxy_dsn = self._stack.dsn(self._stack.pgseal.port)
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {TOKEN_TABLE} (id, access_token) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET access_token = excluded.access_token",
                (row_id, token),
            )
            through_proxy = _fetch_token(conn, row_id)
        with psycopg.connect(self._stack.dsn(), autocommit=True) as conn:
            stored = _fetch_token(conn, row_id)
        return {
            "stored_is_ciphertext": stored.startswith("pgs:") and token not in stored,
            "proxy_returns_plaintext": through_proxy == token,
            "stored_text_bytes": len(stored.encode("ascii")),
        }

    def _fill_lookup_tables(self) -> None:
        """Write the same rows to the ruled table, through pgseal, and to its
        plaintext copy, directly."""
        rows = [(i, random_token()) for i in range(1, LOOKUP_ROWS + 1)]
        self._lookup_token = rows[len(rows) // 2][1]
        targets = (
            (self._stack.dsn(self._stack.pgseal.port), LOOKUP_TABLE),
            (self._stack.dsn(), LOOKUP_PLAIN_TABLE),
        )
        for dsn, table in targets:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"TRUNCATE {table}")
                with conn.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} (id, email) VALUES (%s, %s)", rows
                    )

    @staticmethod
    def _write_scripts(workdir: Path) -> dict[tuple[str, str, str], Path]:
        """Write each (workload, mode, target) script that differs from -S."""
        scripts = {}
        for mode in MODES:
            quote = "'" if mode == "simple" else ""
            tokens = _INSERT_SELECT.format(
                table=TOKEN_TABLE,
                tok1=f"{quote}:tok1{quote}",
                tok2=f"{quote}:tok2{quote}",
            )
            for target in ENCRYPTED_TARGETS:
                table = LOOKUP_TABLE if target == "pgseal" else LOOKUP_PLAIN_TABLE
                lookup = _LOOKUP.format(table=table, token=f"{quote}:tok{quote}")
                for workload, text in (("tokens", tokens), ("lookup", lookup)):
                    path = workdir / f"{workload}-{mode}-{target}.sql"
                    path.write_text(text, encoding="ascii")
                    scripts[(workload, mode, target)] = path
        return scripts


def _fetch_token(conn: psycopg.Connection[tuple[object, ...]], row_id: int) -> str:
    row = conn.execute(
        f"SELECT access_token FROM {TOKEN_TABLE} WHERE id = %s", (row_id,)
    ).fetchone()
    if row is None or not isinstance(row[0], str):
        raise RuntimeError(f"row {row_id} of {TOKEN_TABLE} is missing its token")
    return row[0]


def random_token() -> str:
    """Return 64 random letters and digits: text that needs no SQL quoting."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_SIZE))
