"""Targets, the Markdown table and the plots of one benchmark run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pgbench import MODES

log = logging.getLogger(__name__)

KIB = 1024


@dataclass(frozen=True, slots=True)
class Target:
    """A target figure: the measured value, the bound, and whether it holds."""

    name: str
    value: float | None
    bound: str
    met: bool | None
    """None when the figure was not measured."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "bound": self.bound,
            "met": self.met,
        }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _at_least(name: str, value: float | None, bound: float, unit: str = "x") -> Target:
    met = None if value is None else value >= bound
    return Target(name, value, f">= {bound:g}{unit}", met)


def _at_most(name: str, value: float | None, bound: float, unit: str) -> Target:
    met = None if value is None else value <= bound
    return Target(name, value, f"<= {bound:g} {unit}", met)


def _tps(tree: dict[str, Any], mode: str, target: str, clients: int) -> float | None:
    figure = tree.get(mode, {}).get(target, {}).get(str(clients))
    if figure is None or figure["tps"] is None:
        return None
    return float(figure["tps"])


def _errors(results: dict[str, Any]) -> Iterator[str]:
    """List every failed pgbench run, by workload, mode, target and clients."""
    for workload in ("select_only", "tokens", "lookup"):
        for mode, targets in results[workload].items():
            if mode not in MODES:
                continue
            for target, by_clients in targets.items():
                for clients, figure in by_clients.items():
                    for error in figure.get("errors", []):
                        first_lines = " ".join(error.splitlines()[:3])
                        yield f"- {workload} {mode} {target} c={clients}: {first_lines}"


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Check every target against the figures of the same run."""
    return [
        *_pass_through_targets(results),
        *_encrypted_targets(results),
        *_value_targets(results["value_path"]),
        *_memory_targets(results["memory"]),
        *_key_call_targets(results["key_calls"]),
    ]


def _pass_through_targets(results: dict[str, Any]) -> Iterator[Target]:
    tree = results["select_only"]
    for mode in MODES:
        for clients in (8, 32):
            pgseal = _tps(tree, mode, "pgseal", clients)
            bouncer = _tps(tree, mode, "pgbouncer", clients)
            yield _at_least(
                f"select-only {mode} c={clients}: pgseal / PgBouncer",
                _ratio(pgseal, bouncer),
                1.0,
            )


def _encrypted_targets(results: dict[str, Any]) -> Iterator[Target]:
    for workload in ("tokens", "lookup"):
        tree = results[workload]
        for mode in ("extended", "prepared"):
            for clients in results["config"]["encrypted_clients"]:
                ruled = _tps(tree, mode, "pgseal", clients)
                plain = _tps(tree, mode, "pgseal-no-rules", clients)
                yield _at_least(
                    f"{workload} {mode} c={clients}: rules / no rules",
                    _ratio(ruled, plain),
                    0.8,
                )


def _value_targets(values: dict[str, Any]) -> Iterator[Target]:
    pgseal, nacl = values["pgseal"], values["pynacl"]
    floor_seal = nacl["encrypt_fresh_nonce_per_s"]
    floor_open = nacl["decrypt_per_s"]
    for name, floor in (("seal", floor_seal), ("open", floor_open)):
        for storage in ("text", "bytea"):
            yield _at_least(
                f"{name} {storage}: pgseal / bare PyNaCl",
                _ratio(pgseal[f"{name}_{storage}_per_s"], floor),
                0.5,
            )

    esdk = values["aws_esdk"]
    for suite in ("default_signed", "unsigned"):
        rate = esdk[suite]["encrypt_per_s"] if esdk.get("measured") else None
        yield _at_least(
            f"seal text: pgseal / AWS ESDK ({suite})",
            _ratio(pgseal["seal_text_per_s"], rate),
            50,
        )
    yield _at_most("overhead per value, bytea", pgseal["overhead_bytes_bytea"], 60, "B")
    yield _at_most("overhead per value, text", pgseal["overhead_bytes_text"], 100, "B")


def _memory_targets(memory: dict[str, Any]) -> Iterator[Target]:
    idle = memory["idle"]
    stream = memory["stream"]
    yield _at_most("RSS per idle connection", idle["per_connection_kib"], 50, "KiB")
    yield Target(
        f"RSS growth streaming {stream['rows']:,} rows",
        stream["growth_kib"] / KIB,
        "< 32 MiB",
        stream["growth_kib"] < 32 * KIB,
    )


def _key_call_targets(calls: dict[str, Any]) -> Iterator[Target]:
    keys = calls["data_keys_created"]
    for index, replica in enumerate(calls["replicas"], start=1):
        count = replica.get("kms_requests", replica["wrap"] + replica["unwrap"])
        yield Target(
            f"keyring calls, replica {index}, {replica['values_sealed']:,} values",
            float(count),
            f"== {keys} data keys",
            count == keys,
        )


def _cell(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _tps_rows(tree: dict[str, Any], clients: list[int]) -> Iterator[str]:
    targets = sorted({t for mode in MODES for t in tree.get(mode, {})})
    yield "| mode | clients | " + " | ".join(targets) + " |"
    yield "| --- | ---: |" + " ---: |" * len(targets)
    for mode in MODES:
        for count in clients:
            cells = [_cell(_tps(tree, mode, target, count)) for target in targets]
            yield f"| {mode} | {count} | " + " | ".join(cells) + " |"


def _cpu_rows(tree: dict[str, Any], clients: list[int]) -> Iterator[str]:
    targets = [
        t
        for t in ("pgbouncer", "pgseal", "pgseal-no-rules")
        if t in tree.get("simple", {})
    ]
    yield "| mode | clients | " + " | ".join(targets) + " |"
    yield "| --- | ---: |" + " ---: |" * len(targets)
    for mode in MODES:
        for count in clients:
            cells = []
            for target in targets:
                figure = tree.get(mode, {}).get(target, {}).get(str(count), {})
                cells.append(_cell(figure.get("proxy_cpu_us_per_tx"), 1))
            yield f"| {mode} | {count} | " + " | ".join(cells) + " |"


def render_markdown(results: dict[str, Any], targets: list[Target]) -> str:
    """Render every figure of a run as Markdown tables."""
    config = results["config"]
    lines = ["### pgbench -S (select-only), TPS, median", ""]
    lines += _tps_rows(results["select_only"], config["clients"])
    lines += ["", "### Proxy CPU per select-only transaction, µs, median", ""]
    lines += _cpu_rows(results["select_only"], config["clients"])
    for workload, title in (
        ("tokens", "insert two encrypted tokens, select them by id"),
        ("lookup", "select by a deterministic encrypted column"),
    ):
        lines += ["", f"### Encrypted workload: {title}, TPS, median", ""]
        lines += _tps_rows(results[workload], config["encrypted_clients"])
    errors = list(_errors(results))
    if errors:
        lines += ["", "### Failed pgbench runs (each was tried once more)", ""]
        lines += errors
    lines += ["", *_value_lines(results["value_path"])]
    lines += ["", *_memory_lines(results["memory"])]
    lines += ["", *_key_call_lines(results["key_calls"])]
    lines += ["", "### Targets", "", "| target | measured | bound | met |"]
    lines += ["| --- | ---: | --- | --- |"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[target.met]
        lines.append(
            f"| {target.name} | {_cell(target.value, 2)} | {target.bound} | {met} |"
        )
    return "\n".join(lines) + "\n"


def _value_lines(values: dict[str, Any]) -> Iterator[str]:
    pgseal, nacl, pgcrypto = values["pgseal"], values["pynacl"], values["pgcrypto"]
    esdk = values["aws_esdk"]
    yield f"### Value path, {values['value_bytes']}-byte values"
    yield ""
    yield "| implementation | operation | per second | stored bytes |"
    yield "| --- | --- | ---: | ---: |"
    yield f"| pgseal | seal, text column (armoured) | {_cell(pgseal['seal_text_per_s'])} | {pgseal['stored_bytes_text']} |"
    yield f"| pgseal | seal, bytea column (binary) | {_cell(pgseal['seal_bytea_per_s'])} | {pgseal['stored_bytes_bytea']} |"
    yield f"| pgseal | seal, deterministic text column | {_cell(pgseal['seal_deterministic_text_per_s'])} | |"
    yield f"| pgseal | open, text column | {_cell(pgseal['open_text_per_s'])} | |"
    yield f"| pgseal | open, bytea column | {_cell(pgseal['open_bytea_per_s'])} | |"
    yield f"| pgseal | `ValueCipher.seal` alone, no planner or armour | {_cell(pgseal['crypto_seal_only_per_s'])} | |"
    yield f"| PyNaCl | encrypt, fresh nonce from os.urandom | {_cell(nacl['encrypt_fresh_nonce_per_s'])} | {nacl['stored_bytes']} |"
    yield f"| PyNaCl | encrypt, fixed nonce | {_cell(nacl['encrypt_fixed_nonce_per_s'])} | |"
    yield f"| PyNaCl | decrypt | {_cell(nacl['decrypt_per_s'])} | |"
    yield f"| pgcrypto | pgp_sym_encrypt in the server | {_cell(pgcrypto['encrypt_per_s'])} | {pgcrypto['stored_bytes']} |"
    if esdk.get("measured"):
        for suite in ("default_signed", "unsigned"):
            yield f"| AWS ESDK {esdk['version']} | encrypt, {suite} suite, caching CMM | {_cell(esdk[suite]['encrypt_per_s'])} | {esdk[suite]['stored_bytes']} |"
    else:
        yield f"| AWS ESDK | not measured: {esdk['reason']} | | |"


def _memory_lines(memory: dict[str, Any]) -> Iterator[str]:
    idle, stream = memory["idle"], memory["stream"]
    yield "### pgseal memory (VmRSS)"
    yield ""
    yield "| measurement | before | after or peak | per connection or growth |"
    yield "| --- | ---: | ---: | ---: |"
    yield (
        f"| {idle['connections']:,} idle connections | {idle['rss_before_kib']:,} KiB "
        f"| {idle['rss_after_kib']:,} KiB | {idle['per_connection_kib']:.1f} KiB |"
    )
    yield (
        f"| streaming {stream['rows']:,} rows | {stream['rss_before_kib']:,} KiB "
        f"| {stream['rss_peak_kib']:,} KiB | {stream['growth_kib'] / KIB:.1f} MiB |"
    )
    yield ""
    yield (
        f"Rows per second through pgseal (one encrypted column opened per row): "
        f"{stream['proxy_rows_per_s']:,.0f}; directly: {stream['direct_rows_per_s']:,.0f}."
    )


def _key_call_lines(calls: dict[str, Any]) -> Iterator[str]:
    yield f"### Keyring calls, keyring {calls['keyring']}"
    yield ""
    yield "| replica | values sealed | wrap | unwrap | KMS requests | data keys |"
    yield "| --- | ---: | ---: | ---: | ---: | ---: |"
    for index, replica in enumerate(calls["replicas"], start=1):
        requests = replica.get("kms_requests", "n/a")
        yield (
            f"| {index} | {replica['values_sealed']:,} | {replica['wrap']} "
            f"| {replica['unwrap']} | {requests} | {calls['data_keys_created']} |"
        )


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """Draw TPS against clients per mode, and the encrypted workloads; return paths.

    Returns no paths, with a warning, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no plots were drawn")
        return []

    paths = [folder / "select-only.png", folder / "encrypted.png"]
    _plot_select_only(plt, results, paths[0])
    _plot_encrypted(plt, results, paths[1])
    return paths


