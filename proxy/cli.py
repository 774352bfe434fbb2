"""The `pgseal` command: serve, keys (init, backup, restore), rules, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from proxy.app import Proxy, ProxySettings
from proxy.config import keyring_options, load_config
from proxy.crypto.keyring import SodiumKeyring, parse_sodium_spec, read_passphrase
from proxy.errors import ConfigError, PgsealError
from proxy.keyring_sets import set_names
from proxy.keys_admin import add_key_commands, add_reencrypt_command
from proxy.rules import load_rules
from proxy.server import DEFAULT_STARTUP_TIMEOUT, Upstream
from proxy.tls import SslMode
from proxy.wire.frames import DEFAULT_MAX_MESSAGE

if TYPE_CHECKING:
    from proxy.crypto.backup import RestoreSummary

log = logging.getLogger("pgseal")

# The smallest --max-message-size. PostgreSQL limits the messages it expects
# to be short, such as a SASL response, to 10000 bytes (PQ_SMALL_MESSAGE_LIMIT
# in src/include/libpq/libpq.h), so every session fits under this.
MIN_MAX_MESSAGE = 65536


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # The demo prints its own story, so it logs only warnings unless asked.
    level = args.log_level or ("warning" if args.run is _demo else "info")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except PgsealError as exc:
        print(f"pgseal: error: {exc}", file=sys.stderr)
        return 1
    except asyncpg.InsufficientPrivilegeError as exc:
        print(
            f"pgseal: error: the login in --upstream lacks a privilege: {exc}; "
            "README.md, section 'Privileges of the proxy's login', lists what "
            "each command needs",
            file=sys.stderr,
        )
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"pgseal: error: {_describe_server_error(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Commands name the address for the usual cases: an unreachable
        # server and a listen address in use. This catches the rest.
        print(f"pgseal: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# SQLSTATE classes of a server that refused the login itself: connection
# exception, invalid authorization specification, invalid catalog name.
_LOGIN_FAILURE_CLASSES = ("08", "28", "3D")


def _describe_server_error(exc: Exception) -> str:
    """Say whether the server refused the proxy's login or failed a statement."""
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    if not sqlstate or sqlstate[:2] in _LOGIN_FAILURE_CLASSES:
        return (
            f"the upstream server rejected the proxy's own connection: {exc}; "
            "check the login and sslmode in --upstream"
        )
    return f"the upstream server failed a statement (SQLSTATE {sqlstate}): {exc}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgseal", description="Transparent column-encryption proxy for PostgreSQL."
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info, or warning for demo)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--listen", default="127.0.0.1:6432", help="HOST:PORT to listen on")
    serve.add_argument(
        "--upstream",
        required=True,
        help="postgresql://USER:PASSWORD@HOST:PORT/DBNAME of the server; the login "
        "is the proxy's own, for its key store and catalog reads. Without a "
        "password in the URI, it comes from PGPASSWORD or the password file "
        "(PGPASSFILE, else ~/.pgpass), as in libpq",
    )
    serve.add_argument("--rules", default="rules", type=Path, help="folder of *.yaml rule files")
    _add_keyring(serve, many=True, required=False)
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML file of named keyring sets and the audit file, instead of "
        "--keyring; see the README",
    )
    serve.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        help="largest protocol message accepted from the client or the server, in "
        f"bytes (default: {DEFAULT_MAX_MESSAGE}, at least {MIN_MAX_MESSAGE}); a "
        "larger one ends that connection with a FATAL error",
    )
    serve.add_argument(
        "--startup-timeout",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT,
        help="seconds a client has from connecting to sending its startup packet, "
        f"TLS negotiation included (default: {DEFAULT_STARTUP_TIMEOUT:g})",
    )
    serve.add_argument(
        "--rules-poll-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the rules folder for changes; 0 turns the "
        "check off, and SIGHUP still reloads",
    )
    _add_tls_options(serve)
    serve.add_argument(
        "--audit-log",
        type=Path,
        help="file to append one JSON line per data key the proxy creates "
        "(mode 0600)",
    )
    serve.add_argument(
        "--max-values-per-key",
        type=int,
        help="values sealed under one randomized data key by this process "
        "before it creates a new version (default: no limit)",
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="manage keys")
    key_commands = keys.add_subparsers(required=True, metavar="KEYS_COMMAND")
    init = key_commands.add_parser("init", help="write a new sodium key pair")
    _add_keyring(init, many=False)
    init.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding a passphrase; the private key is then "
        "written encrypted, as private.key.enc",
    )
    init.set_defaults(run=_keys_init)
    add_key_commands(key_commands)
    add_reencrypt_command(commands)
    _add_backup_commands(key_commands)

    rules = commands.add_parser("rules", help="work with rule files")
    rule_commands = rules.add_subparsers(required=True, metavar="RULES_COMMAND")
    check = rule_commands.add_parser(
        "check", help="validate the rule files against the live database"
    )
    check.add_argument("--upstream", required=True, help="postgresql:// URI of the server")
    check.add_argument("--rules", default="rules", type=Path, help="folder of *.yaml rule files")
    check.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file whose keyring sets the rules' 'keyring' entries must name",
    )
    check.set_defaults(run=_rules_check)

    demo = commands.add_parser(
        "demo", help="run the proxy on an embedded PostgreSQL and show what it stores"
    )
    demo.add_argument(
        "--dir", type=Path, default=Path(".pgseal-demo"), help="folder for the demo's files"
    )
    demo.set_defaults(run=_demo)
    return parser


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM certificate chain to present to clients; with --tls-key, the "
        "proxy accepts TLS (SSLRequest and direct TLS), TLS 1.2 or newer",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="PEM private key of --tls-cert, mode 0600 (0640 if owned by root)",
    )
    parser.add_argument(
        "--upstream-sslmode",
        choices=[mode.value for mode in SslMode],
        help="TLS to the server, as libpq's sslmode (default: the URI's "
        "sslmode, else prefer); also used for the proxy's own connections",
    )
    parser.add_argument(
        "--upstream-sslrootcert",
        metavar="FILE",
        help="PEM file of the CAs that may sign the server's certificate, or "
        "'system'; makes require check the chain, as libpq does",
    )


