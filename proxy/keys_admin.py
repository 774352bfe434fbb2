"""Key lifecycle commands: `pgseal keys list|rotate|rewrap|retire|shred`, `pgseal reencrypt`.

Each command connects to the server as `pgseal serve` does (`--upstream` and
one or more `--keyring`), changes the key store in short transactions under
the same locks that proxies take, and is safe to run while proxies serve
traffic. The operator's order is rotate, reencrypt, retire; rewrap rotates
or migrates the keyrings themselves. See docs/key-lifecycle.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from proxy.audit import AuditLog, AuditRecord, audit_operation
from proxy.catalog import EncryptedColumn, RuledTable, load_catalog
from proxy.config import DEFAULT_SET, keyring_options
from proxy.crypto.keycache import KeyCache
from proxy.crypto.keyring import Keyring, parse_keyring_spec
from proxy.crypto.keystore import KeyStore
from proxy.crypto.keyversions import KeyVersion, describe_versions, retire_versions
from proxy.crypto.rewrap import drop_keyrings, rewrap
from proxy.crypto.shred import ShredResult, shred_subject, subject_digests
from proxy.crypto.values import Algorithm
from proxy.errors import ConfigError, KeyStoreError, PgsealError
from proxy.keyring_sets import KeyringSets, load_keyring_sets
from proxy.planner import KeyView
from proxy.progress import ProgressBar
from proxy.reencrypt import ReencryptOptions, Reencryptor, count_key_versions
from proxy.rules import ColumnRule, Encryption, RuleSet, TableRule, load_rules
from proxy.server import Upstream, is_unreachable

__all__ = ["add_key_commands", "add_reencrypt_command"]

# How long reencrypt waits after a rotation of a deterministic key: two key
# refreshes at the proxy's default interval of 20 s.
_SETTLE_SECONDS = 40.0
# Per key name: the number of live versions and the age in seconds of the
# newest, by the server's clock.
_NEWEST_VERSION_AGE_SQL = """
SELECT n.key_name,
       count(*) AS live,
       extract(epoch FROM now() - max(d.created_at))::float8 AS age
