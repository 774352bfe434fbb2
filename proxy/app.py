"""Start and stop the proxy: rules, catalog, keys, planners and the listener."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from proxy.audit import AuditLog
from proxy.catalog import Catalog, load_catalog
from proxy.crypto.keyring import Keyring, RemoteKeyring, parse_keyring_spec
from proxy.crypto.keystore import KeyCache, KeyNotFoundError, KeyStore
from proxy.crypto.subjects import (
    KeyRequest,
    StoredKeyRequest,
    SubjectKeyRequest,
    UnavailableKeys,
)
from proxy.crypto.values import Algorithm
from proxy.errors import (
    ConfigError,
    KeyringError,
    KeyStoreError,
    KeyUnavailableError,
    PgsealError,
)
from proxy.keyring_sets import KeyringSets, load_keyring_sets
from proxy.planner import ColumnPlanner, KeyView, algorithm_of
from proxy.rotation import KeyRotator
from proxy.rules import RuleSet, load_rules
from proxy.server import (
    DEFAULT_STARTUP_TIMEOUT,
    ConnectionHandler,
    Listener,
    Relay,
    Upstream,
    is_unreachable,
)
from proxy.tls import load_client_tls
from proxy.wire.frames import DEFAULT_MAX_MESSAGE
from proxy.wire.session import Planner

log = logging.getLogger(__name__)

# How often cached data keys are refreshed from the key store, so that keys
# stay loaded past the cache's age limit and new versions are seen.
KEY_REFRESH_SECONDS = 20.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen_host: str
    listen_port: int
    upstream: Upstream
    rules_dir: Path
    # The default keyring set: specs that wrap the data keys of every column
    # whose rule names no set.
    keyrings: tuple[str, ...]
    max_message: int = DEFAULT_MAX_MESSAGE
    # Seconds a client has to send its startup packet after it connects.
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    # Seconds between checks of the rules folder for changed files; 0 turns
    # the check off, leaving SIGHUP as the way to reload.
    rules_poll_seconds: float = 1.0
    # PEM certificate chain and private key for TLS with clients; without
    # them the proxy responds 'N' to SSLRequest.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Seconds between reloads of the data keys: new versions, retired ones
    # and rotation periods are seen at this pace.
    key_refresh_seconds: float = KEY_REFRESH_SECONDS
    # Values sealed per randomized data key in this process before the proxy
    # creates a new version; None for no limit.
    max_values_per_key: int | None = None
    # JSON-lines file that records key creation and rotation; None for none.
    audit_log: Path | None = None
    # Named keyring sets other than the default, from the config file, for
    # rule columns that set 'keyring: NAME'.
    keyring_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# Maximum wait for a lock while reading the catalog, in PostgreSQL's units.
_CATALOG_LOCK_TIMEOUT = "5s"


class Proxy:
    """One proxy process: loads rules and keys, then serves clients."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self._cache = KeyCache(max_values_per_key=settings.max_values_per_key)
        # A key that failed to load is tried again after one refresh interval.
        self._unavailable = UnavailableKeys(settings.key_refresh_seconds)
        self._rotator: KeyRotator | None = None
        self._audit: AuditLog | None = None
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._keystore: KeyStore | None = None
        self._catalogs: dict[str, Catalog] = {}
        self._column_planners: dict[str, ColumnPlanner] = {}
        self._rules = RuleSet(())
        self._reloading: asyncio.Task[None] | None = None
        # Catalog reloads started so far; a statement that needs a catalog
        # read after some moment waits for a reload with a higher number.
        self._reloads_started = 0
        self._reload_number = 0
        self._server: Listener | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Set once the listener is up, so that a failed start logs no stop.
        self._started = False
        self.relay: Relay | None = None
        self.port = settings.listen_port
        self.keyrings: tuple[Keyring, ...] = ()
        self.keyring_sets = KeyringSets({})

    @property
    def keystore(self) -> KeyStore:
        if self._keystore is None:
            raise KeyStoreError("the proxy has not started yet")
        return self._keystore

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        client_tls = load_client_tls(settings.tls_cert, settings.tls_key)
        # A KMS keyring imports boto3 and builds its client, which may block.
        self.keyring_sets = await asyncio.to_thread(
            load_keyring_sets, settings.keyrings, settings.keyring_sets
        )
        self.keyrings = self.keyring_sets.keyrings
        rules = load_rules(settings.rules_dir)
        self.keyring_sets.for_rules(rules)
        try:
            self._pool = await asyncpg.create_pool(
                **settings.upstream.connect_args(), min_size=1, max_size=4
            )
        except OSError as exc:
            if is_unreachable(exc):
                raise settings.upstream.unreachable(exc) from exc
            raise
        if settings.audit_log is not None:
            self._audit = AuditLog(settings.audit_log, db_user=settings.upstream.user)
        self._keystore = KeyStore(self._pool, self.keyrings, self._cache, self._audit)
        self.keyring_sets.assign(self._keystore, rules)
        await self._keystore.setup()
        self._rotator = KeyRotator(self._keystore)
        self._cache.on_limit = self._rotator.limit_reached
        self._rules = rules
        self._catalogs = await self._load_catalogs(rules)
        await self._load_keys()
        self.relay = Relay(
            settings.upstream,
            self._planners(),
            settings.max_message,
            client_tls,
            startup_timeout=settings.startup_timeout,
        )
        self.relay.on_catalog_change = self._catalog_changed
        self.relay.catalog_ready = self._catalog_ready
        self.relay.refresh_catalog = self._refresh_catalog
        self.relay.fetch_keys = self._fetch_keys
        self._server = await _listen(
            self.relay.accept, settings.listen_host, settings.listen_port
        )
        self._started = True
        self.port = self._server.sockets[0].getsockname()[1]
        self._refresher = asyncio.create_task(self._refresh_keys())
        if settings.rules_poll_seconds > 0:
            self._watcher = asyncio.create_task(self._watch_rules())
        tables, views = _count_relations(self._catalogs)
        log.info(
            "pgseal listening on %s:%d (client TLS %s), upstream %s "
            "(sslmode %s), %d ruled tables and %d views over them",
            settings.listen_host,
            self.port,
            "on" if client_tls else "off",
            settings.upstream.address,
            settings.upstream.sslmode.value,
            tables,
            views,
        )

    async def reload_rules(self) -> bool:
        """Load the rule files again; keep the rules in force if the new ones fail.

        Returns whether the new rules took effect.
        """
        try:
            rules = load_rules(self.settings.rules_dir)
            self.keyring_sets.for_rules(rules)
            catalogs = await self._load_catalogs(rules, strict=False)
        except (PgsealError, OSError, asyncpg.PostgresError) as exc:
            log.error("new rules rejected, the rules in force stay: %s", exc)
            return False
        self._rules = rules
        self.keyring_sets.assign(self.keystore, rules)
        self._catalogs = catalogs
        await self._load_keys()
        if self.relay is not None:
            self.relay.set_planners(self._planners())
        tables, views = _count_relations(catalogs)
        log.info(
            "reloaded rules from %s: %d ruled tables and %d views over them",
            self.settings.rules_dir,
            tables,
            views,
        )
        return True

    async def _watch_rules(self) -> None:
        """Reload the rules when a file in the rules folder changes."""
        seen = _folder_signature(self.settings.rules_dir)
        while True:
            await asyncio.sleep(self.settings.rules_poll_seconds)
            current = _folder_signature(self.settings.rules_dir)
            if current != seen:
                seen = current
                log.info("rule files changed in %s", self.settings.rules_dir)
                await self.reload_rules()

    async def _load_catalogs(
        self, rules: RuleSet, strict: bool = True
    ) -> dict[str, Catalog]:
        """Read the catalog of every database that has rules.

        With `strict`, a rule that does not match its table raises
        RuleError; without it, that table is marked broken, and statements
        on it are rejected until it matches again.
        """
        upstream = self.settings.upstream
        catalogs = {}
        for database in sorted(rules.databases(upstream.database)):
            # Client statements wait for this read, so it must not wait for
            # a lock that one of those clients holds.
            conn = await asyncpg.connect(
                **upstream.connect_args(database),
                server_settings={"lock_timeout": _CATALOG_LOCK_TIMEOUT},
            )
            try:
                table_rules = rules.for_database(database, upstream.database)
                previous = self._catalogs.get(database)
                catalogs[database] = await load_catalog(
                    conn, table_rules, strict, previous
                )
            finally:
                await conn.close()
        _check_write_only(catalogs, self.keyrings)
        return catalogs

    async def _load_keys(self) -> None:
        keystore = self.keystore
        names = []
        columns = []
        for catalog in self._catalogs.values():
            for table in catalog.tables:
                for column in table.encrypted.values():
                    if column.subject_column is not None:
                        # Subject keys are created and loaded on first use.
                        continue
                    try:
                        await keystore.active_key(column.key_name, algorithm_of(column))
                    except KeyUnavailableError as exc:
                        # Statements that need this key fail until it loads,
                        # and the other columns keep working.
                        log.error("column %s: %s", column.identity, exc)
                    names.append(column.key_name)
                    columns.append(column)
        if self._rotator is not None:
            await self._rotator.rotate_due(columns)
        await keystore.load_keys(names)

    def _planners(self) -> dict[str, Planner]:
        keystore = self.keystore
        view = KeyView(
            self._cache,
            keystore.store_id,
            keystore.can_unwrap,
            keystore.subject_secret,
            self._unavailable,
        )
        for database in list(self._column_planners):
            if database not in self._catalogs:
                del self._column_planners[database]
        for database, catalog in self._catalogs.items():
            planner = self._column_planners.get(database)
            if planner is None:
                self._column_planners[database] = ColumnPlanner(catalog, view)
            else:
                planner.update(catalog)
        return dict(self._column_planners)

    async def reload_catalogs(self) -> None:
        """Read the ruled tables and their views again, and load keys for them."""
        self._catalogs = await self._load_catalogs(self._rules, strict=False)
        await self._load_keys()
        if self.relay is not None:
            self.relay.set_planners(self._planners())
        log.info("reloaded the catalog of %d databases", len(self._catalogs))

    def _catalog_changed(self, database: str) -> None:
        """Start a catalog reload after DDL committed, unless one is about to start.

        Statements of every session on the database wait for it to finish.
        """
        if database not in self._catalogs:
            return
        self._start_reload()

    def _start_reload(self) -> int:
        """Start a catalog reload after the one in progress; return its number.

        A reload in progress may have read the catalog before the latest
        DDL committed, so one more runs after it. Requests that arrive while
        that one still waits share it.
        """
        if self._reloads_started > self._reload_number:
            return self._reloads_started
        self._reloads_started += 1
        number = self._reloads_started
        previous = self._reloading
        self._reloading = asyncio.create_task(self._reload_after(previous, number))
        return number

    async def _reload_after(self, previous: asyncio.Task[None] | None, number: int) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        self._reload_number = number
        try:
            await self.reload_catalogs()
        except (PgsealError, OSError, asyncpg.PostgresError) as exc:
            log.warning("catalog reload failed, the old catalog stays: %s", exc)

    async def _catalog_ready(self, database: str) -> None:
        """Wait for the catalog reloads started so far."""
        task = self._reloading
        while task is not None and not task.done():
            await asyncio.wait([task])
            task = self._reloading

    async def _refresh_catalog(self, database: str) -> None:
        """Read the catalog again in a reload that starts after this call."""
        if database not in self._catalogs:
            return
        # NOTE: every write into a missing relation costs one catalog read,
        # shared only by requests that arrive during the same read.
        self._start_reload()
        await self._catalog_ready(database)

    async def _fetch_keys(self, requests: tuple[KeyRequest, ...]) -> None:
        """Load or create the data keys a session needs, into the cache.

        A key that fails is remembered as unavailable, so the session then
        treats it as a value that does not open, or a value it cannot seal.
        """
        keystore = self.keystore
        for request in requests:
            try:
                if isinstance(request, SubjectKeyRequest):
                    await keystore.subject_key(request)
                elif isinstance(request, StoredKeyRequest):
                    await keystore.get_key(request.key_id, request.version)
            except (KeyStoreError, KeyringError) as exc:
                gone = isinstance(exc, KeyNotFoundError)
                # A key the store no longer has, as after a shred, is expected
                # to stay away, so it is no cause for a warning.
                level = logging.INFO if gone else logging.WARNING
                log.log(level, "data key unavailable for %gs: %s", self._unavailable.ttl, exc)
                self._unavailable.add(request, _unavailable_reason(exc), gone)

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(self.settings.key_refresh_seconds)
            try:
                self._cache.purge()
                await self.keystore.drop_destroyed()
                await self._load_keys()
            except (PgsealError, OSError, asyncpg.PostgresError) as exc:
                log.warning("data key refresh failed, cached keys stay in use: %s", exc)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        for task in (self._refresher, self._watcher, self._reloading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._rotator is not None:
            await self._rotator.stop()
        if self._pool is not None:
            await self._pool.close()
        self._cache.clear()
        if self._audit is not None:
            self._audit.close()
        self._log_keyring_calls()
        if self._started:
            log.info("pgseal stopped")

    def _log_keyring_calls(self) -> None:
        if self._keystore is None:
            return
        unwraps = self._keystore.unwrap_calls_by_keyring
        for keyring in self.keyrings:
            if not isinstance(keyring, RemoteKeyring):
                log.info(
                    "keyring %s: %d unwrap calls", keyring.name, unwraps[keyring.name]
                )
                continue
            operations = sorted(keyring.operations.items())
            log.info(
                "keyring %s: %d unwrap calls, %d %s calls (%s)",
                keyring.name,
                unwraps[keyring.name],
                keyring.calls,
                keyring.service,
                ", ".join(f"{name} {count}" for name, count in operations) or "none",
            )


async def _listen(handler: ConnectionHandler, host: str, port: int) -> Listener:
    """Start the listener. Raises ConfigError naming the address if that fails."""
    try:
        return await Listener.start(handler, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            advice = "stop the process that uses it, or choose another --listen port"
        else:
            advice = "check the host and port in --listen"
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; {advice}"
        ) from exc


def _count_relations(catalogs: Mapping[str, Catalog]) -> tuple[int, int]:
    """Count the ruled tables, and the views over them, of every database."""
    relations = [table for catalog in catalogs.values() for table in catalog.tables]
    views = sum(1 for table in relations if table.is_view)
    return len(relations) - views, views


def _unavailable_reason(exc: PgsealError) -> str:
    """Return why a data key is unavailable, in words fit for a client's error."""
    if isinstance(exc, KeyNotFoundError):
        return "it is not in the key store, for example because it was shredded"
    # The exception names keyrings and endpoints, which the log already has.
    return f"loading it failed ({type(exc).__name__}); the proxy log has the reason"


def _parse_keyrings(specs: tuple[str, ...]) -> tuple[Keyring, ...]:
    return tuple(parse_keyring_spec(spec) for spec in specs)


def _check_write_only(
    catalogs: dict[str, Catalog], keyrings: tuple[Keyring, ...]
) -> None:
    """Reject deterministic columns when no keyring can unwrap.

    A write-only proxy seals under a data key version of its own, so a value
    it seals would not equal the same value sealed by the other proxies,
    which breaks equality search, unique constraints and joins.
    """
    if any(keyring.can_unwrap for keyring in keyrings):
        return
    deterministic = sorted(
        column.identity
        for catalog in catalogs.values()
        for table in catalog.tables
        for column in table.encrypted.values()
        if algorithm_of(column) is Algorithm.AES_256_SIV
    )
    if deterministic:
        raise ConfigError(
            f"deterministic columns {', '.join(deterministic)} need a keyring "
            "that can unwrap, but every configured keyring is write-only (a "
            "sodium key directory without its private key): a write-only proxy "
            "seals under a data key version of its own, so equal values would no "
            "longer seal alike. Add a keyring that can unwrap, or run this proxy "
            "with rules that have no deterministic columns"
        )


def _folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of every rule file, to notice edits."""
    try:
        files = sorted(folder.glob("*.yaml"))
        return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()
