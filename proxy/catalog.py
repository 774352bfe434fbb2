"""The part of the server catalog that rules need: relation OIDs and columns.

RowDescription names a result column by table OID and attribute number, and
an INSERT without a column list fills columns in attribute order, so both
are read from `pg_class` and `pg_attribute` for every ruled table.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.crypto.subjects import SUBJECT_TYPE_NAMES
from proxy.errors import PgsealError, RuleError
from proxy.rules import ColumnRule, TableRule
from proxy.types import TYPES, LogicalType

log = logging.getLogger(__name__)

TEXT_OID = 25
VARCHAR_OID = 1043
BYTEA_OID = 17


class Storage(enum.Enum):
    """How the table stores a sealed value: armoured text or raw bytes."""

    TEXT = "text"
    BYTEA = "bytea"


@dataclass(frozen=True, slots=True)
class AssociatedColumn:
    """A plain column whose value in the row is bound into a sealed value."""

    name: str
    attnum: int
    type: LogicalType

    def canonical(self, value: bytes | None, fmt: int, declared_oid: int = 0) -> bytes | None:
        """Return the text bound into the associated data for a wire value.

        Raises ValueError on input that is not valid for the column's type.
        """
        if value is None:
            return None
        return self.type.from_wire(value, fmt, declared_oid)


@dataclass(frozen=True, slots=True)
class EncryptedColumn:
    rule: ColumnRule
    attnum: int
    storage: Storage
    associated: tuple[AssociatedColumn, ...] = ()
    # With key_scope subject: the type OID of the subject column.
    subject_type: int = 0

    @property
    def logical(self) -> LogicalType:
        """The type the application sees: the rule's, else the storage type."""
        return TYPES[self.rule.type or self.storage.value]

    @property
    def retyped(self) -> bool:
        """Tell whether the application sees another type than the table stores."""
        return self.rule.type is not None and self.logical.oid != self.storage_oid

    @property
    def storage_oid(self) -> int:
        return BYTEA_OID if self.storage is Storage.BYTEA else TEXT_OID

    @property
    def name(self) -> str:
        return self.rule.column

    @property
    def identity(self) -> str:
        return self.rule.identity

    @property
    def key_name(self) -> str:
        return self.rule.key_name

    @property
    def subject_column(self) -> str | None:
        """The plain column whose value selects the data key, if keyed per subject."""
        return self.rule.subject_column