FROM pgseal.key_names n JOIN pgseal.data_keys d USING (key_id)
WHERE n.key_name = ANY($1::text[]) AND d.state <> 'retired'
GROUP BY n.key_name
"""

# Re-encryption keeps every key it loaded for the whole run, however long.
_RUN_LONG_TTL = 7 * 86400.0


class KeysInUseError(KeyStoreError):
    """Versions to retire still seal values in a table."""


@dataclass
class AdminSession:
    upstream: Upstream
    store: KeyStore
    cache: KeyCache
    keyring_sets: KeyringSets
    specs: dict[str, Keyring]
    """Each keyring spec given, by its text."""


def add_key_commands(key_commands: Any) -> None:
    """Add list, rotate, rewrap and retire to the `pgseal keys` subparsers."""
    listing = key_commands.add_parser("list", help="list data key versions")
    _add_connection(listing)
    listing.add_argument(
        "--key-name",
        action="append",
        help="list only this key name, such as public.users.email; repeatable",
    )
    listing.set_defaults(run=_sync(_list))

    rotate = key_commands.add_parser(
        "rotate", help="create a new data key version to seal new values"
    )
    _add_connection(rotate)
    _add_key_choice(rotate)
    rotate.add_argument(
        "--rules",
        type=Path,
        help="folder of *.yaml rule files, to find a column's shared key name",
    )
    rotate.set_defaults(run=_sync(_rotate))

    rewrap_parser = key_commands.add_parser(
        "rewrap",
        help="wrap every data key under new keyrings, or drop a keyring's copies",
    )
    _add_connection(
        rewrap_parser, keyring_help="keyring that unwraps the stored data keys"
    )
    rewrap_parser.add_argument(
        "--new-keyring",
        action="append",
        default=[],
        help="keyring spec to wrap every data key with as well; repeatable",
    )
    rewrap_parser.add_argument(
        "--drop-keyring",
        action="append",
        default=[],
        help="keyring whose wrapped copies are deleted once the new ones are "
        "stored: a stored name such as sodium:3f9c2a7d1e0b4c65 or "
        "aws-kms:alias/old, or one of the specs given; repeatable",
    )
    rewrap_parser.add_argument(
        "--rules",
        type=Path,
        help="folder of *.yaml rule files; with --config, every data key is "
        "also wrapped by each keyring of its column's set that lacks a copy",
    )
    rewrap_parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip unwrapping each new copy once to check it",
    )
    rewrap_parser.set_defaults(run=_sync(_rewrap))

    retire = key_commands.add_parser(
        "retire", help="stop loading old data key versions, after reencrypt"
    )
    _add_connection(retire)
    _add_key_choice(retire)
    retire.add_argument(
        "--rules", type=Path, required=True, help="folder of *.yaml rule files"
    )
    retire.add_argument(
        "--below-version",
        type=int,
        help="retire the versions below this one (default: all but the newest)",
    )
    retire.add_argument(
        "--force",
        action="store_true",
        help="retire even if values are still sealed under those versions; "
        "reads of such values then fail",
    )
    retire.set_defaults(run=_sync(_retire))

    shred = key_commands.add_parser(
        "shred",
        help="destroy every data key of one subject, so its values never open again",
    )
    shred.add_argument(
        "--upstream",
        required=True,
        help="postgresql://USER:PASSWORD@HOST:PORT/DBNAME of the database that "
        "holds the key store",
    )
    subject = shred.add_mutually_exclusive_group(required=True)
    subject.add_argument(
        "--subject",
        help="the subject's value in the rules' subject_column, such as a creator id",
    )
    subject.add_argument(
        "--subject-hmac",
        action="append",
        help="a subject digest (64 hex digits) from the audit line of an earlier "
        "shred, to repeat it after restoring an older backup; repeatable",
    )
    shred.add_argument(
        "--column",
        help="SCHEMA.TABLE.COLUMN to shred the subject's key of; default: every "
        "column keyed per subject",
    )
    shred.add_argument(
        "--audit-log",
        type=Path,
        help="file to append one JSON line per key operation to (mode 0600)",
    )
    shred.set_defaults(run=_sync(_shred))


def add_reencrypt_command(commands: Any) -> None:
    """Add `pgseal reencrypt` to the top-level subparsers."""
    parser = commands.add_parser(
        "reencrypt",
        help="rewrite a table's sealed values under the newest data key versions",
    )
    _add_connection(parser)
    parser.add_argument("--table", required=True, help="SCHEMA.TABLE to re-encrypt")
    parser.add_argument(
        "--rules", type=Path, required=True, help="folder of *.yaml rule files"
    )
    parser.add_argument(
        "--batch-size", type=int, default=500, help="rows per transaction (default 500)"
    )
    parser.add_argument(
        "--max-rows-per-second",
        type=float,
        help="limit on rows read per second, to spare the server (default: none)",
    )
    parser.add_argument(
        "--seal-plaintext",
        action="store_true",
        help="seal values that are not sealed yet, for a column just put under "
        "a rule; without it such values are reported and left alone",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        help="stop after this many batches; the next run resumes from there",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start from the first row, ignoring an interrupted earlier run",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not draw the progress bar"
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=_SETTLE_SECONDS,
        help="wait until a deterministic column's newest key version is this old "
        "before moving rows to it, so that running proxies search under it too "
        f"(default {_SETTLE_SECONDS:g}: two key refreshes of 20 s)",
    )
    parser.set_defaults(run=_sync(_reencrypt))


def _add_connection(
    parser: argparse.ArgumentParser,
    keyring_help: str = "keyring spec, as for pgseal serve; repeatable, tried in order",
) -> None:
    parser.add_argument(
        "--upstream",
        required=True,
        help="postgresql://USER:PASSWORD@HOST:PORT/DBNAME of the database that "
        "holds the key store; without a password, PGPASSWORD or the password "
        "file gives it, as for pgseal serve",
    )
    parser.add_argument("--keyring", action="append", help=keyring_help)
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file of keyring sets, as for pgseal serve, instead of "
        "--keyring; with --rules, each column's data keys use its set",
    )
    parser.add_argument(
        "--audit-log",
        type=Path,
        help="file to append one JSON line per key operation to (mode 0600)",
    )


def _add_key_choice(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--column", help="SCHEMA.TABLE.COLUMN whose data key to change")
    choice.add_argument("--key", help="shared key name, as in a rule's 'key:'")


def _sync(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(command(args))

    return run


@asynccontextmanager
async def open_key_store(
    args: argparse.Namespace, cache: KeyCache | None = None
) -> AsyncIterator[AdminSession]:
    """Connect to the key store with the command's --upstream and keyrings.

    The keyrings come from --keyring or --config. With --rules, each key
    name of the rules is wrapped by its column's keyring set.
    """
    upstream = Upstream.parse(args.upstream)
    options = keyring_options(args.keyring, args.config, args.audit_log)
    sets = await asyncio.to_thread(load_keyring_sets, options.default, options.named)
    rules_dir = getattr(args, "rules", None)
    rules = load_rules(rules_dir) if rules_dir is not None else None
    if rules is not None:
        sets.for_rules(rules)
    specs = {
        spec: keyring
        for name, keyring_specs in (
            (DEFAULT_SET, options.default),
            *options.named.items(),
        )
        for spec, keyring in zip(keyring_specs, sets.sets[name])
    }
    audit = None
    if options.audit_file is not None:
        audit = AuditLog(options.audit_file, db_user=upstream.user)
    cache = cache if cache is not None else KeyCache()
    try:
        pool = await asyncpg.create_pool(
            **upstream.connect_args(),
            min_size=1,
            max_size=4,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        if audit is not None:
            audit.close()
        raise _connect_error(upstream, exc) from exc
    try:
        store = KeyStore(pool, sets.keyrings, cache, audit)
        sets.assign(store, rules)
        await store.setup()
        yield AdminSession(upstream, store, cache, sets, specs)
    finally:
        await pool.close()
        if audit is not None:
            audit.close()


def _connect_error(upstream: Upstream, exc: Exception) -> PgsealError:
    if isinstance(exc, OSError) and is_unreachable(exc):
        return upstream.unreachable(exc)
    return KeyStoreError(f"cannot connect to {upstream.address}: {exc}")


async def _list(args: argparse.Namespace) -> int:
    async with open_key_store(args) as session:
        versions = await describe_versions(session.store, args.key_name)
    rows = [("KEY NAME", "ID", "VERSION", "STATE", "ALGORITHM", "CREATED", "KEYRINGS")]
    for v in versions:
        rows.append(
            (
                v.key_name,
                str(v.key_id),
                str(v.version),
                v.state,
                v.algorithm.name,
                v.created_at.isoformat(timespec="seconds"),
                ", ".join(v.keyrings),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells + [row[-1]]))
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    rules = load_rules(args.rules) if args.rules is not None else None
    key_name = _key_name(args, rules)
    async with open_key_store(args) as session:
        store = session.store
        if len(session.keyring_sets.sets) > 1 and rules is None:
            raise ConfigError(
                "the config file names several keyring sets, so give --rules: "
                "the new version is wrapped by the keyring set of its column"
            )
        algorithm = await store.key_algorithm(key_name)
        if algorithm is None:
            raise KeyStoreError(
                f"key name {key_name!r} has no data key in the key store; list "
                "the names with pgseal keys list, and give --rules or --key for a "
                "column whose rule sets a shared 'key:'"
            )
        _check_same_keyrings(
            key_name, await describe_versions(store, [key_name]), store
        )
        if algorithm is Algorithm.AES_256_SIV:
            print(
                f"warning: {key_name} is deterministic: until pgseal reencrypt has "
                "moved every row to the new version and pgseal keys retire has "
                "retired the old one, the proxies reject joins, GROUP BY and "
                "DISTINCT on it, and unique constraints hold only within one version",
                file=sys.stderr,
            )
        key, _ = await store.rotate(key_name, reason="operator")
        versions = await describe_versions(store, [key_name])
    older = [
        str(v.version)
        for v in versions
        if v.state == "active" and v.version != key.version
    ]
    print(
        f"rotated {key_name}: version {key.version} (key id {key.key_id}) seals new values"
    )
    if older:
        print(f"versions {', '.join(older)} still open the values sealed under them")
    print(
        "running proxies switch to the new version at their next key refresh "
        "(every 20 seconds by default); then run pgseal reencrypt on the table, "
        "and pgseal keys retire"
    )
    return 0


async def _rewrap(args: argparse.Namespace) -> int:
    by_sets = args.rules is not None and args.config is not None
    if not args.new_keyring and not args.drop_keyring and not by_sets:
        raise ConfigError(
            "give --new-keyring SPEC, --drop-keyring NAME, or --config with --rules"
        )
    new_keyrings = await asyncio.to_thread(_parse_keyrings, args.new_keyring)
    async with open_key_store(args) as session:
        store = session.store
        specs = dict(session.specs)
        specs.update(zip(args.new_keyring, new_keyrings))
        drop = _drop_names(args.drop_keyring, specs)
        kept_new = [k.name for k in new_keyrings if k.name in drop]
        if kept_new:
            raise ConfigError(
                f"keyring {kept_new[0]} is both new and dropped; give it only once"
            )
        if new_keyrings or by_sets:
            report = await rewrap(
                store,
                new_keyrings,
                verify=not args.no_verify,
                key_sets=_rule_sets(session, args.rules) if by_sets else None,
            )
            print(
                f"rewrapped: {len(report.added)} wrapped copies added, "
                f"{report.present} already present"
            )
        if drop:
            deleted = await drop_keyrings(store, drop)
            print(
                f"dropped keyrings {', '.join(drop)}: {deleted} wrapped copies deleted"
            )
        _print_coverage(await describe_versions(store))
    return 0


async def _retire(args: argparse.Namespace) -> int:
    rules = load_rules(args.rules)
    key_name = _key_name(args, rules)
    async with open_key_store(args) as session:
        store = session.store
        versions = await describe_versions(store, [key_name])
        to_retire = _versions_to_retire(key_name, versions, args.below_version)
        if not to_retire:
            print(_nothing_to_retire(key_name, versions, args.below_version))
            return 0
        key_id = versions[0].key_id
        in_use = await _values_in_use(
            session.upstream, rules, key_name, key_id, to_retire
        )
        total = sum(in_use.values())
        for (column, version), count in sorted(in_use.items()):
            print(f"{column}: {count} values sealed under version {version}")
        details = {
            "forced": bool(args.force),
            "values_still_sealed": total,
            "columns_scanned": sorted(
                rule.identity for rule in _columns_with_key(rules, key_name)
            ),
        }
        if total and not args.force:
            error = KeysInUseError(
                f"{total} values are still sealed under versions "
                f"{', '.join(map(str, to_retire))} of {key_name}, and would no "
                "longer open; run pgseal reencrypt on their tables first, or "
                "pass --force"
            )
            if store.audit is not None:
                record = AuditRecord("retire", key_names=[key_name], details=details)
                store.audit.write(record, error=error)
            raise error
        retired = await retire_versions(store, key_name, to_retire, details=details)
    print(f"retired {key_name} versions {', '.join(map(str, retired)) or 'none'}")
    return 0


async def _shred(args: argparse.Namespace) -> int:
    if args.column is not None and len(args.column.split(".")) != 3:
        raise ConfigError(f"--column must be SCHEMA.TABLE.COLUMN, got {args.column!r}")
    upstream = Upstream.parse(args.upstream)
    audit = None
    if args.audit_log is not None:
        audit = AuditLog(args.audit_log, db_user=upstream.user)
    try:
        result = await _shred_with_audit(args, upstream, audit)
    finally:
        if audit is not None:
            audit.close()

    if not result.keys:
        print("no data keys found for this subject; nothing was destroyed")
        return 0
    print(
        f"destroyed {len(result.keys)} data key versions "
        f"({result.wrapped_copies} wrapped copies) of this subject for "
        f"{', '.join(result.columns)}"
    )
    print(
        "running proxies drop their cached copies at the next key refresh "
        "(every 20 seconds by default); physical backups and WAL archives taken "
        "before now still hold the wrapped keys until they expire"
    )
    return 0


async def _shred_with_audit(
    args: argparse.Namespace, upstream: Upstream, audit: AuditLog | None
) -> ShredResult:
    column = args.column
    details: dict[str, Any] = {"column": column or "all columns keyed per subject"}
    with audit_operation(audit, "shred", details=details) as record:
        try:
            pool = await asyncpg.create_pool(**upstream.connect_args(), min_size=1, max_size=2)
        except (OSError, asyncpg.PostgresError) as exc:
            raise _connect_error(upstream, exc) from exc
        try:
            digests = await _digests(pool, args)
            record.details["subject_hmac"] = sorted(digest.hex() for digest in digests)
            result = ShredResult()
            if digests:
                result = await shred_subject(pool, digests, column)
        finally:
            await pool.close()
        record.keys.extend(result.keys)
        record.key_names.extend(ref.name for ref in result.keys)
        record.details["destroyed_versions"] = len(result.keys)
        record.details["wrapped_copies"] = result.wrapped_copies
    return result


async def _digests(
    pool: asyncpg.Pool[asyncpg.Record], args: argparse.Namespace
) -> list[bytes]:
    """Return the digests to shred, from --subject-hmac or from --subject."""
    if args.subject_hmac:
        try:
            digests = [bytes.fromhex(text) for text in args.subject_hmac]
        except ValueError:
            digests = []
        if not digests or any(len(digest) != 32 for digest in digests):
            raise ConfigError(
                "--subject-hmac must be 64 hex digits, as in the subject_hmac "
                "list of a shred's audit line"
            )
        return digests
    secret = await _subject_secret(pool)
    if secret is None:
        return []
    return subject_digests(secret, args.subject)


async def _subject_secret(pool: asyncpg.Pool[asyncpg.Record]) -> bytes | None:
    """Return the key store's subject secret, or None if no key store has one."""
    try:
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT to_regclass('pgseal.subject_keys')"):
                return None
            secret = await conn.fetchval("SELECT subject_secret FROM pgseal.key_store")
    except (asyncpg.PostgresError, OSError) as exc:
        raise KeyStoreError(f"key store: reading the subject secret failed: {exc}") from exc
    return None if secret is None else bytes(secret)