def _plot_select_only(plt: Any, results: dict[str, Any], path: Path) -> None:
    tree = results["select_only"]
    clients = results["config"]["clients"]
    figure, axes = plt.subplots(1, len(MODES), figsize=(13, 4), sharey=True)
    for axis, mode in zip(axes, MODES):
        for target in sorted(tree.get(mode, {})):
            tps = [_tps(tree, mode, target, c) or float("nan") for c in clients]
            axis.plot(clients, tps, marker="o", label=target)
        axis.set_title(f"pgbench -S, {mode}")
        axis.set_xscale("log", base=2)
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("clients")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("transactions per second (median)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_encrypted(plt: Any, results: dict[str, Any], path: Path) -> None:
    clients = results["config"]["encrypted_clients"][-1]
    labels, ruled, plain = [], [], []
    for workload in ("tokens", "lookup"):
        for mode in MODES:
            labels.append(f"{workload}\n{mode}")
            ruled.append(_tps(results[workload], mode, "pgseal", clients) or 0.0)
            plain.append(
                _tps(results[workload], mode, "pgseal-no-rules", clients) or 0.0
            )
    figure, axis = plt.subplots(figsize=(10, 4))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], plain, width=0.4, label="pgseal, no rules")
    axis.bar([p + 0.2 for p in positions], ruled, width=0.4, label="pgseal, rules")
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel(f"transactions per second, {clients} clients (median)")
    axis.set_title("Encrypted workloads through pgseal")
    axis.legend()
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