@dataclass(frozen=True, slots=True)
class RuledTable:
    """A ruled table, or a view over one.

    `encrypted` maps this relation's column names to the encrypted columns
    they hold; for a view, those are columns of the base table. `fields`
    maps attribute numbers to the encrypted columns a value may come from.
    `associated` maps the name of an encrypted column bound to other
    columns to the names of this relation's columns that carry their values
    in the same row, or to None when the relation does not carry them all.
    """

    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]
    encrypted: dict[str, EncryptedColumn] = field(hash=False)
    fields: dict[int, tuple[EncryptedColumn, ...]] = field(hash=False, default_factory=dict)
    is_view: bool = False
    associated: dict[str, tuple[str, ...] | None] = field(
        hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not self.fields:
            for column in self.encrypted.values():
                self.fields[column.attnum] = (column,)
        if not self.is_view and not self.associated:
            for name, column in self.encrypted.items():
                if column.associated:
                    self.associated[name] = tuple(a.name for a in column.associated)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """The ruled tables of one database, by name and by OID."""

    tables: tuple[RuledTable, ...] = ()
    _by_name: dict[tuple[str, str], RuledTable] = field(
        default_factory=dict, repr=False
    )
    _by_oid: dict[int, RuledTable] = field(default_factory=dict, repr=False)
    # Every schema holding a relation named like a ruled table, ruled or not,
    # to resolve unqualified names along a search_path.
    namesakes: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    # Every relation of the database when the catalog was read, as (schema,
    # name); temporary ones also under the schema name pg_temp.
    relations: frozenset[tuple[str, str]] = frozenset()
    # Views over ruled tables whose encrypted columns could not be traced,
    # and relations with a rewrite rule that reads or writes a ruled table.
    untraced: frozenset[tuple[str, str]] = frozenset()
    # Relations that no longer match their rules, with the reason.
    broken: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    # False for a catalog built without reading the server's relations:
    # then a name it has not seen counts as plain.
    has_snapshot: bool = False

    @classmethod
    def build(
        cls,
        tables: Iterable[RuledTable],
        namesakes: dict[str, frozenset[str]] | None = None,
    ) -> Catalog:
        tables = tuple(tables)
        by_name = {(t.schema, t.name): t for t in tables}
        by_oid = {t.oid: t for t in tables}
        return cls(tables, by_name, by_oid, dict(namesakes or {}))

    @property
    def table_names(self) -> frozenset[str]:
        """Lower-case table names, for the check that skips the parser."""
        names = {t.name.lower() for t in self.tables}
        names.update(name.lower() for _, name in self.broken)
        return frozenset(names)

    def classify(
        self, schema: str | None, name: str, search_path: tuple[str, ...] | None = None
    ) -> tuple[RelationKind, str]:
        """Tell what a possibly unqualified relation name stands for.

        Returns the kind and the qualified name, or for a broken relation
        the reason it no longer matches its rule. An unqualified name with
        an unknown search_path takes the most guarded kind among the
        schemas that hold it.
        """
        if schema is not None:
            return self._classify_in(schema, name)
        if search_path is None:
            found = [self._classify_in(s, n) for s, n in self._all_named(name)]
            unseen = (self._unseen_kind, name)
            return min(found, key=lambda item: _GUARD_ORDER.index(item[0]), default=unseen)
        for candidate in _effective_path(search_path):
            kind, detail = self._classify_in(candidate, name)
            if kind is not self._unseen_kind:
                return kind, detail
        return self._unseen_kind, name

    @property
    def _unseen_kind(self) -> RelationKind:
        return RelationKind.UNKNOWN if self.has_snapshot else RelationKind.PLAIN

    def _all_named(self, name: str) -> set[tuple[str, str]]:
        named = {key for key in self._by_name if key[1] == name}
        named.update(key for key in self.broken if key[1] == name)
        named.update(key for key in self.relations if key[1] == name)
        return named

    def _classify_in(self, schema: str, name: str) -> tuple[RelationKind, str]:
        key = (schema, name)
        if key in self.broken:
            return RelationKind.BROKEN, self.broken[key]
        if key in self._by_name:
            return RelationKind.RULED, f"{schema}.{name}"
        if key in self.untraced:
            return RelationKind.UNTRACED, f"{schema}.{name}"
        if key in self.relations:
            return RelationKind.PLAIN, f"{schema}.{name}"
        return self._unseen_kind, f"{schema}.{name}"

    def lookup(
        self, schema: str | None, name: str, search_path: tuple[str, ...] | None = None
    ) -> RuledTable | None:
        """Find a ruled table by its possibly unqualified name.

        An unqualified name resolves along `search_path` as the server does,
        with pg_temp and pg_catalog searched first. When the session's
        search_path is not known, it matches a ruled table of that name in
        any schema: this errs on the side of sealing, never of storing
        plaintext.
        """
        if schema is not None:
            return self._by_name.get((schema, name))
        if search_path is None:
            return next((t for t in self.tables if t.name == name), None)
        holders = self.namesakes.get(name, frozenset())
        for candidate in _effective_path(search_path):
            if candidate in holders or (candidate, name) in self._by_name:
                return self._by_name.get((candidate, name))
        return None

    def column_at(self, table_oid: int, attnum: int) -> tuple[EncryptedColumn, ...] | None:
        """Return the encrypted columns that a result field may come from."""
        table = self._by_oid.get(table_oid)
        if table is None:
            return None
        return table.fields.get(attnum)

    def with_views(self, views: Iterable[RuledTable]) -> Catalog:
        return Catalog.build(self.tables + tuple(views), self.namesakes)

    def with_namesakes(self, namesakes: dict[str, frozenset[str]]) -> Catalog:
        return Catalog.build(self.tables, namesakes)


class RelationKind(enum.Enum):
    """The kind of relation a name resolves to, as far as sealing is concerned."""

    # A ruled table, one of its inheritance children, or a traced view.
    RULED = "ruled"
    # A ruled table whose columns no longer match its rule.
    BROKEN = "broken"
    # A view over a ruled table whose encrypted columns could not be traced.
    UNTRACED = "untraced"
    # A relation that existed when the catalog was read and contains no
    # encrypted column.
    PLAIN = "plain"
    # A name the catalog has not seen: created since, or not existing.
    UNKNOWN = "unknown"


# The first kind found wins when a name may resolve to several relations.
_GUARD_ORDER = (
    RelationKind.BROKEN,
    RelationKind.RULED,
    RelationKind.UNTRACED,
    RelationKind.UNKNOWN,
    RelationKind.PLAIN,
)


def _effective_path(search_path: tuple[str, ...]) -> list[str]:
    path = list(search_path)
    for implicit in ("pg_catalog", "pg_temp"):
        if implicit not in path:
            path.insert(0, implicit)
    return path


_COLUMNS_QUERY = """
SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname, a.atttypid,
       a.atttypmod, a.atthasdef, a.attgenerated <> '' AS generated
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND (n.nspname, c.relname) IN (
      SELECT s, t FROM unnest($1::text[], $2::text[]) AS r(s, t))
ORDER BY c.oid, a.attnum
"""


async def load_catalog(
    conn: Any,
    rules: Sequence[TableRule],
    strict: bool = True,
    previous: Catalog | None = None,
) -> Catalog:
    """Read the ruled tables from the server and check the rules against them.

    `conn` is an asyncpg connection to the database the rules apply to.
    With `strict`, a rule that does not match its table raises RuleError.
    Without it, the table is recorded as broken, so that statements on it
    are rejected while the other tables keep working. `previous` is the
    catalog in force: a ruled table that has been renamed since is broken.
    """
    schemas = [rule.schema for rule in rules]
    names = [rule.table for rule in rules]
    rows = await conn.fetch(_COLUMNS_QUERY, schemas, names)
    found: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        found.setdefault((row["nspname"], row["relname"]), []).append(row)
    tables: list[RuledTable] = []
    broken: dict[tuple[str, str], str] = {}
    broken_oids: list[int] = []
    for rule in rules:
        key = (rule.schema, rule.table)
        try:
            tables.append(_ruled_table(rule, found))
        except RuleError as exc:
            if strict:
                raise
            if key not in found:
                log.warning("%s; its rule applies again once the table exists", exc)
                continue
            log.error(
                "table %s no longer matches its rule, so statements on it are "
                "rejected until it does: %s",
                rule.qualified_name,
                exc,
            )
            broken[key] = str(exc)
            broken_oids.append(found[key][0]["oid"])
    children, broken_children = await _children(conn, tables, rules)
    broken.update(broken_children)
    catalog = Catalog.build(tables + children)
    catalog = await _add_views(conn, catalog)
    catalog = catalog.with_namesakes(await _namesakes(conn, catalog))
    from proxy.catalog_snapshot import add_snapshot

    return await add_snapshot(conn, catalog, broken, broken_oids, previous)


_CHILDREN_QUERY = """
WITH RECURSIVE tree(child, root) AS (
    SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i
    WHERE i.inhparent = ANY($1::oid[])
    UNION
    SELECT i.inhrelid, tree.root FROM pg_catalog.pg_inherits i
    JOIN tree ON i.inhparent = tree.child
)
SELECT tree.root, c.oid, n.nspname, c.relname, a.attnum, a.attname, a.atttypid,
       a.atttypmod, a.atthasdef, a.attgenerated <> '' AS generated
FROM tree
JOIN pg_catalog.pg_class c ON c.oid = tree.child
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.oid, a.attnum
"""


async def _children(
    conn: Any, tables: list[RuledTable], rules: Sequence[TableRule]
) -> tuple[list[RuledTable], dict[tuple[str, str], str]]:
    """Rule the inheritance children and partitions of ruled tables.

    A child takes the column rules of its ruled ancestor, with the same
    data keys, so rows read through the parent open like the parent's own.
    """
    rule_by_oid = {}
    for table in tables:
        rule = next(r for r in rules if (r.schema, r.table) == (table.schema, table.name))
        rule_by_oid[table.oid] = rule
    rows = await conn.fetch(_CHILDREN_QUERY, list(rule_by_oid))
    found: dict[tuple[int, str, str], list[Any]] = {}
    for row in rows:
        found.setdefault((row["root"], row["nspname"], row["relname"]), []).append(row)
    children = []
    broken = {}
    for (root, schema, name), child_rows in found.items():
        rule = rule_by_oid[root]
        child_rule = replace(rule, schema=schema, table=name)
        try:
            child = _ruled_table(child_rule, {(schema, name): child_rows})
        except RuleError as exc:
            reason = f"{exc} (it inherits the rules of {rule.qualified_name})"
            log.error("table %s.%s no longer matches its rule: %s", schema, name, reason)
            broken[(schema, name)] = reason
            continue
        children.append(child)
    return children, broken


_NAMESAKES_QUERY = """
SELECT c.relname, array_agg(n.nspname) AS schemas
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
GROUP BY c.relname
"""


async def _namesakes(conn: Any, catalog: Catalog) -> dict[str, frozenset[str]]:
    """Return, per ruled relation name, every schema holding a relation of that name.

    NOTE: temporary tables created later by a session are not known, so a
    temporary namesake of a ruled table is still treated as ruled.
    """
    names = sorted({table.name for table in catalog.tables})
    rows = await conn.fetch(_NAMESAKES_QUERY, names)
    return {row["relname"]: frozenset(row["schemas"]) for row in rows}


def _ruled_table(rule: TableRule, found: dict[tuple[str, str], list[Any]]) -> RuledTable:
    rows = found.get((rule.schema, rule.table))
    if not rows:
        raise RuleError(f"{rule.source}: table {rule.qualified_name} does not exist")
    by_name = {row["attname"]: row for row in rows}
    encrypted = {}
    for column in rule.columns:
        row = by_name.get(column.column)
        if row is None:
            raise RuleError(
                f"{column.source}: unknown column '{column.column}' in "
                f"{rule.qualified_name}"
            )
        storage = _storage(column, row["atttypid"], row["atttypmod"])
        if row["atthasdef"] or row["generated"]:
            raise RuleError(
                f"{column.source}: column {column.identity} has a default or is "
                "generated, so the server would store a value in plaintext; "
                "drop the default (ALTER TABLE ... ALTER COLUMN ... DROP DEFAULT)"
            )
        associated = tuple(
            _associated(rule, column, by_name, name) for name in column.associated_columns
        )
        subject_type = _subject_type(rule, column, by_name)
        encrypted[column.column] = EncryptedColumn(
            column, row["attnum"], storage, associated, subject_type
        )
    columns = tuple(row["attname"] for row in rows)
    return RuledTable(rows[0]["oid"], rule.schema, rule.table, columns, encrypted)


_TYPES_BY_OID = {t.oid: t for t in TYPES.values()}


def _associated(
    rule: TableRule, column: ColumnRule, by_name: dict[str, Any], name: str
) -> AssociatedColumn:
    """Check a column named in `associated_columns` against the table."""
    row = by_name.get(name)
    where = f"{column.source}: 'associated_columns' of {column.identity}"
    if row is None:
        raise RuleError(f"{where}: unknown column '{name}' in {rule.qualified_name}")
    if row["generated"]:
        raise RuleError(
            f"{where}: column {name} is generated, so no statement can give its "
            "value; name a column that INSERT sets"
        )
    logical = _TYPES_BY_OID.get(row["atttypid"])
    if logical is None:
        raise RuleError(
            f"{where}: column {name} has a type (OID {row['atttypid']}) that the "
            "proxy cannot put in canonical form; use a column of one of these "
            f"types: {', '.join(TYPES)}"
        )
    if row["atttypmod"] >= 0:
        raise RuleError(
            f"{where}: column {name} has a type modifier, with which the server may "
            "round or cut a value so that it differs from what the statement sent; "
            "drop the modifier (such as the length or precision)"
        )
    return AssociatedColumn(name, row["attnum"], logical)


def _subject_type(rule: TableRule, column: ColumnRule, by_name: dict[str, Any]) -> int:
    """Check a column's subject column against the table and return its type OID."""
    name = column.subject_column
    if name is None:
        return 0
    row = by_name.get(name)
    if row is None:
        raise RuleError(
            f"{column.source}: unknown subject_column '{name}' in "
            f"{rule.qualified_name}"
        )
    if row["atttypid"] not in SUBJECT_TYPE_NAMES:
        supported = ", ".join(sorted(set(SUBJECT_TYPE_NAMES.values())))
        raise RuleError(
            f"{column.source}: subject_column {rule.qualified_name}.{name} has a "
            f"type that cannot select data keys; supported types: {supported}"
        )
    type_oid: int = row["atttypid"]
    return type_oid


def _storage(column: ColumnRule, type_oid: int, type_modifier: int) -> Storage:
    storage = _column_storage(column, type_oid, type_modifier)
    if column.storage is not None and column.storage != storage.value:
        raise RuleError(
            f"{column.source}: column {column.identity} is stored as "
            f"{storage.value}, not {column.storage}; fix 'storage' or the column type"
        )
    return storage


def _column_storage(column: ColumnRule, type_oid: int, type_modifier: int) -> Storage:
    if type_oid == BYTEA_OID:
        return Storage.BYTEA
    if type_oid == TEXT_OID or (type_oid == VARCHAR_OID and type_modifier < 0):
        return Storage.TEXT
    raise RuleError(
        f"{column.source}: column {column.identity} cannot hold sealed values; "
        "store encrypted columns as text, varchar without a length, or bytea"
    )


_VIEWS_QUERY = """
SELECT DISTINCT v.oid, n.nspname, v.relname,
       pg_catalog.pg_get_viewdef(v.oid) AS definition
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND d.refobjid = ANY($1::oid[])
  AND v.relkind IN ('v', 'm')
  AND v.oid <> ALL($1::oid[])
"""

_VIEW_COLUMNS_QUERY = """
SELECT attnum, attname FROM pg_catalog.pg_attribute
WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
ORDER BY attnum
"""


async def _add_views(conn: Any, catalog: Catalog) -> Catalog:
    """Add the views and materialized views over ruled tables, at any depth.

    A view column is traced to the encrypted columns its definition returns
    unchanged, so reading the view unseals like reading the table.
    """
    from proxy.sql.analyze import Analyzer

    while True:
        known = [table.oid for table in catalog.tables]
        rows = await conn.fetch(_VIEWS_QUERY, known)
        if not rows:
            return catalog
        views = []
        for row in rows:
            columns = await conn.fetch(_VIEW_COLUMNS_QUERY, row["oid"])
            view = _ruled_view(Analyzer(catalog), row, columns)
            if view is not None:
                views.append(view)
        if not views:
            return catalog
        catalog = catalog.with_views(views)


def _ruled_view(analyzer: Any, row: Any, columns: list[Any]) -> RuledTable | None:
    name = f"{row['nspname']}.{row['relname']}"
    try:
        plan = analyzer.plan(row["definition"])
    except PgsealError as exc:
        # The view's encrypted columns stay untraced, so they read as ciphertext.
        log.warning("view %s over an encrypted column cannot be traced: %s", name, exc)
        return None
    outputs = plan.outputs or ()
    names = tuple(column["attname"] for column in columns)
    fields = {}
    encrypted = {}
    associated: dict[str, tuple[str, ...] | None] = {}
    for index, (column, trace) in enumerate(zip(columns, outputs)):
        if trace:
            fields[column["attnum"]] = trace
            encrypted[column["attname"]] = trace[0]
        if any(candidate.associated for candidate in trace):
            indexes = plan.associations.get(index)
            associated[column["attname"]] = (
                tuple(names[i] for i in indexes) if indexes is not None else None
            )
    if not encrypted:
        return None
    return RuledTable(
        row["oid"],
        row["nspname"],
        row["relname"],
        names,
        encrypted,
        fields,
        is_view=True,
        associated=associated,
    )