async def _reencrypt(args: argparse.Namespace) -> int:
    options = ReencryptOptions(
        batch_size=args.batch_size,
        max_rows_per_second=args.max_rows_per_second,
        seal_plaintext=args.seal_plaintext,
        max_batches=args.max_batches,
        restart=args.restart,
    )
    rules = load_rules(args.rules)
    upstream = Upstream.parse(args.upstream)
    table_rule = _table_rule(rules, args.table)
    database = table_rule.database or upstream.database
    cache = KeyCache(ttl=_RUN_LONG_TTL, active_ttl=_RUN_LONG_TTL)
    async with open_key_store(args, cache) as session:
        conn = await asyncpg.connect(**upstream.connect_args(database))
        try:
            catalog = await load_catalog(conn, [table_rule])
            table = _base_table(catalog.tables, table_rule)
            _check_no_subject_keys(table)
            await _settle(conn, table, args.settle_seconds)
            view = KeyView(cache, session.store.store_id)
            progress = None if args.no_progress else ProgressBar(table.qualified_name)
            reencryptor = Reencryptor(
                conn, session.store, catalog, table, view, options, progress
            )
            report = await reencryptor.run()
        finally:
            await conn.close()

    for skipped in report.skipped:
        print(f"skipped {skipped}", file=sys.stderr)
    if report.skipped_count > len(report.skipped):
        print(
            f"... and {report.skipped_count - len(report.skipped)} more",
            file=sys.stderr,
        )
    state = "finished" if report.finished else "stopped; run again to resume"
    print(
        f"{report.table}: {state}. {report.scanned} rows read, {report.resealed} "
        f"values re-sealed, {report.sealed_plaintext} plaintext values sealed, "
        f"{report.current} already current, {report.skipped_count} skipped"
    )
    return 1 if report.skipped_count else 0


