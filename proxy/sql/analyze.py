"""Statement analysis: which values reach which encrypted column.

A statement is parsed with pglast (libpg_query, the server's own grammar) and
walked as the parse tree's JSON form. The result says which parameters and
which literals must be sealed, and for which column. A statement that would
let the server store plaintext in an encrypted column, or compute on
ciphertext, raises StatementRejected instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import cachetools
from pglast import parser

from proxy.catalog import Catalog, EncryptedColumn, RuledTable
from proxy.errors import StatementRejected
from proxy.rules import Encryption
from proxy.sql import associated as assoc
from proxy.sql.batch_insert import UnsealableSelect, plan_batch_insert
from proxy.sql.bound_outputs import associate_outputs
from proxy.sql.ddl import check_ddl
from proxy.sql.literals import (
    LiteralSlot,
    column_ref_span,
    find_literal_span,
    value_span,
)
from proxy.sql.outputs import Trace, passes_through, trace_expression, trace_select
from proxy.sql.prefilter import UNICODE_IDENTIFIER, NameFilter, fold_case, syntax_error
from proxy.sql.prepared import SqlDeallocate, SqlExecute, SqlPrepare
from proxy.sql.relations import check_relations, write_needs_analysis
from proxy.sql.subjects import (
    SubjectSource,
    missing_subject,
    value_subject,
    where_subject,
)
from proxy.wire.copy import CopyOptions

Node = dict[str, Any]

FEATURE_NOT_SUPPORTED = "0A000"

_PASS_THROUGH_HINT = (
    "Encrypted columns can only be stored, returned and tested for NULL; "
    "compute on them in the application."
)
_TEXT_CASTS = {"text", "varchar", "bytea", "bpchar"}
_WRITES = ("InsertStmt", "UpdateStmt", "MergeStmt")
_UNSUPPORTED = {
    "DoStmt": "a DO block",
    "MergeStmt": "MERGE",
    "CreateFunction": "a function body",
    "CreateProcedure": "a procedure body",
    # A trigger function or a rule's actions run on the server, where they
    # could store plaintext, such as a trigger that sets NEW.col.
    "CreateTrigStmt": "a trigger",
    "RuleStmt": "a rewrite rule",
}


@dataclass(frozen=True, slots=True)
class SearchPathChange:
    """A statement's new search_path; None when the proxy cannot tell it."""

    value: tuple[str, ...] | None


CacheKey = tuple[tuple[str, ...] | None, str]


@dataclass(frozen=True, slots=True)
class SearchValue:
    """A parameter or literal compared with a deterministic column by `=` or `<>`.

    While the column's key has several live versions, the proxy rewrites the
    value in the text so that it matches a value sealed under any of them.
    """

    column: EncryptedColumn
    # The value's span in the statement text, in characters, casts included.
    start: int
    end: int
    negated: bool
    in_list: bool
    number: int | None = None
    literal: LiteralSlot | None = None
    # The column's span and text when it is right of the value.
    column_span: tuple[int, int] | None = None
    column_text: str = ""


@dataclass(frozen=True, slots=True)
class VersionCheck:
    """A construct that gives wrong results while the column has several live versions.

    Equal plaintexts sealed under different versions differ as ciphertext,
    so joins, grouping and deduplication on the column are rejected then.
    """

    column: EncryptedColumn
    reason: str


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """The values to seal in one statement text before it reaches the server."""

    params: dict[int, EncryptedColumn] = field(default_factory=dict)
    literals: tuple[LiteralSlot, ...] = ()
    # Per output column, the encrypted columns it may come from; set only
    # for a text holding one statement that returns rows.
    outputs: tuple[Trace, ...] | None = None
    sql_prepared: tuple[SqlPrepare | SqlDeallocate, ...] = ()
    sql_executes: tuple[SqlExecute, ...] = ()
    copy: CopyPlan | None = None
    # Parameters that are arrays whose elements are each sealed (= ANY($1)).
    arrays: frozenset[int] = frozenset()
    search_path: SearchPathChange | None = None
    # Per parameter sealed for a column with associated columns, where the
    # statement gives those columns' values in the same row.
    bindings: dict[int, assoc.Sources] = field(default_factory=dict)
    # Per output column of a bound column, the output columns that contain
    # its associated values from the same row.
    associations: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # For parameters bound for columns keyed per subject: where each row's
    # subject value is.
    subjects: dict[int, SubjectSource] = field(default_factory=dict)
    # Values compared with deterministic columns, which the proxy rewrites
    # while a column's key has several live versions.
    searches: tuple[SearchValue, ...] = ()
    # Array parameters compared with ANY or ALL. Their elements are sealed
    # under every live version, unlike those of arrays a batch INSERT stores.
    lookup_arrays: frozenset[int] = frozenset()
    version_checks: tuple[VersionCheck, ...] = ()
    # CREATE TABLE AS or CREATE MATERIALIZED VIEW over a ruled table. Its
    # command tag is SELECT, not a DDL tag, so the session cannot tell it
    # from the tag that the catalog changed.
    creates_relation: bool = False

    @property
    def is_empty(self) -> bool:
        return not (
            self.creates_relation
            or self.params
            or self.literals
            or self.outputs
            or self.sql_prepared
            or self.sql_executes
            or self.copy
            or self.search_path
            or self.version_checks
        )


EMPTY_PLAN = StatementPlan()


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """The fields of a COPY stream to seal (FROM STDIN) or open (TO STDOUT)."""

    direction: str
    options: CopyOptions
    fields: dict[int, Trace]
    # Per field of a bound column, the fields that contain its associated values.
    associated: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # COPY FROM into columns keyed per subject: field index to the index
    # of the field that contains the row's subject value.
    subjects: dict[int, int] = field(default_factory=dict)


