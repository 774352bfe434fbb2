"""The sans-IO session: one client connection's protocol state, without sockets.

The session takes whole messages from either side and returns what to send
to each side. It follows the server's prepared statements and portals as the
server itself does: a Parse or Bind takes effect when sent, and is undone when
the server reports an error, because the server then skips every message up
to the next Sync. Each DataRow is unsealed by the plan of the portal or simple
query it answers, never by whichever RowDescription was seen last.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from proxy.catalog import TEXT_OID
from proxy.crypto.subjects import KeyRequest, KeysNeeded, SubjectValue
from proxy.errors import (
    DecryptionError,
    KeyringError,
    KeyUnavailableError,
    ValueNotOpened,
    PgsealError,
    ProtocolError,
    StatementRejected,
)
from proxy.lookups import (
    KeyVersions,
    SealedStatement,
    check_versions,
    move_searches,
)
from proxy.sql.analyze import EMPTY_PLAN, StatementPlan
from proxy.sql.arrays import STORAGE_ARRAY_OIDS, storage_array_type
from proxy.sql.escape_strings import as_escape_strings
from proxy.sql.hidden_params import HiddenParams, hide_randomized_literals
from proxy.sql.prepared import SqlDeallocate, SqlPrepare, SqlPreparedStatements
from proxy.sql.prefilter import SYNTAX_ERROR
from proxy.text_forms import DEFAULT_SETTINGS, TextSettings, UnconvertibleParameter
from proxy.text_forms import type_name as binary_type_name
from proxy.sql.relations import CatalogStale
from proxy.wire import messages as m
from proxy.wire.client_encoding import decode_statement, encode_statement, python_codec
from proxy.wire.copy_relay import CopyFailure, CopyRelay
from proxy.wire.failed_statement import SQLSTATE, FailedStatement
from proxy.wire.frames import Frame, build

log = logging.getLogger(__name__)

RowPlan = tuple[tuple[int, Any, int, Any], ...]

_T = TypeVar("_T")

_SEAL_HINT = "Check that the proxy has loaded a data key for this column."

# SQLSTATE class 58 is for errors external to PostgreSQL itself: here a data
# key that no keyring of its set could unwrap, such as a KMS out of reach.
KEY_UNAVAILABLE = "58000"
_KEY_UNAVAILABLE_HINT = (
    "No keyring of the column's keyring set could unwrap the data key, for "
    "example because the KMS cannot be reached; see the proxy's log. The "
    "proxy tries again at every key refresh, and other columns keep working."
)

# Server messages passed on while the rest of a failed result is dropped.
_KEPT_DURING_FAILURE = frozenset(b"NAS")

# Sent in place of a rejected statement: it fails to parse on every server
# version, so the server itself reports the error and skips to Sync exactly
# as it would for any failed statement. The proxy then swaps the server's
# ErrorResponse for its own.
_REJECTED_QUERY = "PGSEAL REJECTED STATEMENT"
_REJECTED_STATEMENT = "\x01pgseal rejected statement"

_PREPARE_TAGS = (b"PREPARE", b"DEALLOCATE")
# Declared types whose values are text on the wire: varchar, bpchar, name, unknown.
_TEXT_LIKE = frozenset({25, 1043, 1042, 19, 705})

# CommandComplete tags after which relation OIDs or view definitions change.
_DDL_TAGS = (
    b"CREATE TABLE",
    b"ALTER TABLE",
    b"DROP TABLE",
    b"CREATE VIEW",
    b"ALTER VIEW",
    b"DROP VIEW",
    b"CREATE MATERIALIZED VIEW",
    b"ALTER MATERIALIZED VIEW",
    b"DROP MATERIALIZED VIEW",
    b"CREATE RULE",
    b"ALTER SCHEMA",
)
# DDL after which a new relation name may be a view over a ruled table.
_VIEW_DDL_TAGS = (
    b"CREATE VIEW",
    b"ALTER VIEW",
    b"ALTER TABLE",
    b"CREATE MATERIALIZED VIEW",
    b"ALTER MATERIALIZED VIEW",
    b"CREATE RULE",
    b"ALTER SCHEMA",
)


class Planner(Protocol):
    """The planning and sealing interface that the session calls."""

    def statement(
        self,
        sql: str,
        search_path: tuple[str, ...] | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> StatementPlan: ...

    def seal_statement(
        self, sql: str, plan: StatementPlan, encoding: str = "utf-8"
    ) -> SealedStatement: ...

    def key_versions(self, names: tuple[str, ...]) -> KeyVersions: ...
    def seal_param_versions(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes: ...

    def seal_param(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        associated: tuple[bytes | None, ...] = (),
        subject: SubjectValue | None = None,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes: ...

    def seal_array_param(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes: ...

    def seal_lookup_array(
        self,
        column: Any,
        value: bytes,
        fmt: int,
        declared_oid: int = 0,
        settings: TextSettings = DEFAULT_SETTINGS,
    ) -> bytes: ...

    def row_plan(
        self,
        fields: tuple[m.Field, ...],
        outputs: tuple[Any, ...] | None = None,
        formats: tuple[int, ...] = (),
        associations: dict[int, tuple[int, ...]] | None = None,
    ) -> RowPlan | None: ...

    def open_value(
        self, column: Any, value: bytes, fmt: int, associated: Any = ()
    ) -> bytes | None: ...


_UNSEALED = SealedStatement("")


@dataclass(slots=True)
class Statement:
    plan: StatementPlan
    fields: tuple[m.Field, ...] | None = None
    # Parameter types the client declared in Parse for encrypted columns,
    # which the proxy replaced by the storage type.
    declared: dict[int, int] = field(default_factory=dict)
    # Randomized literals sent to the server as parameters after the
    # client's own, and sealed at each Bind.
    hidden: HiddenParams | None = None
    # Parameter types as the client declared them in Parse.
    param_types: tuple[int, ...] = ()
    # The client's Parse text, kept to parse the statement again when the
    # live key versions that its sealed text depends on change.
    query: str = ""
    sealed: SealedStatement = _UNSEALED


@dataclass(slots=True)
class Portal:
    statement: Statement | None
    result_formats: tuple[int, ...] = ()
    row_plan: RowPlan | None = None
    # True once the row plan is known or a Describe of the portal was sent.
    # The server replies to that Describe before it sends any row of the portal.
    described: bool = False


@dataclass(slots=True)
class Pending:
    """A client message that still awaits the server's reply."""

    kind: str
    name: str = ""
    undo: Callable[[], None] | None = None
    portal: Portal | None = None
    statement: Statement | None = None
    hidden: bool = False
    rejection: StatementRejected | None = None
    plan: StatementPlan | None = None
    # SQL-level PREPARE and DEALLOCATE of the message, applied as each completes.
    sql_changes: deque[SqlPrepare | SqlDeallocate] = field(default_factory=deque)