def _add_keyring(
    parser: argparse.ArgumentParser, many: bool, required: bool = True
) -> None:
    parser.add_argument(
        "--keyring",
        required=required,
        action="append" if many else "store",
        help=(
            "keyring spec: sodium:KEYDIR[?passphrase_env=VAR], aws-kms:KEY (a "
            "KMS key id, ARN or alias/NAME) or vault-transit:KEY_NAME; give it "
            "once per keyring, and data keys are wrapped by all of them and "
            "unwrapped by the first that works, in order; required unless "
            "--config is given"
            if many
            else "keyring spec, sodium:KEYDIR[?passphrase_env=VAR]"
        ),
    )


def _serve(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"--listen must be HOST:PORT with a port from 0 to 65535, "
            f"got {args.listen!r}"
        )
    if args.max_values_per_key is not None and args.max_values_per_key < 1:
        raise ConfigError(
            f"--max-values-per-key must be at least 1, got {args.max_values_per_key}"
        )
    if args.max_message_size < MIN_MAX_MESSAGE:
        raise ConfigError(
            f"--max-message-size must be at least {MIN_MAX_MESSAGE} bytes, "
            f"got {args.max_message_size}"
        )
    if not 0 < args.startup_timeout < math.inf:
        raise ConfigError(
            "--startup-timeout must be more than 0 seconds and finite, "
            f"got {args.startup_timeout}"
        )
    keys = keyring_options(args.keyring, args.config, args.audit_log)
    settings = ProxySettings(
        listen_host=host,
        listen_port=int(port),
        upstream=Upstream.parse(
            args.upstream, args.upstream_sslmode, args.upstream_sslrootcert
        ),
        rules_dir=args.rules,
        keyrings=keys.default,
        keyring_sets=keys.named,
        max_message=args.max_message_size,
        startup_timeout=args.startup_timeout,
        rules_poll_seconds=args.rules_poll_interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        audit_log=keys.audit_file,
        max_values_per_key=args.max_values_per_key,
    )
    asyncio.run(_run_proxy(settings))
    return 0


async def _run_proxy(settings: ProxySettings) -> None:
    proxy = Proxy(settings)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.create_task(proxy.reload_rules())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    serving = asyncio.create_task(proxy.serve_forever())
    await stop.wait()
    log.info("shutting down")
    serving.cancel()
    await proxy.stop()


def _rules_check(args: argparse.Namespace) -> int:
    from proxy.rules_check import check_rules

    report = asyncio.run(check_rules(Upstream.parse(args.upstream), args.rules))
    problems = list(report.problems)
    if args.config is not None:
        problems.extend(_keyring_set_problems(args.config, args.rules))
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print(f"{_plural(len(problems), 'problem')} found in {args.rules}")
        return 1
    print(
        f"ok: {_plural(report.tables, 'table')} and "
        f"{_plural(report.columns, 'encrypted column')} checked"
    )
    return 0


def _keyring_set_problems(config: Path, rules_dir: Path) -> list[str]:
    """Check that every rule's keyring set is defined in the config file."""
    sets = load_config(config).keyring_sets
    columns = [c for table in load_rules(rules_dir).tables for c in table.columns]
    try:
        set_names(columns, sets)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _keys_init(args: argparse.Namespace) -> int:
    spec = parse_sodium_spec(args.keyring)
    variable = args.passphrase_env or spec.passphrase_env
    if args.passphrase_env and spec.passphrase_env not in (None, args.passphrase_env):
        raise ConfigError(
            f"--passphrase-env {args.passphrase_env} and the spec's "
            f"passphrase_env={spec.passphrase_env} differ: give one of them"
        )
    passphrase = read_passphrase(variable) if variable else None
    keyring = SodiumKeyring.create(spec.keydir, passphrase=passphrase)
    print(f"wrote key pair {keyring.name} to {spec.keydir}")
    return 0