async def _settle(conn: asyncpg.Connection, table: RuledTable, seconds: float) -> None:
    """Wait until each rotated deterministic key's newest version is `seconds` old.

    A proxy searches a deterministic column under the versions it has
    loaded. Rows moved to a version it has not loaded yet would drop out of
    its lookups without an error, so reencrypt lets every proxy's key refresh
    see the new version first.
    """
    names = sorted(
        {
            column.key_name
            for column in table.encrypted.values()
            if column.rule.encryption is Encryption.DETERMINISTIC
        }
    )
    if not names or seconds <= 0:
        return
    rows = await conn.fetch(_NEWEST_VERSION_AGE_SQL, names)
    wait = max((seconds - row["age"] for row in rows if row["live"] > 1), default=0.0)
    if wait <= 0:
        return
    print(
        f"waiting {wait:.0f} s until running proxies have loaded the newest key "
        f"version of {', '.join(row['key_name'] for row in rows if row['live'] > 1)} "
        "(--settle-seconds)",
        file=sys.stderr,
    )
    await asyncio.sleep(wait)


def _check_no_subject_keys(table: RuledTable) -> None:
    # TODO: re-seal subject-keyed columns under each row's subject key.
    keyed = sorted(c.identity for c in table.encrypted.values() if c.subject_column)
    if keyed:
        raise ConfigError(
            f"pgseal reencrypt does not support columns keyed per subject yet: "
            f"{', '.join(keyed)}; it would re-seal them under a column key"
        )