@dataclass(slots=True)
class Output:
    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    close: bool = False
    # Set when a transaction that changed tables or views ended, so the
    # catalog is stale. The caller starts a reload before it sends on the
    # messages, and delays the session's next messages until it finished.
    catalog_changed: bool = False
    # Relations that a statement in `retry` writes and the catalog has not
    # seen; the caller reads the catalog again, then passes `retry` back.
    catalog_needed: tuple[str, ...] = ()
    # Data keys to fetch before the messages in `retry` can be handled; the
    # caller fetches them and passes `retry` to the same method again.
    keys_needed: tuple[KeyRequest, ...] = ()
    retry: list[Frame] = field(default_factory=list)


class Session:
    """Protocol state of one client connection to one database."""

    def __init__(self, planner: Planner | None, conn_id: str = "-", user: str = "") -> None:
        self._planner = planner
        self._conn_id = conn_id
        self._user = user
        # The session's search_path, or None while the proxy cannot tell it.
        self._search_path: tuple[str, ...] | None = None
        # Settings that decide how statement text and values read, as the
        # server last reported them in ParameterStatus.
        # NOTE: a statement that the client sends before the server reports
        # a change, as in a pipeline after SET, is read with the old value.
        self._client_encoding = "UTF8"
        self._server_encoding = "UTF8"
        self._codec: str | None = "utf-8"
        self._standard_strings = True
        self._text_settings = DEFAULT_SETTINGS
        self._statements: dict[str, Statement] = {}
        self._portals: dict[str, Portal] = {}
        self._pending: deque[Pending] = deque()
        self._skipping = False
        self._sql_prepared = SqlPreparedStatements()
        self._query_plan: RowPlan | None = None
        self._copy = CopyRelay(planner, conn_id)
        # Set from a result value that failed to open until ReadyForQuery.
        self._failed: FailedStatement | None = None
        self.transaction_status = "I"
        # DDL completed since the session was last idle, and whether any of
        # it could have made a view over a ruled table.
        self._ddl_open = False
        self._view_ddl_open = False
        # Relations a statement needed, and those that a catalog read after
        # that request has not found either.
        self._catalog_requested: tuple[str, ...] = ()
        self._catalog_checked: frozenset[str] = frozenset()
        # Set while the rest of a result whose value could not be opened is
        # dropped: "ready" until the server's ReadyForQuery, "aborting" while
        # the proxy's own failing statement aborts the server's transaction.
        self._failed_result: str | None = None
        self._client_handlers = {
            ord("P"): self._parse,
            ord("B"): self._bind,
            ord("D"): self._describe,
            ord("E"): self._execute,
            ord("C"): self._close,
            ord("S"): self._sync,
            ord("Q"): self._query,
            ord("F"): self._function_call,
            ord("d"): self._client_copy_data,
            ord("c"): self._client_copy_end,
            ord("f"): self._client_copy_end,
        }
        self._server_handlers = {
            ord("1"): self._answered,
            ord("2"): self._answered,
            ord("3"): self._answered,
            ord("T"): self._row_description,
            ord("t"): self._parameter_description,
            ord("n"): self._no_data,
            ord("D"): self._data_row,
            ord("C"): self._command_complete,
            ord("I"): self._command_complete,
            ord("s"): self._command_complete,
            ord("E"): self._error,
            ord("Z"): self._ready,
            ord("S"): self._parameter_status,
            ord("G"): self._copy_response,
            ord("H"): self._copy_response,
            ord("W"): self._copy_both_response,
            ord("d"): self._server_copy_data,
            ord("c"): self._server_copy_done,
        }

    # Client to server

    @property
    def passes_through(self) -> bool:
        """Tell whether every message passes unchanged: no rules apply here."""
        return self._planner is None

    def from_client(self, frames: list[Frame]) -> Output:
        out = Output()
        if self._planner is None:
            out.to_server.extend(frame.raw for frame in frames)
            return out
        # The caller retries right after the catalog read it was asked for.
        self._catalog_checked = frozenset(self._catalog_requested)
        self._catalog_requested = ()
        for position, frame in enumerate(frames):
            handler = self._client_handlers.get(frame.type)
            if handler is None:
                out.to_server.append(frame.raw)
            elif self._skipping and frame.type != ord("S"):
                # The server discards these unanswered until Sync, so
                # dropping them changes nothing for the client, and no
                # plaintext parameter or literal reaches the server.
                continue
            else:
                search_path = self._search_path
                try:
                    handler(frame, out)
                except KeysNeeded as exc:
                    # Handlers raise it before they change any state except
                    # the search_path, so the frame can be handled again.
                    self._search_path = search_path
                    out.keys_needed = exc.requests
                    out.retry = frames[position:]
                    return out
                except CatalogStale as exc:
                    self._search_path = search_path
                    self._catalog_requested = exc.relations
                    out.catalog_needed = exc.relations
                    out.retry = frames[position:]
                    return out
        return out

    def _parse(self, frame: Frame, out: Output) -> None:
        msg = m.Parse.decode(frame.payload)
        assert self._planner is not None
        pending = Pending("parse", msg.statement)
        try:
            text = self._statement_text(msg.query)
            plan = self._plan(text)
            sealed, hidden = self._seal_parse(text, plan, len(msg.param_types))
        except StatementRejected as exc:
            self._reject(pending, exc, out, m.Parse(msg.statement, _REJECTED_QUERY, ()))
            return
        statement = Statement(
            plan, hidden=hidden, param_types=msg.param_types, query=msg.query
        )
        statement.sealed = sealed
        types = self._parse_types(statement)
        pending.undo = self._define_statement(msg.statement, statement)
        self._pending.append(pending)
        query = sealed.text
        if query is text and types == msg.param_types:
            out.to_server.append(frame.raw)
        else:
            query = encode_statement(query, self._codec)
            out.to_server.append(m.Parse(msg.statement, query, types).encode())

    def _seal_parse(
        self, query: str, plan: StatementPlan, declared_count: int
    ) -> tuple[SealedStatement, HiddenParams | None]:
        """Seal the text of a Parse, and return its hidden parameters, if any.

        A statement may be executed many times, so randomized literals
        become hidden parameters, sealed afresh at every Bind. The other
        literals and the lookups are sealed in the text once.
        """
        hidden = None
        if plan.literals:
            hidden = hide_randomized_literals(query, plan.literals, declared_count)
        if hidden is None:
            return self._seal_statement(query, plan), None
        parse_plan = replace(
            plan,
            literals=hidden.sealed_at_parse,
            searches=move_searches(plan.searches, hidden.position),
        )
        return self._seal_statement(hidden.sql, parse_plan), hidden

    def _parse_types(self, statement: Statement) -> tuple[int, ...]:
        """Return the parameter types to send in Parse for the statement's text.

        Fills statement.declared with the client's types that were replaced.
        """
        statement.declared.clear()
        types = self._storage_types(
            statement.param_types,
            statement.plan,
            statement.declared,
            statement.sealed.arrays,
        )
        if statement.hidden is not None:
            types = statement.hidden.param_types(types)
        return types

    @staticmethod
    def _storage_types(
        types: tuple[int, ...],
        plan: StatementPlan,
        declared: dict[int, int],
        versioned: frozenset[int] = frozenset(),
    ) -> tuple[int, ...]:
        """Replace declared parameter types of encrypted columns by their storage type.

        The server stores ciphertext as text or bytea, so a parameter declared
        as, say, int4 would not fit; the declared type is kept to read the
        client's binary values. A `versioned` parameter becomes an array of
        the storage type.
        """
        if not plan.params or not types:
            return types
        result = list(types)
        for number, column in plan.params.items():
            index = number - 1
            if index >= len(result):
                continue
            oid = result[index]
            if number in versioned:
                if oid != 0:
                    declared[number] = oid
                result[index] = STORAGE_ARRAY_OIDS[column.storage_oid]
                continue
            if number in plan.arrays:
                stored = storage_array_type(oid, column.storage_oid)
                if stored != oid:
                    declared[number] = oid
                    result[index] = stored
                continue
            if oid in (0, column.storage_oid):
                continue
            if column.storage_oid == TEXT_OID and oid in _TEXT_LIKE and not column.retyped:
                # varchar and its kin carry the armoured text as they are.
                continue
            declared[number] = oid
            result[index] = column.storage_oid
        return tuple(result)

    def _statement_text(self, sql: str) -> str:
        """Return a message's statement text as the server reads it.

        It is decoded from the client encoding, and its plain string
        constants with backslashes become E'...' constants while
        standard_conforming_strings is off. Raises StatementRejected for text
        that the proxy cannot read as the server does.
        """
        text = decode_statement(sql, self._codec, self._client_encoding)
        if not self._standard_strings:
            text = as_escape_strings(text)
        return text

    def _seal_statement(self, sql: str, plan: StatementPlan) -> SealedStatement:
        """Seal the literals of `sql` and rewrite its lookups for the live key versions.

        The text is `sql` itself when nothing changes.
        """
        assert self._planner is not None
        if not (plan.literals or plan.searches or plan.version_checks):
            return SealedStatement(sql)
        try:
            return self._planner.seal_statement(sql, plan, self._codec or "utf-8")
        except KeyringError as exc:
            raise _unsealable("a literal", exc) from exc
        except ValueError as exc:
            # The error's text may quote part of the value, so it stays out.
            raise StatementRejected(
                "22P02",
                "a literal bound for an encrypted bytea column is not valid bytea",
            ) from exc

    def _plan(self, sql: str) -> StatementPlan:
        """Analyse `sql` for this session, and follow its SET search_path."""
        assert self._planner is not None
        path = self._search_path
        if path is not None:
            path = tuple(self._user if name == "$user" else name for name in path)
        plan = self._sql_prepared.apply(self._statement_plan(sql, path), sql)
        if plan.sql_executes:
            self._check_sql_executes(plan)
        if plan.sql_prepared:
            stamped = tuple(map(self._stamp, plan.sql_prepared))
            plan = replace(plan, sql_prepared=stamped)
        if plan.search_path is not None:
            self._search_path = plan.search_path.value
        return plan

    def _stamp(self, change: SqlPrepare | SqlDeallocate) -> SqlPrepare | SqlDeallocate:
        """Record in a PREPARE the key versions its sealed literals depend on."""
        assert self._planner is not None
        if isinstance(change, SqlDeallocate) or not change.keys:
            return change
        return replace(change, versions=self._planner.key_versions(change.keys))

    def _check_sql_executes(self, plan: StatementPlan) -> None:
        """Reject an EXECUTE whose PREPARE sealed literals under other key versions."""
        assert self._planner is not None
        for execute in plan.sql_executes:
            prepared = self._sql_prepared.get(execute.name)
            if prepared is None or prepared.versions is None:
                continue
            current = self._planner.key_versions(prepared.keys)
            if current != prepared.versions:
                # While several versions are live, PREPARE again would fail
                # too, so that rejection comes first.
                check_versions(plan, dict(current))
                raise StatementRejected(
                    "0A000",
                    f"prepared statement {execute.name!r} was prepared under other "
                    f"data key versions of {', '.join(prepared.keys)}, so its "
                    "encrypted literals and lookups would miss rows",
                    f"Run DEALLOCATE {execute.name} and PREPARE it again.",
                )

    def _statement_plan(self, sql: str, path: tuple[str, ...] | None) -> StatementPlan:
        """Plan `sql`; raise CatalogStale when it writes a relation not yet looked up.

        A relation that a fresh catalog read did not find either does not
        exist, or DDL in this session's open transaction created it, which
        the proxy's own connection cannot see yet.
        """
        assert self._planner is not None
        try:
            return self._planner.statement(sql, path)
        except CatalogStale as exc:
            if not set(exc.relations) <= self._catalog_checked:
                raise
            if self._view_ddl_open:
                raise StatementRejected(
                    "0A000",
                    f"relation {exc.relations[0]} is not known to the proxy: DDL in "
                    "the open transaction may have made it a view over an "
                    "encrypted table, and the proxy sees DDL only once committed",
                    "Commit the DDL, then write to the relation in a new "
                    "transaction.",
                ) from None
            return self._planner.statement(sql, path, self._catalog_checked)

    def _define_statement(self, name: str, statement: Statement) -> Callable[[], None]:
        return _replace(self._statements, name, statement)

    def _bind(self, frame: Frame, out: Output) -> None:
        payload = frame.payload
        portal_name, statement_name = _bind_names(payload)
        statement = self._statements.get(statement_name)
        portal = Portal(statement)
        pending = Pending("bind", portal_name, portal=portal)
        raw = frame.raw
        if statement is not None and statement.sealed.versions:
            try:
                self._reseal_if_stale(statement_name, statement, portal_name, out)
            except StatementRejected as exc:
                bad = m.Bind(portal_name, _REJECTED_STATEMENT, (), (), ())
                self._reject(pending, exc, out, bad)
                return
        if statement is not None and (
            statement.plan.params
            or statement.fields is not None
            or statement.hidden is not None
        ):
            msg = m.Bind.decode(payload)
            portal.result_formats = msg.result_formats
            if statement.fields is not None:
                portal.row_plan = self._row_plan(
                    statement.fields, msg.result_formats, statement.plan
                )
                portal.described = True
            if statement.plan.params or statement.hidden is not None:
                try:
                    raw = self._seal_params(msg, statement)
                except StatementRejected as exc:
                    bad = m.Bind(portal_name, _REJECTED_STATEMENT, (), (), ())
                    self._reject(pending, exc, out, bad)
                    return
        pending.undo = self._define_portal(portal_name, portal)
        self._pending.append(pending)
        out.to_server.append(raw)

    def _reseal_if_stale(
        self, name: str, statement: Statement, portal_name: str, out: Output
    ) -> None:
        """Parse the statement again if the key versions its text depends on changed.

        A rotation or retirement since the Parse would otherwise make its
        lookups miss rows, or its literals seal under a retired version. The
        proxy closes the server's statement and parses it again under the same
        name, hiding both replies from the client.
        """
        assert self._planner is not None
        if self.transaction_status == "E":
            # The server rejects this Bind anyway, and a Parse would fail
            # after the Close, leaving the client's statement closed.
            return
        key_names = tuple(key_name for key_name, _ in statement.sealed.versions)
        if self._planner.key_versions(key_names) == statement.sealed.versions:
            return
        # Closing the statement closes its portals on the server too.
        if any(
            portal.statement is statement
            for other, portal in self._portals.items()
            if other and other != portal_name
        ):
            raise StatementRejected(
                "0A000",
                f"prepared statement {name!r} must be parsed again because the data "
                "key versions of its encrypted columns changed, but a portal of it "
                "is still open",
                "Close the portal or end the transaction, then run the statement "
                "again.",
            )
        sealed, hidden = self._seal_parse(
            statement.query, statement.plan, len(statement.param_types)
        )
        statements = self._statements

        def forget() -> None:
            if statements.get(name) is statement:
                del statements[name]

        # The Close and Parse are sent even if sealing the parameters below
        # raises KeysNeeded. The Bind is then handled again after them, and
        # finds the statement current.
        statement.sealed = sealed
        statement.hidden = hidden
        types = self._parse_types(statement)
        self._pending.append(Pending("close", name, hidden=True))
        self._pending.append(Pending("parse", name, undo=forget, hidden=True))
        out.to_server.append(build(b"C", b"S" + name.encode("utf-8") + b"\0"))
        out.to_server.append(m.Parse(name, sealed.text, types).encode())
        log.debug(
            "[%s] parsed statement %r again for new key versions", self._conn_id, name
        )

    def _seal_params(self, msg: m.Bind, statement: Statement) -> bytes:
        assert self._planner is not None
        plan = statement.plan
        params = list(msg.params)
        for number, column in plan.params.items():
            index = number - 1
            if index >= len(params) or params[index] is None:
                continue
            value = params[index]
            assert value is not None
            fmt = msg.param_format(index)
            declared = statement.declared.get(number, 0)
            settings = self._text_settings
            try:
                if number in plan.lookup_arrays:
                    params[index] = self._planner.seal_lookup_array(
                        column, value, fmt, declared, settings=settings
                    )
                elif number in plan.arrays:
                    params[index] = self._planner.seal_array_param(
                        column, value, fmt, declared, settings=settings
                    )
                elif number in statement.sealed.arrays:
                    params[index] = self._planner.seal_param_versions(
                        column, value, fmt, declared, settings=settings
                    )
                else:
                    associated = self._associated_params(msg, statement, number)
                    subject = None
                    if number in plan.subjects:
                        subject = _subject_value(plan.subjects[number], msg, self._codec)
                    params[index] = self._planner.seal_param(
                        column,
                        value,
                        fmt,
                        declared,
                        associated,
                        subject,
                        settings=settings,
                    )
            except KeyringError as exc:
                raise _unsealable(f"parameter ${number}", exc) from exc
            except UnconvertibleParameter as exc:
                raise StatementRejected(
                    "0A000",
                    f"parameter ${number} for encrypted column {column.identity} "
                    f"cannot be sealed: {exc}",
                    f"Send the value in text format, or as a string; "
                    f"it was sent in binary format as {binary_type_name(declared)}.",
                ) from exc
            except (ValueError, IndexError, struct.error) as exc:
                # The error's text may quote part of the value, so it stays out.
                kind = "array" if number in plan.arrays else column.logical.name
                raise StatementRejected(
                    "22P02", f"parameter ${number} is not valid {kind} input"
                ) from exc
        formats = msg.param_formats
        if statement.hidden is not None:
            hidden = self._seal_hidden(statement.hidden)
            if formats:
                # Hidden parameters are sent in text format, so the codes
                # are spelled out for every parameter.
                own = tuple(msg.param_format(i) for i in range(len(params)))
                formats = own + (m.TEXT_FORMAT,) * len(hidden)
            params.extend(hidden)
        sealed = m.Bind(
            msg.portal, msg.statement, formats, tuple(params), msg.result_formats
        )
        return sealed.encode()

    def _seal_hidden(self, hidden: HiddenParams) -> list[bytes | None]:
        """Seal each hidden literal afresh, in text format."""
        assert self._planner is not None
        values: list[bytes | None] = []
        planner = self._planner
        for slot in hidden.slots:
            try:
                literal = slot.value.encode(self._codec or "utf-8")
                if slot.array:
                    sealed = planner.seal_array_param(slot.column, literal, m.TEXT_FORMAT)
                else:
                    sealed = planner.seal_param(slot.column, literal, m.TEXT_FORMAT)
                values.append(sealed)
            except KeyringError as exc:
                raise _unsealable("a literal", exc) from exc
            except ValueError as exc:
                # Parse checked the literal already. The error's text may
                # quote part of the value, so it stays out.
                raise StatementRejected(
                    "22P02",
                    f"a literal for encrypted column {slot.column.identity} is not "
                    f"valid {slot.column.logical.name} input",
                ) from exc
        return values

    def _associated_params(
        self, msg: m.Bind, statement: Statement, number: int
    ) -> tuple[bytes | None, ...]:
        """Return the canonical associated values that sealing parameter `number` binds.

        Raises StatementRejected when one of them is not valid input for its
        column, which the server would reject too.
        """
        values = []
        for source in statement.plan.bindings.get(number, ()):
            if source.param is None:
                literal = source.literal
                raw = None if literal is None else literal.encode(self._codec or "utf-8")
                fmt, declared = m.TEXT_FORMAT, 0
            else:
                index = source.param - 1
                raw = msg.params[index] if index < len(msg.params) else None
                fmt = msg.param_format(index)
                types = statement.param_types
                declared = types[index] if index < len(types) else 0
            try:
                values.append(source.column.canonical(raw, fmt, declared))
            except (ValueError, UnicodeError, struct.error) as exc:
                where = f"parameter ${source.param}" if source.param else "a literal"
                raise StatementRejected(
                    "22P02",
                    f"{where} for column {source.column.name} is not valid "
                    f"{source.column.type.name} input",
                ) from exc
        return tuple(values)

    def _define_portal(self, name: str, portal: Portal) -> Callable[[], None]:
        return _replace(self._portals, name, portal)

    def _describe(self, frame: Frame, out: Output) -> None:
        kind, name = m.decode_target(frame.payload)
        # The reply updates the statement or portal that has this name now,
        # because a later Parse or Bind may reuse the name before it arrives.
        pending = Pending("describe-" + kind, name)
        if kind == "S":
            pending.statement = self._statements.get(name)
        else:
            pending.portal = self._portals.get(name)
            if pending.portal is not None:
                pending.portal.described = True
        self._pending.append(pending)
        out.to_server.append(frame.raw)

    def _execute(self, frame: Frame, out: Output) -> None:
        name, _ = m.decode_execute(frame.payload)
        portal = self._portals.get(name)
        if portal is None or not portal.described:
            # The proxy cannot unseal rows it has no description for, so it
            # sends a Describe of its own and drops the reply.
            if portal is None:
                portal = Portal(None)
                self._define_portal(name, portal)
            portal.described = True
            self._pending.append(Pending("describe-P", name, portal=portal, hidden=True))
            out.to_server.append(m.encode_describe("P", name))
        pending = Pending("execute", name, portal=portal)
        self._pending.append(pending)
        if portal.statement is not None:
            pending.sql_changes.extend(portal.statement.plan.sql_prepared)
            self._copy.statement_sent(portal.statement.plan.copy)
        out.to_server.append(frame.raw)

    def _close(self, frame: Frame, out: Output) -> None:
        kind, name = m.decode_target(frame.payload)
        if kind == "S":
            undo = _replace(self._statements, name, None)
        else:
            undo = _replace(self._portals, name, None)
        self._pending.append(Pending("close", name, undo=undo))
        out.to_server.append(frame.raw)

    def _sync(self, frame: Frame, out: Output) -> None:
        self._skipping = False
        self._pending.append(Pending("sync"))
        out.to_server.append(frame.raw)

    def _query(self, frame: Frame, out: Output) -> None:
        assert self._planner is not None
        sql = m.decode_query(frame.payload)
        pending = Pending("query")
        try:
            text = self._statement_text(sql)
            plan = self._plan(text)
            sealed = self._seal_statement(text, plan).text
        except StatementRejected as exc:
            self._reject(pending, exc, out, None)
            return
        pending.plan = plan
        pending.sql_changes.extend(plan.sql_prepared)
        self._pending.append(pending)
        self._copy.statement_sent(plan.copy)
        if sealed is not sql:
            out.to_server.append(m.encode_query(encode_statement(sealed, self._codec)))
        else:
            out.to_server.append(frame.raw)

    def _function_call(self, frame: Frame, out: Output) -> None:
        self._pending.append(Pending("query"))
        out.to_server.append(frame.raw)

    def _reject(
        self,
        pending: Pending,
        exc: StatementRejected,
        out: Output,
        replacement: m.Parse | m.Bind | None,
    ) -> None:
        if exc.sqlstate == SYNTAX_ERROR:
            # pglast's message quotes the text near the error, which may be
            # a value to seal, so the log gets only the fact.
            log.info("[%s] rejected a statement that does not parse", self._conn_id)
        else:
            log.info("[%s] rejected statement: %s", self._conn_id, exc.message)
        pending.rejection = exc
        self._pending.append(pending)
        if replacement is None:
            out.to_server.append(m.encode_query(_REJECTED_QUERY))
        else:
            out.to_server.append(replacement.encode())

    # Server to client

    def from_server(self, frames: list[Frame]) -> Output:
        out = Output()
        if self._planner is None:
            out.to_client.extend(frame.raw for frame in frames)
            return out
        for position, frame in enumerate(frames):
            handler = self._server_handlers.get(frame.type)
            if self._failed_result is not None:
                self._after_failed_value(frame, out)
            elif self._failed is not None:
                self._while_failed(self._failed, frame, out)
            elif handler is None:
                out.to_client.append(frame.raw)
            else:
                try:
                    handler(frame, out)
                except KeysNeeded as exc:
                    out.keys_needed = exc.requests
                    out.retry = frames[position:]
                    return out
            if out.close:
                break
        return out

    def _front(self) -> Pending | None:
        return self._pending[0] if self._pending else None

    def _answered(self, frame: Frame, out: Output) -> None:
        if self._pending and self._pending.popleft().hidden:
            return
        out.to_client.append(frame.raw)

    def _row_description(self, frame: Frame, out: Output) -> None:
        front = self._front()
        fields = m.decode_row_description(frame.payload)
        if front is None or front.kind == "query":
            self._query_plan = self._row_plan(fields, (), front.plan if front else None)
            out.to_client.append(_with_logical_types(frame, fields, self._query_plan))
            return
        if not front.kind.startswith("describe"):
            # Only a Describe or a simple query gets a RowDescription.
            log.warning(
                "[%s] RowDescription received with no pending Describe", self._conn_id
            )
            out.to_client.append(frame.raw)
            return
        plan = self._described(front, fields)
        self._pending.popleft()
        if not front.hidden:
            out.to_client.append(_with_logical_types(frame, fields, plan))

    def _parameter_description(self, frame: Frame, out: Output) -> None:
        """Show encrypted parameters with their logical type, not the storage type."""
        front = self._front()
        statement = front.statement if front is not None else None
        if statement is None or (
            not statement.plan.params and statement.hidden is None
        ):
            out.to_client.append(frame.raw)
            return
        types = list(m.decode_parameter_description(frame.payload))
        for number, column in statement.plan.params.items():
            if number > len(types):
                continue
            # The server reports what the client declared; a type the proxy
            # replaced for the server is shown as the client declared it.
            if number in statement.sealed.arrays:
                types[number - 1] = statement.declared.get(number, column.logical.oid)
            elif number in statement.declared:
                types[number - 1] = statement.declared[number]
            elif column.retyped and number not in statement.plan.arrays:
                types[number - 1] = column.logical.oid
        if statement.hidden is not None:
            # The client sees only its own parameters, as the server would show.
            del types[statement.hidden.client_count :]
        out.to_client.append(m.encode_parameter_description(tuple(types)))

    def _parameter_status(self, frame: Frame, out: Output) -> None:
        # Servers that report search_path (PostgreSQL 18 does) say exactly
        # what it is after every change, whatever changed it.
        out.to_client.append(frame.raw)
        name, _, rest = bytes(frame.payload).partition(b"\0")
        value = rest.rstrip(b"\0").decode("utf-8", "replace")
        if name == b"search_path":
            self._search_path = parse_search_path(value)
        elif name == b"client_encoding":
            self._client_encoding = value
        elif name == b"server_encoding":
            self._server_encoding = value
        elif name == b"standard_conforming_strings":
            self._standard_strings = value.lower() == "on"
        elif name == b"DateStyle":
            self._text_settings = replace(self._text_settings, date_style=value)
        elif name == b"TimeZone":
            self._text_settings = replace(self._text_settings, time_zone=value)
        self._codec = python_codec(self._client_encoding, self._server_encoding)

    def _no_data(self, frame: Frame, out: Output) -> None:
        front = self._front()
        if front is not None and front.kind.startswith("describe"):
            self._described(front, ())
            self._pending.popleft()
            if front.hidden:
                return
        out.to_client.append(frame.raw)

    def _described(self, front: Pending, fields: tuple[m.Field, ...]) -> RowPlan | None:
        """Record the reply to a Describe and return the row plan it implies."""
        if front.kind == "describe-S":
            statement = front.statement
            if statement is None:
                return None
            statement.fields = fields
            return self._row_plan(fields, (), statement.plan)
        portal = front.portal
        if portal is None:
            return None
        # A portal's RowDescription already carries its result formats.
        plan = portal.statement.plan if portal.statement else None
        formats = tuple(f.format for f in fields)
        portal.row_plan = self._row_plan(fields, formats, plan)
        portal.described = True
        return portal.row_plan

    def _row_plan(
        self,
        fields: tuple[m.Field, ...],
        formats: tuple[int, ...],
        statement: StatementPlan | None,
    ) -> RowPlan | None:
        assert self._planner is not None
        if statement is None:
            return self._planner.row_plan(fields, None, formats)
        return self._planner.row_plan(
            fields, statement.outputs, formats, statement.associations
        )

    def _data_row(self, frame: Frame, out: Output) -> None:
        front = self._front()
        if front is None or front.kind == "query":
            plan = self._query_plan
        else:
            plan = front.portal.row_plan if front.portal else None
        if plan is None:
            out.to_client.append(frame.raw)
            return
        try:
            out.to_client.append(self._open_row(frame, plan))
        except (ProtocolError, KeysNeeded):
            raise
        except KeyUnavailableError as exc:
            self._fail_result(exc, out)
        except (DecryptionError, KeyringError) as exc:
            log.info(
                "[%s] a result value failed to open (%s); failing the statement",
                self._conn_id,
                type(exc).__name__,
            )
            self._failed = FailedStatement(exc)
        except PgsealError as exc:
            self._fail_row(exc, out)

    def _while_failed(self, failed: FailedStatement, frame: Frame, out: Output) -> None:
        """Handle a server message between a failed result value and ReadyForQuery.

        Each message still updates the session's state, but only
        ParameterStatus, NotificationResponse and NoticeResponse reach the
        client.
        """
        kind = frame.type
        if failed.aborting:
            # The reply to the statement that aborts the server's transaction.
            if kind == ord("Z"):
                self._failed = None
                self.transaction_status = chr(frame.raw[5])
                out.to_client.append(frame.raw)
            return
        if kind in (ord("S"), ord("A"), ord("N")):
            self._server_handlers.get(kind, _forward)(frame, out)
            return
        handler = self._server_handlers.get(kind)
        if handler is not None and kind != ord("D"):
            handler(frame, Output())
        if kind == ord("Z"):
            self._finish_failed(failed, frame, out)
        else:
            failed.note(kind, frame.raw[5:30])

    def _finish_failed(self, failed: FailedStatement, frame: Frame, out: Output) -> None:
        """Report the failed statement at its ReadyForQuery, or end the connection."""
        if failed.changed or self._pending:
            # The server did more than read, or already replies to later
            # messages of the client, so an error would misstate the outcome.
            self._failed = None
            self._fail_row(failed.error, out)
            return
        out.to_client.append(m.encode_error(SQLSTATE, failed.message, failed.hint))
        if self.transaction_status == "T":
            failed.aborting = True
            out.to_server.append(m.encode_query(_REJECTED_QUERY))
            return
        self._failed = None
        out.to_client.append(frame.raw)

    def _open_row(self, frame: Frame, plan: RowPlan) -> bytes:
        assert self._planner is not None
        values = m.decode_data_row(frame.payload)
        for index, column, fmt, associated_fields in plan:
            if index >= len(values):
                raise ProtocolError(
                    f"DataRow has {len(values)} columns but its RowDescription "
                    f"has more than {index}"
                )
            value = values[index]
            if value is None:
                continue
            # () for a column without associated columns, None when the row
            # lacks them. Associated columns are plain, so values[i] is the
            # server's value.
            associated = associated_fields
            if associated_fields:
                associated = tuple(
                    (values[i] if i < len(values) else None, f)
                    for i, f in associated_fields
                )
            try:
                values[index] = self._planner.open_value(column, value, fmt, associated)
            except KeyUnavailableError as exc:
                raise KeyUnavailableError(
                    f"{exc}, so a value of column {column[0].identity} cannot be opened"
                ) from exc
            except DecryptionError as exc:
                if type(exc) is not DecryptionError:
                    raise
                raise ValueNotOpened(column[0].identity) from exc
        return m.encode_data_row(values)

    def _fail_row(self, exc: PgsealError, out: Output) -> None:
        # Where the statement cannot get an error of its own (see
        # proxy.wire.failed_statement), ending the connection is the one
        # outcome that both sides agree on. Columns that set on_decrypt_error
        # to null or ciphertext never get here.
        log.warning("[%s] closing connection: a result value failed to open (%s)",
                    self._conn_id, type(exc).__name__)
        failed = FailedStatement(exc)
        out.to_client.append(
            m.encode_error(SQLSTATE, failed.message, failed.hint, severity="FATAL")
        )
        out.close = True

    def _fail_result(self, exc: KeyUnavailableError, out: Output) -> None:
        """Fail the statement whose result contains a value that cannot be opened.

        The client gets an ErrorResponse in place of the rest of the result,
        and the connection stays open. The server ran the statement, so the
        proxy makes its transaction fail too, as it would for an error of its
        own: in a transaction block the server is left in the failed state
        ('E'), and a batch of the extended protocol whose Sync is still to
        come is rolled back. Only when the client has already sent further
        statements, which the server may run first, is the connection ended.
        """
        front = self._front()
        rest = [pending.kind for pending in self._pending][1:]
        alone = front is not None and (
            (front.kind == "query" and not rest)
            or (front.kind == "execute" and rest in ([], ["sync"]))
        )
        if front is None or not alone:
            self._fail_row(exc, out)
            return
        # NOTE: outside a transaction block the server commits before its
        # ReadyForQuery, so a write with RETURNING, and later statements of
        # the same simple query, stay committed although the client sees an error.
        log.warning("[%s] statement failed: %s", self._conn_id, exc)
        out.to_client.append(
            m.encode_error(KEY_UNAVAILABLE, str(exc), _KEY_UNAVAILABLE_HINT)
        )
        self._failed_result = "ready"
        self._query_plan = None
        if front.kind == "execute":
            self._skip_to_sync()
            if not self._pending:
                # No Sync yet: a Parse that fails makes the server skip to
                # the client's Sync, which then rolls the batch back.
                failing = m.Parse(_REJECTED_STATEMENT, _REJECTED_QUERY, ())
                out.to_server.append(failing.encode())

    def _after_failed_value(self, frame: Frame, out: Output) -> None:
        """Drop the server's messages up to the end of the failed statement."""
        if frame.type in _KEPT_DURING_FAILURE:
            handler = self._server_handlers.get(frame.type)
            if handler is None:
                out.to_client.append(frame.raw)
            else:
                handler(frame, out)
            return
        if frame.type != ord("Z"):
            return
        status = chr(frame.raw[5])
        if self._failed_result == "ready":
            if self._pending and self._pending[0].kind in ("sync", "query"):
                self._pending.popleft()
            if status == "T":
                self._abort_server_transaction(out)
                return
        self._failed_result = None
        self._query_plan = None
        self.transaction_status = status
        if status == "I":
            self._end_portals()
        out.to_client.append(frame.raw)

    def _abort_server_transaction(self, out: Output) -> None:
        # The server's transaction block is still healthy, but the client
        # saw an error, so it must be in the failed state on both sides.
        if self._pending:
            # The client sent more messages while the result arrived, and the
            # server would run them before the proxy's failing statement, so
            # only closing is safe.
            self._fail_row(
                KeyUnavailableError("a result value could not be opened"), out
            )
            return
        self._failed_result = "aborting"
        out.to_server.append(m.encode_query(_REJECTED_QUERY))

    # COPY

    def _copy_response(self, frame: Frame, out: Output) -> None:
        out.to_client.append(frame.raw)
        plan = self._front_plan()
        self._copy.server_started(frame, plan.copy if plan is not None else None)

    def _copy_both_response(self, frame: Frame, out: Output) -> None:
        """Start a replication stream, which passes both ways unchanged.

        Only START_REPLICATION on a replication connection gets a
        CopyBothResponse. The stream carries WAL or logical decoding output,
        whose values of encrypted columns are ciphertext as stored, and the
        proxy never opens them: no COPY plan may apply to it.
        """
        self._copy.reset()
        out.to_client.append(frame.raw)

    def _front_plan(self) -> StatementPlan | None:
        front = self._front()
        if front is None:
            return None
        if front.kind == "query":
            return front.plan
        if front.kind == "execute" and front.portal and front.portal.statement:
            return front.portal.statement.plan
        return None

    def _client_copy_data(self, frame: Frame, out: Output) -> None:
        out.to_server.extend(self._copy.client_data(frame))

    def _client_copy_end(self, frame: Frame, out: Output) -> None:
        out.to_server.extend(self._copy.client_end(frame))

    def _server_copy_data(self, frame: Frame, out: Output) -> None:
        try:
            out.to_client.extend(self._copy.server_data(frame))
        except CopyFailure as exc:
            if isinstance(exc.__cause__, KeyUnavailableError):
                self._copy.reset()
                self._fail_result(exc.__cause__, out)
            else:
                self._fail_row(exc, out)

    def _server_copy_done(self, frame: Frame, out: Output) -> None:
        try:
            out.to_client.extend(self._copy.server_done(frame))
        except KeysNeeded:
            raise
        except PgsealError as exc:
            self._fail_row(exc, out)

    def _command_complete(self, frame: Frame, out: Output) -> None:
        tag = frame.raw[5:30]
        if tag.startswith(_DDL_TAGS):
            self._ddl_open = True
            self._view_ddl_open |= tag.startswith(_VIEW_DDL_TAGS)
        elif tag.startswith(b"SELECT"):
            plan = self._front_plan()
            if plan is not None and plan.creates_relation:
                self._ddl_open = True
                self._view_ddl_open = True
        front = self._front()
        if front is not None and front.sql_changes and tag.startswith(_PREPARE_TAGS):
            self._sql_prepared.commit(front.sql_changes.popleft())
        if front is None or front.kind == "query":
            self._query_plan = None
        elif front.kind == "execute":
            self._pending.popleft()
        out.to_client.append(frame.raw)

    def _error(self, frame: Frame, out: Output) -> None:
        self._copy.reset()
        front = self._front()
        if front is not None and front.rejection is not None:
            exc = front.rejection
            out.to_client.append(
                m.encode_error(exc.sqlstate, exc.message, exc.hint, position=exc.position)
            )
        else:
            out.to_client.append(frame.raw)
        if front is None or front.kind == "query":
            self._query_plan = None
            return
        self._skip_to_sync()
        if front.kind == "parse" and front.name == "":
            # The server drops the old unnamed statement before it parses
            # the new one, so a failed Parse leaves no unnamed statement.
            self._statements.pop("", None)

    def _skip_to_sync(self) -> None:
        """Undo the failed message and every one the server skips after it."""
        skipped = []
        while self._pending and self._pending[0].kind != "sync":
            skipped.append(self._pending.popleft())
        # Newest first, so that a Close then a Parse of the same name ends
        # with the statement that was there before both.
        for pending in reversed(skipped):
            if pending.undo is not None:
                pending.undo()
        if not self._pending:
            self._skipping = True

    def _ready(self, frame: Frame, out: Output) -> None:
        if self._pending and self._pending[0].kind in ("sync", "query"):
            self._pending.popleft()
        self._query_plan = None
        self.transaction_status = chr(frame.raw[5])
        if self.transaction_status == "I":
            self._end_portals()
            # The proxy reads the catalog on its own connection, which sees
            # DDL only once its transaction has ended.
            out.catalog_changed = self._ddl_open
            self._ddl_open = False
            self._view_ddl_open = False
        out.to_client.append(frame.raw)

    def _end_portals(self) -> None:
        """Forget the portals of the transaction that just ended.

        Portals bound by a later batch that the server has not reached yet
        belong to the next transaction, so they stay.
        """
        in_flight = [p.portal for p in self._pending if p.kind == "bind"]
        self._portals = {
            name: portal
            for name, portal in self._portals.items()
            if any(portal is bound for bound in in_flight)
        }