class Analyzer:
    """Analyse statements against the ruled tables of one database.

    Results are cached by search_path and statement text, and the analyzer
    belongs to one database; rejections are cached too, so a client that
    retries a rejected statement does not cost a parse each time.
    """

    def __init__(self, catalog: Catalog, cache_size: int = 4096) -> None:
        self.catalog = catalog
        self._filter = NameFilter(catalog.tables, (name for _, name in catalog.broken))
        self._cache: cachetools.LRUCache[CacheKey, StatementPlan | StatementRejected]
        self._cache = cachetools.LRUCache(maxsize=cache_size)

    def plan(
        self,
        sql: str,
        search_path: tuple[str, ...] | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> StatementPlan:
        """Return the seal plan of `sql`, or raise StatementRejected.

        `search_path` is the session's, with `$user` already replaced, or
        None when it is not known. Raises CatalogStale when the statement
        writes into a relation the catalog has not seen, unless its name is
        in `absent`: names that a catalog read just now did not find.
        """
        if absent:
            result = self._analyse(sql, search_path, absent)
            if isinstance(result, StatementRejected):
                raise result
            return result
        key = (search_path, sql)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._analyse(sql, search_path)
            self._cache[key] = cached
        if isinstance(cached, StatementRejected):
            raise cached
        return cached

    def _analyse(
        self,
        sql: str,
        search_path: tuple[str, ...] | None,
        absent: frozenset[str] = frozenset(),
    ) -> StatementPlan | StatementRejected:
        lowered = fold_case(sql)
        named = self._filter.named(lowered)
        if not self._filter.should_parse(lowered, named) and not write_needs_analysis(
            lowered, self.catalog, search_path
        ):
            return EMPTY_PLAN
        try:
            tree = json.loads(parser.parse_sql_json(sql))
        except parser.ParseError as exc:
            # Sent on, the text would reach the server's log with its values.
            return syntax_error(exc, named)
        try:
            walker = _Walker(self.catalog, sql, search_path, absent)
            for raw in tree.get("stmts", []):
                walker.statement(raw["stmt"])
            plan = walker.result()
        except StatementRejected as exc:
            return exc
        if "search_path" in lowered and plan.search_path is None:
            # set_config() and the like change it in ways not followed here.
            plan = replace(plan, search_path=SearchPathChange(None))
        return plan


def reject(column: EncryptedColumn, reason: str, hint: str = "") -> StatementRejected:
    return StatementRejected(
        FEATURE_NOT_SUPPORTED,
        f"column {column.identity} is encrypted: {reason}",
        hint or _PASS_THROUGH_HINT,
    )


class _Walker:
    """Walk one statement text's parse trees and collect its seal plan."""

    def __init__(
        self,
        catalog: Catalog,
        sql: str,
        search_path: tuple[str, ...] | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> None:
        self._catalog = catalog
        self._absent = absent
        self._sql = sql
        self._search_path = search_path
        self._search_path_change: SearchPathChange | None = None
        self._params: dict[int, EncryptedColumn] = {}
        self._literals: list[LiteralSlot] = []
        self._scope: dict[str, RuledTable] = {}
        self._handled: set[int] = set()
        self._outputs: list[tuple[Trace, ...] | None] = []
        self._sql_prepared: list[SqlPrepare | SqlDeallocate] = []
        self._sql_executes: list[SqlExecute] = []
        self._copies: list[CopyPlan] = []
        self._arrays: set[int] = set()
        self._bindings: dict[int, assoc.Sources] = {}
        self._associations: list[dict[int, tuple[int, ...]]] = []
        self._subjects: dict[int, SubjectSource] = {}
        self._searches: list[SearchValue] = []
        self._lookup_arrays: set[int] = set()
        self._version_checks: list[VersionCheck] = []
        self._creates_relation = False
        # Parameters stored in a column, which a lookup rewrite cannot turn
        # into arrays.
        self._written: set[int] = set()

    def result(self) -> StatementPlan:
        outputs = self._outputs[0] if len(self._outputs) == 1 else None
        if outputs is not None and not any(outputs):
            outputs = None
        plan = StatementPlan(
            dict(self._params),
            tuple(self._literals),
            outputs,
            tuple(self._sql_prepared),
            tuple(self._sql_executes),
            self._copies[0] if len(self._copies) == 1 else None,
            frozenset(self._arrays),
            self._search_path_change,
            dict(self._bindings),
            self._associations[0] if outputs is not None and self._associations else {},
            dict(self._subjects),
            searches=tuple(self._searches),
            lookup_arrays=frozenset(self._lookup_arrays),
            version_checks=tuple(self._version_checks) + self._mixed_parameters(),
            creates_relation=self._creates_relation,
        )
        assoc.check_bindings(self._bindings, self._params)
        assoc.check_single_bound_result(self._associations, self._outputs)
        return EMPTY_PLAN if plan.is_empty else plan

    def _mixed_parameters(self) -> tuple[VersionCheck, ...]:
        """Return a check for each lookup parameter also stored or bound as an array.

        The rewrite during a rotation turns a lookup parameter into an array,
        and an array compared with ANY gets one element per live version,
        which their other uses could not take.
        """
        searched = {s.number: s.column for s in self._searches if s.number is not None}
        checks = [
            VersionCheck(
                column,
                f"parameter ${number} is both compared with it and stored or "
                "used as an array",
            )
            for number, column in sorted(searched.items())
            if number in self._written or number in self._arrays
        ]
        checks += [
            VersionCheck(
                self._params[number],
                f"array parameter ${number} is both compared with it and stored",
            )
            for number in sorted(self._lookup_arrays & self._written)
        ]
        return tuple(checks)

    def statement(self, stmt: Node) -> None:
        self._outputs.append(None)
        self._associations.append({})
        kind, body = _only(stmt)
        if kind == "ExecuteStmt":
            self._sql_executes.append(SqlExecute(body["name"], tuple(body.get("params", []))))
            return
        if kind == "DeallocateStmt":
            self._sql_prepared.append(SqlDeallocate(None if body.get("isall") else body["name"]))
            return
        if kind == "PrepareStmt":
            self._prepare(body)
            return
        if kind == "DoStmt":
            self._check_code(kind, _code_strings(body.get("args", [])))
            return
        if kind == "CreateFunctionStmt":
            self._function(body)
            return
        if kind == "VariableSetStmt" and body.get("name") == "search_path":
            self._set_search_path(body)
            return
        check_relations(stmt, self._catalog, self._search_path, self._absent)
        check_ddl(stmt, self._table_of)
        self._scope = dict(self._ruled_relations(stmt))
        if not self._scope:
            return
        if kind == "CreateTableAsStmt":
            self._creates_relation = True
        handled = self._handled = set()
        kind, body = _only(stmt)
        if kind in _UNSUPPORTED:
            self._unsupported(kind)
        if kind == "CopyStmt":
            self._copy(body)
        # Writes may sit in WITH clauses at any depth, not only at the top.
        for kind, body in _nodes_of_kinds(stmt, _WRITES):
            if kind == "InsertStmt":
                self._insert(body, handled)
            elif kind == "UpdateStmt":
                self._update(body, handled)
            else:
                self._merge(body)
        self._check_references(stmt, handled)
        self._check_join_using(stmt)
        for select in _selects(stmt):
            self._check_positions(select)
        self._outputs[-1] = self._trace_outputs(stmt)
        self._associations[-1] = self._associate_outputs(stmt)

    # Outputs

    def _trace_outputs(self, stmt: Node) -> tuple[Trace, ...] | None:
        select = self._output_select(stmt)
        if select is None:
            return None
        traces = self._trace_select(select)
        if traces is None and select.get("op", "SETOP_NONE") != "SETOP_NONE":
            # The server reports no source columns for the output of UNION,
            # INTERSECT and EXCEPT, so an untraced encrypted column would come back
            # as ciphertext.
            table = next(iter(self._scope.values()))
            raise reject(
                next(iter(table.encrypted.values())),
                "the proxy cannot trace the output columns of this UNION, "
                "INTERSECT or EXCEPT to their tables",
                "Name the columns in each branch instead of using *.",
            )
        return traces

    def _output_select(self, stmt: Node) -> Node | None:
        """Return the SELECT whose output list a statement returns, if any."""
        kind, body = _only(stmt)
        if kind == "SelectStmt":
            return body
        returning = body.get("returningClause", {}).get("exprs") or body.get("returningList")
        if not returning:
            return None
        return {"targetList": returning, "fromClause": [{"RangeVar": body["relation"]}]}

    def _associate_outputs(self, stmt: Node) -> dict[int, tuple[int, ...]]:
        select = self._output_select(stmt)
        if select is None:
            return {}
        return associate_outputs(select, self._trace_select, self._table_of)

    def _trace_select(self, select: Node) -> tuple[Trace, ...] | None:
        return trace_select(select, self._resolve, self._expand_star, self._seal_literal)

    def _expand_star(self, ref: Node, select: Node) -> list[Trace] | None:
        names = _field_names(ref)
        if names:
            table = self._scope.get(names[-1])
        else:
            sources = select.get("fromClause", [])
            relation = sources[0].get("RangeVar") if len(sources) == 1 else None
            table = self._table_of({"RangeVar": relation}) if relation else None
        if table is None:
            return None
        return [
            (table.encrypted[name],) if name in table.encrypted else ()
            for name in table.columns
        ]

    def _seal_literal(self, const: Node, column: EncryptedColumn) -> None:
        if id(const) not in self._handled:
            self._handled.add(id(const))
            self._literals.append(find_literal_span(self._sql, const, column))

    def _prepare(self, body: Node) -> None:
        # TODO: literals of an SQL-level PREPARE are sealed once, so each
        # EXECUTE stores the same ciphertext in a randomized column.
        inner = _Walker(self._catalog, self._sql, self._search_path, self._absent)
        inner.statement(body["query"])
        if inner._bindings:
            # TODO: carry the bindings to EXECUTE, whose arguments give the
            # associated values, as SqlPrepare carries the sealed parameters.
            number, sources = next(iter(inner._bindings.items()))
            raise reject(
                inner._params[number],
                "SQL-level PREPARE of a statement that seals it with associated "
                f"column {sources[0].column.name} is not supported yet",
                "Use the protocol's prepared statements (a driver's parameters), "
                "or literals.",
            )
        keyed = [slot.column for slot in inner._literals if slot.subject is not None]
        keyed += [inner._params[number] for number in inner._subjects]
        if keyed:
            raise reject(
                keyed[0],
                "PREPARE of a statement that writes a column keyed per subject is "
                "not supported",
                "Use the extended protocol (Parse and Bind), as drivers do.",
            )
        self._literals.extend(inner._literals)
        # An EXECUTE sends scalar arguments, so a PREPARE cannot take part in
        # the lookup rewrite. Its lookups are rejected while several versions
        # are live.
        checks = [
            VersionCheck(
                search.column,
                "a statement prepared with PREPARE compares it with a value",
            )
            for search in inner._searches
        ]
        checks += inner._version_checks
        self._version_checks.extend(checks)
        # An EXECUTE is checked against the live versions of these keys,
        # because the server keeps the literals sealed at PREPARE.
        keys = {
            slot.column.key_name
            for slot in inner._literals
            if not _randomized(slot.column)
        }
        keys |= {check.column.key_name for check in checks}
        self._sql_prepared.append(
            SqlPrepare(
                body["name"], dict(inner._params), tuple(checks), tuple(sorted(keys))
            )
        )

    def _copy(self, body: Node) -> None:
        fields = self._copy_fields(body)
        if not fields:
            return
        direction = "in" if body.get("is_from") else "out"
        if "filename" in body or body.get("is_program"):
            if direction == "in":
                column = next(iter(fields.values()))[0]
                raise reject(
                    column,
                    "COPY FROM a server file or program would store plaintext",
                    "Use COPY ... FROM STDIN so that the proxy can seal the rows.",
                )
            return
        options = CopyOptions.from_options(_copy_options(body.get("options", [])))
        associated = self._copy_associated(body, fields)
        subjects = self._copy_subjects(body, fields) if direction == "in" else {}
        self._copies.append(CopyPlan(direction, options, fields, associated, subjects))

    def _copy_subjects(self, body: Node, fields: dict[int, Trace]) -> dict[int, int]:
        """Map each COPY FROM field keyed per subject to its subject's field."""
        table = self._table_of(body["relation"])
        assert table is not None
        names = [item["String"]["sval"] for item in body.get("attlist", [])]
        names = names or list(table.columns)
        subjects = {}
        for index, trace in fields.items():
            column = trace[0]
            if column.subject_column is None:
                continue
            if column.subject_column not in names:
                raise missing_subject(column, f"COPY into {table.qualified_name}")
            subjects[index] = names.index(column.subject_column)
        return subjects

    def _copy_fields(self, body: Node) -> dict[int, Trace]:
        if "query" in body:
            query = body["query"]
            kind, select = _only(query)
            outputs = None
            if kind == "SelectStmt":
                outputs = trace_select(
                    select, self._resolve, self._expand_star, self._seal_literal
                )
            return {i: trace for i, trace in enumerate(outputs or ()) if trace}
        table = self._table_of(body["relation"])
        if table is None:
            return {}
        names = self._copy_names(body, table)
        return {
            i: (table.encrypted[name],) for i, name in enumerate(names) if name in table.encrypted
        }

    @staticmethod
    def _copy_names(body: Node, table: RuledTable) -> list[str]:
        names = [item["String"]["sval"] for item in body.get("attlist", [])]
        return names or list(table.columns)

    def _copy_associated(
        self, body: Node, fields: dict[int, Trace]
    ) -> dict[int, tuple[int, ...]]:
        """Map each field of a bound column to the fields of its associated values."""
        if "query" in body:
            kind, select = _only(body["query"])
            if kind != "SelectStmt":
                return {}
            return associate_outputs(select, self._trace_select, self._table_of)
        table = self._table_of(body["relation"])
        if table is None:
            return {}
        return assoc.copy_associated(fields, self._copy_names(body, table))

    # Writes

    def _insert(self, body: Node, handled: set[int]) -> None:
        table = self._table_of(body["relation"])
        if table is None:
            return
        assoc.check_view_write(table)
        if "cols" in body:
            columns = [_only(col)[1]["name"] for col in body["cols"]]
        else:
            columns = list(table.columns)
        select = body.get("selectStmt", {}).get("SelectStmt", {})
        targets = [table.encrypted.get(name) for name in columns]
        if any(targets) and "valuesLists" not in select:
            bound = next(
                (
                    t
                    for t in targets
                    if t is not None and (t.associated or t.subject_column is not None)
                ),
                None,
            )
            if bound is not None:
                raise reject(
                    bound,
                    "INSERT ... SELECT cannot give the proxy each row's associated "
                    "values or subject",
                    "Insert the values with VALUES so that the proxy can seal them: "
                    "with SQLAlchemy set use_insertmanyvalues=False on the engine, "
                    "with Django call bulk_create with batch_size=1.",
                )
            self._insert_select(select, targets, handled)
        rows = [_only(row)[1]["items"] for row in select.get("valuesLists", [])]
        for items in rows:
            values = dict(zip(columns, items))
            for value, column in zip(items, targets):
                if column is None:
                    continue
                sources = assoc.row_sources(column, values, "the INSERT")
                subject = None
                if column.subject_column is not None and _sealed_here(value):
                    place = f"the INSERT into {table.qualified_name}"
                    subject = value_subject(values.get(column.subject_column), column, place)
                self._value(value, column, table, handled, sources, subject)
        conflict = body.get("onConflictClause", {})
        if conflict.get("targetList"):
            inserted = dict(zip(columns, rows[0])) if len(rows) == 1 else None
            update = assoc.ConflictUpdate(conflict, inserted)
            self._assignments(conflict["targetList"], table, handled, update.sources)
            update.check(table)

    def _insert_select(
        self, select: Node, targets: list[EncryptedColumn | None], handled: set[int]
    ) -> None:
        """Seal the cells of a batch INSERT ... SELECT over VALUES or UNNEST."""
        try:
            batch = plan_batch_insert(select, targets)
        except UnsealableSelect as exc:
            raise reject(
                exc.column,
                exc.reason,
                "Insert the values with VALUES, or select them from VALUES or "
                "UNNEST of parameters, so that the proxy can seal them.",
            ) from None
        handled.update(id(ref) for ref in batch.refs)
        for value in batch.values:
            kind, body = _only(value.node)
            if kind == "ParamRef":
                self._param(body["number"], value.column)
                self._written.add(body["number"])
                if value.array:
                    self._arrays.add(body["number"])
            elif not body.get("isnull"):
                slot = find_literal_span(self._sql, body, value.column)
                self._literals.append(replace(slot, array=value.array))



    def _update(self, body: Node, handled: set[int]) -> None:
        table = self._table_of(body["relation"])
        if table is None:
            return
        assoc.check_view_write(table)
        targets = body.get("targetList", [])
        updates = assoc.set_values(targets)
        relation = body["relation"]
        names = (relation.get("alias", {}).get("aliasname") or relation["relname"],)
        pins = assoc.where_pins(body.get("whereClause"), names)
        qualifiers = {relation["relname"], relation.get("alias", {}).get("aliasname")}
        where = (body.get("whereClause"), {q for q in qualifiers if q})

        def sources_of(column: EncryptedColumn) -> assoc.Sources | str:
            values = {**pins, **updates}
            return assoc.row_sources(column, values, "the UPDATE")

        self._assignments(targets, table, handled, sources_of, where)
        assoc.check_update(table, updates)

    def _assignments(
        self,
        targets: list[Node],
        table: RuledTable,
        handled: set[int],
        sources_of: Callable[[EncryptedColumn], assoc.Sources | str],
        where: tuple[Node | None, set[str]] | None = None,
    ) -> None:
        """Check the SET list of an UPDATE or of ON CONFLICT DO UPDATE.

        `where` is an UPDATE's WHERE clause with the names that qualify the
        table's columns in it; it may pin the subject of the changed rows.
        """
        values = {_only(item)[1].get("name", ""): _only(item)[1].get("val") for item in targets}
        for item in targets:
            target = _only(item)[1]
            column = table.encrypted.get(target.get("name", ""))
            if column is None:
                continue
            subject = None
            if column.subject_column is not None and _sealed_here(target["val"]):
                subject = self._set_subject(column, values, table, where)
            sources = sources_of(column) if column.associated else ()
            self._value(target["val"], column, table, handled, sources, subject)

    def _set_subject(
        self,
        column: EncryptedColumn,
        values: dict[str, Node | None],
        table: RuledTable,
        where: tuple[Node | None, set[str]] | None,
    ) -> SubjectSource:
        assert column.subject_column is not None
        place = f"the UPDATE of {table.qualified_name}"
        node = values.get(column.subject_column)
        if node is not None:
            return value_subject(node, column, place)
        pinned = where_subject(where[0], column, where[1]) if where else None
        if pinned is None:
            raise missing_subject(column, place)
        return pinned

    def _value(
        self,
        node: Node,
        column: EncryptedColumn,
        table: RuledTable,
        handled: set[int],
        sources: assoc.Sources | str = (),
        subject: SubjectSource | None = None,
    ) -> None:
        """Accept a value bound for an encrypted column, or reject it.

        `sources` gives the associated values of the row, or the reason
        they are unknown. It matters only when the value is sealed.
        """
        kind, body = _only(node)
        if kind == "TypeCast" and _cast_name(body) in _TEXT_CASTS:
            if body.get("typeName", {}).get("typmods"):
                # An explicit cast to varchar(n) truncates without an error.
                raise reject(
                    column,
                    "a cast with a length would cut the sealed value",
                    "Cast to text or varchar without a length, or send the "
                    "parameter without a cast.",
                )
            kind, body = _only(body["arg"])
        sealed = kind == "ParamRef" or (kind == "A_Const" and not body.get("isnull"))
        if sealed and isinstance(sources, str):
            raise reject(column, sources, assoc.BOUND_HINT)
        if kind == "ParamRef":
            assert not isinstance(sources, str)
            self._param(body["number"], column, subject)
            self._bind_sources(body["number"], column, sources)
            self._written.add(body["number"])
        elif kind == "A_Const":
            if not body.get("isnull"):
                assert not isinstance(sources, str)
                self._literal(body, column, sources, subject)
        elif kind == "SetToDefault":
            return
        elif kind == "ColumnRef" and self._is_same_column(body, column, table):
            handled.add(id(body))
        else:
            raise reject(
                column,
                "its value would be computed by the server and stored in plaintext",
                "Send the value as a parameter or a literal so that the proxy "
                "can seal it.",
            )

    def _bind_sources(
        self, number: int, column: EncryptedColumn, sources: assoc.Sources
    ) -> None:
        if not column.associated:
            return
        known = self._bindings.get(number)
        if known is not None and known != sources:
            raise reject(
                column,
                f"parameter ${number} is sealed for rows with different associated "
                "values",
                "Pass each row's value as its own parameter.",
            )
        self._bindings[number] = sources

    def _literal(
        self,
        const: Node,
        column: EncryptedColumn,
        sources: assoc.Sources,
        subject: SubjectSource | None,
    ) -> None:
        if any(source.param is not None for source in sources):
            raise reject(
                column,
                "a literal for it is sealed when the statement is parsed, but its "
                "associated column's value is a parameter that arrives later",
                "Send both values as parameters, or both as literals.",
            )
        slot = find_literal_span(self._sql, const, column)
        self._literals.append(replace(slot, associated=sources, subject=subject))

    def _param(
        self, number: int, column: EncryptedColumn, subject: SubjectSource | None = None
    ) -> None:
        known = self._params.get(number)
        if known is not None and known.key_name != column.key_name:
            raise reject(column, f"parameter ${number} is also bound for {known.identity}")
        if known is not None and self._subjects.get(number) != subject:
            raise reject(
                column,
                f"parameter ${number} is stored in rows of different subjects, "
                "and one sealed value can carry only one subject's key",
                "Send one parameter per row.",
            )
        self._params[number] = column
        if subject is not None:
            self._subjects[number] = subject

    def _is_same_column(
        self, ref: Node, column: EncryptedColumn, table: RuledTable
    ) -> bool:
        names = _field_names(ref)
        if names and names[-1] == column.name and len(names) == 2:
            return names[0] == "excluded" or self._scope.get(names[0]) is table
        return names == [column.name]

    # Reads and everything else

    def _check_references(self, stmt: Node, handled: set[int]) -> None:
        subqueries = self._ruled_subqueries(stmt)
        for ref, parents in _column_refs(stmt, []):
            if id(ref) in handled:
                continue
            column = self._resolve(ref)
            if column is not None:
                self._check_context(ref, column, parents)
            else:
                self._check_whole_row(ref, parents, subqueries)
        self._check_sublinks(stmt)
        self._check_derived_tables(stmt)

    def _check_whole_row(
        self, ref: Node, parents: list[tuple[str, Node]], subqueries: set[str]
    ) -> None:
        """Reject a whole-row reference to a relation with encrypted columns.

        `SELECT t FROM t`, `row_to_json(t)` and `f(t.*)` return the row as one
        composite value, whose encrypted fields the proxy cannot unseal.
        A `*` directly in an output list is expanded and traced instead.
        """
        fields = ref.get("fields", [])
        names = _field_names(ref)
        star = bool(fields) and "A_Star" in fields[-1]
        if star:
            if parents and parents[-1][0] == "ResTarget" and _in_result_list(parents):
                return
            qualifier = [f["String"]["sval"] for f in fields[:-1] if "String" in f]
            name = qualifier[-1] if qualifier else None
        elif len(names) == 1 and not any(
            names[0] in table.columns for table in self._scope.values()
        ):
            name = names[0]
            if name not in self._scope and name not in subqueries:
                return
        else:
            return
        parent_kind, parent = parents[-1] if parents else ("", {})
        if parent_kind == "NullTest" or (
            parent_kind == "FuncCall"
            and _func_name(parent) == "count"
            and not parent.get("agg_distinct")
        ):
            return
        table = self._scope.get(name or "") or next(iter(self._scope.values()))
        raise reject(
            next(iter(table.encrypted.values())),
            "a whole-row reference would return its ciphertext inside a composite "
            "value, which the proxy cannot unseal",
            "Name the columns in the output list instead of the whole row.",
        )

    def _ruled_subqueries(self, stmt: Node) -> set[str]:
        """Return the aliases of subqueries and WITH queries that read a ruled table."""
        aliases = set()
        for kind, body in _nodes_of_kinds(stmt, ("RangeSubselect", "CommonTableExpr")):
            if kind == "RangeSubselect":
                name, query = body.get("alias", {}).get("aliasname"), body.get("subquery")
            else:
                name, query = body.get("ctename"), body.get("ctequery")
            if name and any(self._table_of(r) for r in _relations(query)):
                aliases.add(name)
        return aliases

    def _check_sublinks(self, stmt: Node) -> None:
        """Reject a subquery used as a value that returns an encrypted column.

        The server reports no source column for `(SELECT col ...)`,
        `ARRAY(SELECT col ...)` or `x IN (SELECT col ...)`, so the proxy could
        not unseal the value, and a comparison would compare ciphertext.
        """
        for _, sublink in _nodes_of_kinds(stmt, ("SubLink",)):
            if sublink.get("subLinkType") == "EXISTS_SUBLINK":
                continue
            kind, select = _only(sublink["subselect"])
            if kind != "SelectStmt":
                continue
            traces = self._trace_select(select)
            columns = [column for trace in traces or () for column in trace]
            if traces is None and any(self._table_of(r) for r in _relations(select)):
                table = next(iter(self._scope.values()))
                columns = list(table.encrypted.values())
            if columns:
                raise reject(
                    columns[0],
                    "a subquery used as a value returns it without a source "
                    "column, so the proxy cannot unseal or compare it",
                    "Join the table instead, or run the subquery as its own "
                    "statement.",
                )

    def _check_derived_tables(self, stmt: Node) -> None:
        """Reject a subquery in FROM or WITH that computes an encrypted output.

        The server follows a plain column of such a subquery to its table,
        but reports no source column for one that comes from UNION,
        coalesce or CASE, so the outer query would return ciphertext.
        """
        for kind, body in _nodes_of_kinds(stmt, ("RangeSubselect", "CommonTableExpr")):
            query = body.get("subquery" if kind == "RangeSubselect" else "ctequery", {})
            query_kind, select = _only(query)
            if query_kind != "SelectStmt":
                continue
            if select.get("op", "SETOP_NONE") != "SETOP_NONE":
                traces = self._trace_select(select) or ()
            else:
                values = [_only(item)[1].get("val", {}) for item in select.get("targetList", [])]
                traces = tuple(
                    trace_expression(value, self._resolve, self._seal_literal)
                    for value in values
                    if "ColumnRef" not in value
                )
            columns = [column for trace in traces for column in trace]
            if columns:
                raise reject(
                    columns[0],
                    "a subquery in FROM or WITH returns it through UNION, coalesce "
                    "or CASE, and the server does not report its source column",
                    "Select the column itself in the subquery, or move the UNION, "
                    "coalesce or CASE to the outer query.",
                )

    def _check_context(
        self, ref: Node, column: EncryptedColumn, parents: list[tuple[str, Node]]
    ) -> None:
        # coalesce and CASE results hand the value on unchanged.
        depth = passes_through(ref, parents)
        outer = parents[: len(parents) - depth]
        if outer and outer[-1][0] == "ResTarget" and _in_result_list(outer):
            if _randomized(column) and _deduplicated(outer):
                raise reject(
                    column, "DISTINCT, UNION, INTERSECT and EXCEPT compare ciphertext"
                )
            if _deduplicated(outer):
                self._version_check(column, "DISTINCT, UNION, INTERSECT and EXCEPT")
            return
        parent_kind, parent = parents[-1] if parents else ("", {})
        if parent_kind == "SelectStmt" and not _randomized(column):
            # GROUP BY and DISTINCT ON group equal ciphertexts, which are
            # equal plaintexts under deterministic encryption.
            self._version_check(column, "GROUP BY and DISTINCT ON")
            return
        if parent_kind == "NullTest":
            return
        if parent_kind == "FuncCall" and _func_name(parent) == "count":
            if parent.get("agg_distinct"):
                if _randomized(column):
                    raise reject(column, "count(DISTINCT) would compare ciphertext")
                self._version_check(column, "count(DISTINCT ...)")
            return
        if parent_kind == "A_Expr":
            self._comparison(parent, ref, column)
            return
        raise reject(column, _describe_context(parent_kind, parent))

    def _comparison(self, expr: Node, ref: Node, column: EncryptedColumn) -> None:
        kind = expr.get("kind")
        operator = _operator(expr)
        if kind in ("AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR"):
            raise reject(column, "LIKE and pattern matching cannot run on ciphertext")
        if kind in ("AEXPR_OP_ANY", "AEXPR_OP_ALL"):
            self._array_comparison(expr, ref, column, operator)
            return
        if operator not in ("=", "<>") or kind not in ("AEXPR_OP", "AEXPR_IN"):
            raise reject(column, f"operator {operator} cannot run on ciphertext")
        if column.rule.encryption is Encryption.RANDOMIZED:
            raise reject(
                column,
                "equality on a randomized column never matches",
                "Set 'encryption: deterministic' on the column to search it "
                "by equality.",
            )
        column_first = expr.get("lexpr", {}).get("ColumnRef") is ref
        other = expr["rexpr"] if column_first else expr["lexpr"]
        in_list = "List" in other
        items = other["List"]["items"] if in_list else [other]
        for item in items:
            if self._search_value(item, column):
                moved = None if column_first else ref
                self._search_site(item, column, operator == "<>", in_list, moved)

    def _array_comparison(
        self, expr: Node, ref: Node, column: EncryptedColumn, operator: str
    ) -> None:
        if operator not in ("=", "<>") or _randomized(column):
            raise reject(column, f"{operator} ANY or ALL cannot run on ciphertext")
        if expr.get("lexpr", {}).get("ColumnRef") is not ref:
            raise reject(column, "it can only stand on the left of ANY or ALL")
        kind, body = _only(expr["rexpr"])
        if kind == "TypeCast":
            kind, body = _only(body["arg"])
        if kind != "ParamRef":
            raise reject(
                column,
                "ANY and ALL need an array parameter to seal",
                "Pass the array as a parameter, or use IN with literals.",
            )
        self._param(body["number"], column)
        self._arrays.add(body["number"])
        self._lookup_arrays.add(body["number"])

    def _search_value(self, node: Node, column: EncryptedColumn) -> bool:
        """Accept a value compared with a deterministic column, or reject it.

        Returns whether the value is a parameter or literal, not a column.
        """
        kind, body = _only(node)
        if kind == "TypeCast" and _cast_name(body) in _TEXT_CASTS:
            kind, body = _only(body["arg"])
        if kind == "ParamRef":
            self._param(body["number"], column)
            return True
        elif kind == "A_Const" and not body.get("isnull"):
            self._literals.append(find_literal_span(self._sql, body, column))
            return True
        elif kind == "ColumnRef" and self._same_key(body, column):
            self._handled.add(id(body))
            self._version_check(column, "a comparison with another encrypted column")
            return False
        else:
            raise reject(
                column,
                "it can only be compared with a parameter, a literal or the "
                "same column of another row",
            )

    def _search_site(
        self,
        node: Node,
        column: EncryptedColumn,
        negated: bool,
        in_list: bool,
        moved: Node | None,
    ) -> None:
        """Record where a compared value sits, for the rewrite during a rotation.

        `moved` is the column reference when it is right of the value
        (`'a' = col`): the rewrite swaps the two, because ANY must be right.
        """
        kind, body = _only(node)
        if kind == "TypeCast":
            kind, body = _only(body["arg"])
        try:
            start, end = value_span(self._sql, node, column)
            column_span = None
            if moved is not None:
                column_span = column_ref_span(self._sql, moved, column)
        except StatementRejected:
            # Without the spans there is nothing to rewrite, which matters
            # only while several versions are live.
            self._version_check(column, "a comparison the proxy cannot rewrite")
            return
        site = SearchValue(column, start, end, negated, in_list)
        if kind == "ParamRef":
            site = replace(site, number=body["number"])
        else:
            site = replace(site, literal=self._literals[-1])
        if column_span is not None:
            column_text = self._sql[column_span[0] : column_span[1]]
            site = replace(site, column_span=column_span, column_text=column_text)
        self._searches.append(site)

    def _version_check(self, column: EncryptedColumn, construct: str) -> None:
        reason = f"{construct} would compare values sealed under different versions"
        self._version_checks.append(VersionCheck(column, reason))

    def _check_join_using(self, stmt: Node) -> None:
        """Record `JOIN ... USING (col)`, which compares the columns' ciphertext.

        A NATURAL JOIN may compare any column that both sides have, so it
        counts for every deterministic column in scope.
        """
        for _, join in _nodes_of_kinds(stmt, ("JoinExpr",)):
            if join.get("isNatural"):
                for table in self._scope.values():
                    for shared in table.encrypted.values():
                        if not _randomized(shared):
                            self._version_check(shared, "NATURAL JOIN")
            for item in join.get("usingClause", []):
                ref = {"fields": [item]}
                column = self._resolve(ref)
                if column is None:
                    continue
                if _randomized(column):
                    reason = "JOIN ... USING on it would compare ciphertext"
                    raise reject(column, reason)
                self._version_check(column, "JOIN ... USING")

    def _same_key(self, ref: Node, column: EncryptedColumn) -> bool:
        other = self._resolve(ref)
        return (
            other is not None
            and not _randomized(other)
            and other.key_name == column.key_name
        )

    def _check_positions(self, select: Node) -> None:
        """Reject ORDER BY or GROUP BY that names an encrypted output column.

        `ORDER BY 2` and `ORDER BY alias` sort by an output column without
        a ColumnRef to the table, so the reference check cannot see them.
        A position counts the columns that `*` expands to.
        """
        clauses = [("ORDER BY", _only(s)[1].get("node", {})) for s in select.get("sortClause", [])]
        clauses += [("GROUP BY", node) for node in select.get("groupClause", [])]
        for clause, node in clauses:
            for column in self._output_trace(node, select, clause):
                if clause == "ORDER BY" or _randomized(column):
                    raise reject(column, f"{clause} on it would compare ciphertext")
                self._version_check(column, clause)

    def _output_trace(self, node: Node, select: Node, clause: str) -> Trace:
        """Return the trace of the output column that `node` names by position or alias."""
        leftmost = select
        while leftmost.get("op", "SETOP_NONE") != "SETOP_NONE":
            leftmost = leftmost["larg"]
        targets = [_only(item)[1] for item in leftmost.get("targetList", [])]
        if "A_Const" in node and "ival" in node["A_Const"]:
            position = node["A_Const"]["ival"].get("ival", 0)
            traces = self._trace_select(select)
            if traces is not None:
                return traces[position - 1] if 1 <= position <= len(traces) else ()
            stars = any(_is_star(target.get("val", {})) for target in targets[:position])
            ruled = [self._table_of(r) for r in _relations(leftmost.get("fromClause", []))]
            if stars and any(ruled):
                table = next(t for t in ruled if t is not None)
                raise reject(
                    next(iter(table.encrypted.values())),
                    f"{clause} by position after a * that the proxy cannot "
                    "expand may name an encrypted column",
                    f"Name the column in {clause} instead of its position.",
                )
            target = targets[position - 1] if 1 <= position <= len(targets) else {}
            return trace_expression(target.get("val", {}), self._resolve, self._seal_literal)
        names = _field_names(node.get("ColumnRef", {}))
        if len(names) == 1:
            for target in targets:
                if target.get("name") == names[0]:
                    value = target.get("val", {})
                    return trace_expression(value, self._resolve, self._seal_literal)
        return ()

    def _resolve(self, ref: Node) -> EncryptedColumn | None:
        names = _field_names(ref)
        if not names:
            return None
        if len(names) == 1:
            for candidate in self._scope.values():
                if names[0] in candidate.encrypted:
                    return candidate.encrypted[names[0]]
            return None
        table = self._scope.get(names[-2])
        return table.encrypted.get(names[-1]) if table else None

    def _ruled_relations(self, stmt: Node) -> Iterator[tuple[str, RuledTable]]:
        for node in _relations(stmt):
            table = self._table_of({"RangeVar": node})
            if table is not None:
                alias = node.get("alias", {}).get("aliasname")
                yield alias or node["relname"], table

    def _table_of(self, relation: Node) -> RuledTable | None:
        body = relation.get("RangeVar", relation)
        return self._catalog.lookup(
            body.get("schemaname"), body["relname"], self._search_path
        )

    def _set_search_path(self, body: Node) -> None:
        value = None
        if body.get("kind") == "VAR_SET_VALUE" and not body.get("is_local"):
            value = tuple(
                str(_only(arg)[1].get("sval", {}).get("sval", "")) for arg in body.get("args", [])
            )
        # NOTE: SET LOCAL, RESET and DEFAULT make the path unknown to the
        # proxy, which then matches ruled tables in any schema.
        self._search_path_change = SearchPathChange(value)
        self._search_path = value

    def _function(self, body: Node) -> None:
        """Reject a function or procedure whose body names a ruled table.

        The body runs on the server without the proxy, so it would store
        plaintext or return ciphertext. A body in BEGIN ATOMIC form is parsed
        already, and a quoted body is searched like a DO block.
        """
        kind = "CreateProcedure" if body.get("is_procedure") else "CreateFunction"
        for relation in _relations(body.get("sql_body", {})):
            table = self._table_of(relation)
            if table is not None:
                self._unsupported(kind, table)
        self._check_code(kind, _code_strings(body.get("options", []), "as"))

    def _check_code(self, kind: str, code: str) -> None:
        """Reject code run by the server that may name a ruled table.

        NOTE: dynamic SQL that builds a table's name at run time, such as
        EXECUTE 'INSERT INTO cust' || 'omers ...', escapes this search.
        """
        folded = fold_case(code)
        for table in self._catalog.tables:
            if fold_case(table.name) in folded:
                used = [c for c in table.encrypted.values() if fold_case(c.name) in folded]
                self._unsupported(kind, table, used[0] if used else None)
        if UNICODE_IDENTIFIER in folded:
            raise StatementRejected(
                FEATURE_NOT_SUPPORTED,
                f"{_UNSUPPORTED[kind]} with a Unicode escape identifier (U&\"...\") "
                "may name a table with encrypted columns, which the proxy cannot check",
                "Write the identifiers without Unicode escapes.",
            )

    def _merge(self, body: Node) -> None:
        table = self._table_of(body["relation"])
        if table is not None:
            self._unsupported("MergeStmt", table)

    def _unsupported(
        self,
        kind: str,
        table: RuledTable | None = None,
        column: EncryptedColumn | None = None,
    ) -> None:
        # Unless the check found the encrypted column that such a statement
        # uses, the message names the statement kind and the table only.
        table = table or next(iter(self._scope.values()))
        what = _UNSUPPORTED[kind]
        relation = "that names" if kind.startswith("Create") else "on"
        uses = "which has encrypted columns"
        if column is not None:
            uses = f"which uses encrypted column {column.identity}"
        raise StatementRejected(
            FEATURE_NOT_SUPPORTED,
            f"{what} {relation} table {table.qualified_name}, {uses}, is not "
            "supported yet",
            "Use INSERT, UPDATE and SELECT with parameters for this table, sent "
            "by the application through the proxy.",
        )


def _code_strings(options: list[Node], name: str | None = None) -> str:
    """Join the string arguments of DefElem options, such as a DO block's code.

    `name` keeps only the options of that name, such as a function's AS.
    """
    strings = []
    for item in options:
        option = item["DefElem"]
        if name is not None and option.get("defname") != name:
            continue
        for _, value in _nodes_of_kinds(option.get("arg", {}), ("String",)):
            strings.append(str(value.get("sval", "")))
    return " ".join(strings)


def _sealed_here(node: Node) -> bool:
    """Tell whether a stored value is a parameter or literal that the proxy seals.

    Only those need a subject; NULL, DEFAULT and a column's own value do not.
    """
    kind, body = _only(node)
    if kind == "TypeCast":
        kind, body = _only(body["arg"])
    return kind == "ParamRef" or (kind == "A_Const" and not body.get("isnull"))


def _only(node: Node) -> tuple[str, Node]:
    """Unwrap a JSON parse node {"Kind": {...}} into its kind and body."""
    ((kind, body),) = node.items()
    return kind, body


def _field_names(ref: Node) -> list[str]:
    names = []
    for item in ref.get("fields", []):
        if "String" not in item:
            return []
        names.append(item["String"]["sval"])
    return names


def _column_refs(
    node: Any, parents: list[tuple[str, Node]]
) -> Iterator[tuple[Node, list[tuple[str, Node]]]]:
    """Yield every ColumnRef body with the chain of its parent nodes."""
    if isinstance(node, list):
        for item in node:
            yield from _column_refs(item, parents)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "ColumnRef":
                yield value, parents
            elif key in ("returningClause", "returningList"):
                yield from _column_refs(value, parents + [("ReturningClause", {})])
            elif key in ("larg", "rarg"):
                # The branches of UNION and friends are unwrapped SelectStmts.
                yield from _column_refs(value, parents + [("SelectStmt", value)])
            elif key[:1].isupper() and isinstance(value, dict):
                yield from _column_refs(value, parents + [(key, value)])
            else:
                yield from _column_refs(value, parents)


def _relations(node: Any) -> Iterator[Node]:
    """Yield every RangeVar body; a statement's own target is not wrapped."""
    if isinstance(node, list):
        for item in node:
            yield from _relations(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "RangeVar" or (key == "relation" and "relname" in value):
                yield value
            yield from _relations(value)


def _in_result_list(parents: list[tuple[str, Node]]) -> bool:
    """Tell whether the ResTarget at the end of `parents` is an output column."""
    if len(parents) < 2:
        return False
    owner_kind, owner = parents[-2]
    target = parents[-1][1]
    if owner_kind == "SelectStmt":
        return any(item.get("ResTarget") is target for item in owner.get("targetList", []))
    if owner_kind == "ReturningClause":
        return True
    return False


def _copy_options(options: list[Node]) -> dict[str, str | bool]:
    result: dict[str, str | bool] = {}
    for item in options:
        option = item["DefElem"]
        arg = option.get("arg")
        if arg is None:
            result[option["defname"]] = True
        else:
            _, value = _only(arg)
            result[option["defname"]] = str(next(iter(value.values()), ""))
    return result


def _selects(node: Any) -> Iterator[Node]:
    for _, body in _nodes_of_kinds(node, ("SelectStmt",)):
        yield body


def _nodes_of_kinds(node: Any, kinds: tuple[str, ...]) -> Iterator[tuple[str, Node]]:
    """Yield (kind, body) for every node of the given kinds, outermost first."""
    if isinstance(node, list):
        for item in node:
            yield from _nodes_of_kinds(item, kinds)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in kinds:
                yield key, value
            yield from _nodes_of_kinds(value, kinds)


def _is_star(node: Node) -> bool:
    ref = node.get("ColumnRef", {})
    return any("A_Star" in item for item in ref.get("fields", []))


def _randomized(column: EncryptedColumn) -> bool:
    return column.rule.encryption is Encryption.RANDOMIZED


def _deduplicated(parents: list[tuple[str, Node]]) -> bool:
    """Tell whether the server compares the output values of a query for equality."""
    owner_kind, owner = parents[-2]
    if owner_kind == "SelectStmt" and "distinctClause" in owner:
        return True
    for kind, node in parents:
        if kind == "SelectStmt" and node.get("op", "SETOP_NONE") != "SETOP_NONE":
            if node["op"] != "SETOP_UNION" or not node.get("all"):
                return True
    return False


def _operator(expr: Node) -> str:
    names = [item["String"]["sval"] for item in expr.get("name", []) if "String" in item]
    return names[-1] if names else "?"


def _func_name(call: Node) -> str:
    names = [item["String"]["sval"] for item in call.get("funcname", []) if "String" in item]
    return names[-1] if names else "?"


def _cast_name(cast: Node) -> str:
    names = cast.get("typeName", {}).get("names", [])
    return str(names[-1]["String"]["sval"]) if names else ""


def _describe_context(kind: str, node: Node) -> str:
    if kind == "SortBy":
        return "ORDER BY cannot sort ciphertext"
    if kind == "FuncCall":
        return f"function {_func_name(node)}() cannot run on ciphertext"
    if kind == "TypeCast":
        return "a cast cannot run on ciphertext"
    if kind == "SelectStmt":
        return "GROUP BY, DISTINCT and other clauses cannot run on ciphertext"
    return "this expression cannot run on ciphertext"