def _key_name(args: argparse.Namespace, rules: RuleSet | None) -> str:
    if args.key is not None:
        return f"key:{args.key}"
    parts = args.column.split(".")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"--column must be SCHEMA.TABLE.COLUMN, got {args.column!r}")
    if rules is not None:
        for table in rules.tables:
            for column in table.columns:
                if column.identity == args.column:
                    return column.key_name
        raise ConfigError(f"no rule encrypts column {args.column}")
    return str(args.column)


def _check_same_keyrings(
    key_name: str, versions: list[KeyVersion], store: KeyStore
) -> None:
    """Reject a rotation whose new version would lack a keyring the current one has.

    A proxy that unwraps only with that keyring could not read the new
    version, so it could neither seal new values nor open them.
    """
    active = [v for v in versions if v.state == "active"]
    if not active:
        return
    newest = max(active, key=lambda v: v.version)
    configured = {keyring.name for keyring in store.keyrings}
    missing = sorted(set(newest.keyrings) - configured)
    if missing:
        raise ConfigError(
            f"version {newest.version} of {key_name} is wrapped by keyrings "
            f"{', '.join(newest.keyrings)}, but {', '.join(missing)} was not given; "
            "pass a --keyring for each, so that the new version is wrapped by "
            "the same keyrings and every proxy can unwrap it"
        )


