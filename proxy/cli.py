"""The `pgseal` command: serve, keys init, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from proxy.app import Proxy, ProxySettings
from proxy.crypto.keyring import SodiumKeyring
from proxy.errors import ConfigError, PgsealError
from proxy.server import Upstream
from proxy.wire.frames import DEFAULT_MAX_MESSAGE

log = logging.getLogger("pgseal")


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
    except KeyboardInterrupt:
        return 130


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
        "is the proxy's own, for its key store and catalog reads",
    )
    serve.add_argument("--rules", default="rules", type=Path, help="folder of *.yaml rule files")
    _add_keyring(serve, many=True)
    serve.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        help="largest protocol message accepted, in bytes",
    )
    serve.add_argument(
        "--rules-poll-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the rules folder for changes; 0 turns the "
        "check off, and SIGHUP still reloads",
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="manage keys")
    key_commands = keys.add_subparsers(required=True, metavar="KEYS_COMMAND")
    init = key_commands.add_parser("init", help="write a new sodium key pair")
    _add_keyring(init, many=False)
    init.set_defaults(run=_keys_init)

    rules = commands.add_parser("rules", help="work with rule files")
    rule_commands = rules.add_subparsers(required=True, metavar="RULES_COMMAND")
    check = rule_commands.add_parser(
        "check", help="validate the rule files against the live database"
    )
    check.add_argument("--upstream", required=True, help="postgresql:// URI of the server")
    check.add_argument("--rules", default="rules", type=Path, help="folder of *.yaml rule files")
    check.set_defaults(run=_rules_check)

    demo = commands.add_parser(
        "demo", help="run the proxy on an embedded PostgreSQL and show what it stores"
    )
    demo.add_argument(
        "--dir", type=Path, default=Path(".pgseal-demo"), help="folder for the demo's files"
    )
    demo.set_defaults(run=_demo)
    return parser


def _add_keyring(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument(
        "--keyring",
        required=True,
        action="append" if many else "store",
        help=(
            "keyring spec, sodium:KEYDIR or aws-kms:KEY (a KMS key id, ARN or "
            "alias/NAME); give it once per keyring, and data keys are wrapped "
            "by all of them and unwrapped by the first that works, in order"
            if many
            else "keyring spec, sodium:KEYDIR"
        ),
    )


def _serve(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen must be HOST:PORT, got {args.listen!r}")
    settings = ProxySettings(
        listen_host=host,
        listen_port=int(port),
        upstream=Upstream.parse(args.upstream),
        rules_dir=args.rules,
        keyrings=tuple(args.keyring),
        max_message=args.max_message_size,
        rules_poll_seconds=args.rules_poll_interval,
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
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(f"error: {problem}")
    if report.problems:
        print(f"{len(report.problems)} problems found in {args.rules}")
        return 1
    print(f"ok: {report.tables} tables and {report.columns} encrypted columns checked")
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    scheme, _, location = args.keyring.partition(":")
    if scheme != "sodium" or not location:
        raise ConfigError(
            f"keys init creates sodium key pairs; expected sodium:KEYDIR, got {args.keyring!r}"
        )
    keyring = SodiumKeyring.create(Path(location))
    print(f"wrote key pair {keyring.name} to {location}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(args.dir)


if __name__ == "__main__":
    sys.exit(main())