def _forward(frame: Frame, out: Output) -> None:
    out.to_client.append(frame.raw)


def _replace(table: dict[str, _T], name: str, value: _T | None) -> Callable[[], None]:
    """Set or remove `table[name]` and return a function that restores the old entry."""
    previous = table.get(name)
    if value is None:
        table.pop(name, None)
    else:
        table[name] = value

    def undo() -> None:
        if previous is None:
            table.pop(name, None)
        else:
            table[name] = previous

    return undo



def _unsealable(what: str, exc: KeyringError) -> StatementRejected:
    """Build the rejection of a value whose data key is missing.

    A key that may load later, as while the KMS is unreachable, gets 58000;
    any other keyring failure gets 22023.
    """
    if isinstance(exc, KeyUnavailableError):
        return StatementRejected(
            KEY_UNAVAILABLE, f"{what} could not be sealed: {exc}", _KEY_UNAVAILABLE_HINT
        )
    return StatementRejected("22023", f"{what} could not be sealed: {exc}", _SEAL_HINT)

def _subject_value(source: Any, msg: m.Bind, codec: str | None) -> SubjectValue | None:
    """Return a row's subject value from a Bind, or None when it is NULL or absent."""
    if source.param is None:
        return SubjectValue(source.literal.encode(codec or "utf-8"))
    index = source.param - 1
    if index >= len(msg.params) or msg.params[index] is None:
        return None
    raw = msg.params[index]
    assert raw is not None
    return SubjectValue(raw, msg.param_format(index))