def _columns_with_key(rules: RuleSet, key_name: str) -> list[ColumnRule]:
    return [
        column
        for table in rules.tables
        for column in table.columns
        if column.key_name == key_name
    ]


def _table_rule(rules: RuleSet, qualified: str) -> TableRule:
    schema, _, name = qualified.rpartition(".")
    schema = schema or "public"
    for rule in rules.tables:
        if (rule.schema, rule.table) == (schema, name):
            return rule
    raise ConfigError(f"no rule names table {schema}.{name}")


def _base_table(tables: tuple[RuledTable, ...], rule: TableRule) -> RuledTable:
    return next(
        t
        for t in tables
        if not t.is_view and (t.schema, t.name) == (rule.schema, rule.table)
    )


def _versions_to_retire(
    key_name: str, versions: list[KeyVersion], below: int | None
) -> list[int]:
    if not versions:
        raise KeyStoreError(f"key name {key_name!r} has no data key in the key store")
    active = [v.version for v in versions if v.state == "active"]
    newest = max(active) if active else None
    if below is not None and newest is not None and below > newest:
        raise ConfigError(
            f"--below-version {below} would retire version {newest}, the newest "
            f"active version of {key_name}, which seals new values; rotate first"
        )
    limit = below if below is not None else newest
    return [version for version in active if limit is not None and version < limit]