def _add_backup_commands(key_commands: argparse._SubParsersAction[Any]) -> None:
    backup = key_commands.add_parser(
        "backup", help="write an encrypted key store backup and recovery shares"
    )
    backup.add_argument("--upstream", required=True, help="postgresql:// URI of the database")
    _add_keyring(backup, many=False, required=False)
    backup.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file whose one sodium keyring to back up, instead of --keyring",
    )
    backup.add_argument("--shares", type=int, required=True, help="number of share files")
    backup.add_argument(
        "--threshold", type=int, required=True, help="shares needed to recover, at least 2"
    )
    backup.add_argument("--out", type=Path, required=True, help="new folder for the files")
    backup.set_defaults(run=_keys_backup)

    restore = key_commands.add_parser(
        "restore", help="rebuild the key store and key pair from a backup"
    )
    restore.add_argument(
        "--upstream", required=True, help="postgresql:// URI of a database without keys"
    )
    restore.add_argument(
        "--from", dest="source", type=Path, required=True, help="the backup's folder"
    )
    restore.add_argument(
        "--share", type=Path, action="append", required=True, help="a share file; repeat"
    )
    restore.add_argument(
        "--keydir", type=Path, help="new folder for the sodium key pair"
    )
    restore.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file whose one sodium keyring's folder is the default --keydir",
    )
    restore.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding a passphrase for the restored private key",
    )
    restore.set_defaults(run=_keys_restore)


def _keys_backup(args: argparse.Namespace) -> int:
    from proxy.crypto.backup import backup_key_store

    keyring = parse_sodium_spec(_sodium_spec(args)).load()
    upstream = Upstream.parse(args.upstream)
    summary = asyncio.run(
        backup_key_store(
            upstream.connect_args(), keyring, args.out, args.shares, args.threshold
        )
    )
    print(
        f"wrote {summary.backup_file} ({summary.data_keys} data keys, "
        f"{summary.sodium_copies} wrapped by {keyring.name}) and "
        f"{len(summary.share_files)} share files; any {args.threshold} shares "
        "recover it, so keep them apart from each other and from the backup"
    )
    missing = summary.data_keys - summary.sodium_copies
    if missing:
        print(
            f"warning: {missing} data keys have no copy under {keyring.name}, so "
            "restoring them needs one of their other keyrings"
        )
    return 0


def _keys_restore(args: argparse.Namespace) -> int:
    from proxy.crypto.backup import restore_key_store

    passphrase = read_passphrase(args.passphrase_env) if args.passphrase_env else None
    upstream = Upstream.parse(args.upstream)
    if args.keydir is None and args.config is None:
        raise ConfigError("give --keydir DIR, or --config FILE with one sodium keyring")
    if args.keydir is None:
        args.keydir = parse_sodium_spec(_sodium_spec(args)).keydir
    summary = asyncio.run(
        restore_key_store(
            upstream.connect_args(), args.source, args.share, args.keydir, passphrase
        )
    )
    if summary.store_present and summary.pair_present:
        print(
            f"nothing to restore: the database already contains key store "
            f"{summary.store_id} with the backup's {summary.data_keys} data keys, "
            f"and {args.keydir} contains its key pair; {summary.keyring} unwrapped "
            f"{summary.unwrapped} of them"
        )
    else:
        print(_restore_summary(summary, args.keydir))
    if summary.retired:
        print(
            f"{_plural(summary.retired, 'data key version')} of them "
            f"{'is' if summary.retired == 1 else 'are'} retired, and stay retired"
        )
    missing = summary.data_keys - summary.unwrapped
    if missing:
        print(
            f"warning: {missing} data keys have no copy under {summary.keyring}; "
            "configure one of their other keyrings to read their values"
        )
    return 0


def _restore_summary(summary: RestoreSummary, keydir: Path) -> str:
    if summary.store_present:
        store = (
            f"the database already contains key store {summary.store_id} with the "
            f"backup's {summary.data_keys} data keys, so no row was written"
        )
    else:
        store = (
            f"restored key store {summary.store_id} with {summary.data_keys} "
            "data keys"
        )
    pair = "found" if summary.pair_present else "wrote"
    return (
        f"{store}; {pair} the key pair {summary.keyring} in {keydir}, which "
        f"unwrapped {summary.unwrapped} of them"
    )


def _sodium_spec(args: argparse.Namespace) -> str:
    """Return the sodium keyring spec of --keyring, or the only one of --config."""
    keyring = getattr(args, "keyring", None)
    if args.config is None:
        if keyring is None:
            raise ConfigError("give --keyring sodium:KEYDIR or --config FILE")
        return str(keyring)
    if keyring is not None:
        raise ConfigError("give --keyring or --config, not both")
    specs = [s for s in load_config(args.config).all_specs() if s.startswith("sodium:")]
    if len(specs) != 1:
        raise ConfigError(
            f"config file {args.config} names {len(specs)} sodium keyrings, so it "
            "does not say which to use; give --keyring sodium:KEYDIR instead"
        )
    return specs[0]


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(args.dir)


if __name__ == "__main__":
    sys.exit(main())
