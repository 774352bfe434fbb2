"""Sizes of a benchmark run: the full run and the quick one for CI."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """How long and how large each measurement of one run is."""

    name: str
    duration_s: int
    """Seconds of each pgbench run."""
    repeats: int
    """Runs of each pgbench configuration; the report gives their median."""
    clients: tuple[int, ...] = (1, 8, 32)
    """pgbench client counts of the select-only runs."""
    encrypted_clients: tuple[int, ...] = (8,)
    """pgbench client counts of the encrypted token runs."""
    values: int = 30_000
    """64-byte values sealed and opened per value-path measurement."""
    pgcrypto_values: int = 5_000
    """Values that pgp_sym_encrypt encrypts per measurement."""
    esdk_values: int = 2_000
    """Values that the AWS Encryption SDK encrypts per measurement."""
    idle_connections: int = 1_000
    """Client connections held open through pgseal for the memory figure."""
    stream_rows: int = 1_000_000
    """Rows with an encrypted column streamed through pgseal."""
    sealed_values: int = 1_000_000
    """Values sealed by the first replica while counting keyring (KMS) calls;
    the second replica seals a tenth as many."""
    plots: bool = True
    uvloop: bool = False
    """Run pgseal on uvloop's event loop instead of asyncio's default one, to
    measure how much of the proxy's cost is the event loop."""

    def with_overrides(self, **changes: object) -> BenchConfig:
        """Return a copy with the given fields changed; None leaves one as is."""
        kept = {name: value for name, value in changes.items() if value is not None}
        return replace(self, **kept)  # type: ignore[arg-type]


# On the project's 2-core machine, shared with other work, the full run took
# 18 minutes. Its 144 pgbench runs of 4 s took 11 of them, and streaming and
# sealing a million values most of the rest.
FULL = BenchConfig(name="full", duration_s=4, repeats=3)

# About 3 minutes: 48 pgbench runs of 2 s, and small counts elsewhere.
# pgbench's -T includes connecting, which takes up to a second for 32 SCRAM
# logins here, so 1 s runs can end before the first transaction. With 250
# idle connections the RSS delta was within malloc noise (once negative), so
# the quick run opens the full 1,000.
QUICK = BenchConfig(
    name="quick",
    duration_s=2,
    repeats=1,
    values=5_000,
    pgcrypto_values=200,
    esdk_values=100,
    idle_connections=1_000,
    stream_rows=20_000,
    sealed_values=20_000,
)