def _nothing_to_retire(
    key_name: str, versions: list[KeyVersion], below: int | None
) -> str:
    """Say why no version of key_name is retired, for a run that retires none."""
    active = sorted(v.version for v in versions if v.state == "active")
    retired = sorted(v.version for v in versions if v.state == "retired")
    if below is not None:
        reason = f"it has no active version below {below}"
    elif len(active) == 1:
        reason = (
            f"version {active[0]} is its only active version and seals new "
            "values, so there is no older version to retire"
        )
    else:
        reason = "it has no active version"
    if retired:
        reason += f" (versions {', '.join(map(str, retired))} are retired already)"
    return f"{key_name}: nothing retired: {reason}"


async def _values_in_use(
    upstream: Upstream,
    rules: RuleSet,
    key_name: str,
    key_id: int,
    versions: list[int],
) -> dict[tuple[str, int], int]:
    """Count, per column and version, the stored values under the given versions."""
    columns = _columns_with_key(rules, key_name)
    if not columns:
        raise ConfigError(
            f"no rule uses key name {key_name}, so its tables cannot be checked "
            "for values under the versions to retire; add the rules folder that "
            "names its columns"
        )
    found: dict[tuple[str, int], int] = {}
    for database, table_rules in _tables_by_database(rules, columns, upstream).items():
        conn = await asyncpg.connect(**upstream.connect_args(database))
        try:
            catalog = await load_catalog(conn, table_rules)
            for rule in table_rules:
                table = _base_table(catalog.tables, rule)
                for column in _encrypted_with_key(table, key_name):
                    counts = await count_key_versions(conn, table, column)
                    for version in versions:
                        count = counts.get((key_id, version), 0)
                        if count:
                            found[(column.identity, version)] = count
        finally:
            await conn.close()
    return found


def _tables_by_database(
    rules: RuleSet, columns: list[ColumnRule], upstream: Upstream
) -> dict[str, list[TableRule]]:
    wanted = {(column.schema, column.table) for column in columns}
    grouped: dict[str, list[TableRule]] = {}
    for rule in rules.tables:
        if (rule.schema, rule.table) in wanted:
            grouped.setdefault(rule.database or upstream.database, []).append(rule)
    return grouped


def _encrypted_with_key(table: RuledTable, key_name: str) -> list[EncryptedColumn]:
    return [c for c in table.encrypted.values() if c.key_name == key_name]


def _drop_names(values: list[str], specs: dict[str, Keyring]) -> list[str]:
    """Map each --drop-keyring value to a stored keyring name.

    A value that is one of the specs given on the command line names that
    keyring; anything else is taken as a stored name.
    """
    names = {specs[value].name if value in specs else value for value in values}
    return sorted(names)


def _print_coverage(versions: list[KeyVersion]) -> None:
    counts: dict[str, int] = {}
    for version in versions:
        for name in version.keyrings:
            counts[name] = counts.get(name, 0) + 1
    for name, count in sorted(counts.items()):
        print(f"keyring {name}: wraps {count} of {len(versions)} data key versions")


def _rule_sets(
    session: AdminSession, rules_dir: Path
) -> Callable[[str], tuple[Keyring, ...]]:
    """Return the keyring set of each key name that the rules use, or () for others."""
    mapping = session.keyring_sets.for_rules(load_rules(rules_dir))
    return lambda key_name: mapping.get(key_name, ())


def _parse_keyrings(specs: list[str]) -> tuple[Keyring, ...]:
    return tuple(parse_keyring_spec(spec) for spec in specs)