def _bind_names(payload: memoryview) -> tuple[str, str]:
    data = bytes(payload[:512]) if len(payload) > 512 else bytes(payload)
    first = data.find(b"\0")
    second = data.find(b"\0", first + 1)
    if first < 0 or second < 0:
        full = bytes(payload)
        first = full.find(b"\0")
        second = full.find(b"\0", first + 1)
        data = full
    return (
        data[:first].decode("utf-8", "surrogateescape"),
        data[first + 1 : second].decode("utf-8", "surrogateescape"),
    )


__all__ = ["EMPTY_PLAN", "Output", "Planner", "Session"]


def _with_logical_types(
    frame: Frame, fields: tuple[m.Field, ...], plan: RowPlan | None
) -> bytes:
    """Return the RowDescription with encrypted fields shown in their logical type."""
    if plan is None:
        return frame.raw
    retyped = list(fields)
    changed = False
    for index, columns, _, _ in plan:
        logical = columns[0].logical
        if columns[0].retyped and fields[index].type_oid != logical.oid:
            retyped[index] = replace(
                fields[index], type_oid=logical.oid, type_size=logical.size, type_modifier=-1
            )
            changed = True
    return m.encode_row_description(tuple(retyped)) if changed else frame.raw


def parse_search_path(value: str) -> tuple[str, ...]:
    """Split a search_path setting into schema names, unquoting quoted ones."""
    names = []
    current = ""
    quoted = False
    i = 0
    while i < len(value):
        char = value[i]
        if char == '"':
            if quoted and value[i + 1 : i + 2] == '"':
                current += '"'
                i += 1
            else:
                quoted = not quoted
        elif char == "," and not quoted:
            names.append(current.strip())
            current = ""
        elif quoted or not char.isspace():
            current += char
        i += 1
    if current.strip():
        names.append(current.strip())
    return tuple(names)
