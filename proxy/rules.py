"""Rule files: which columns of which tables are encrypted, and how.

Every `*.yaml` file in the rules folder is read. A file looks like this::

    tables:
      - name: public.oauth_tokens
        database: app            # optional, defaults to the upstream database
        columns:
          - name: access_token
            encryption: randomized
            associated_columns: [user_id]   # optional

Validation is strict: an unknown key, a wrong type or a missing field is an
error that names the file and the line, because a typo in a rule would
otherwise leave a column in plaintext without anyone noticing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml  # type: ignore[import-untyped]
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode  # type: ignore[import-untyped]

from proxy.errors import RuleError
from proxy.types import TYPES


class Encryption(enum.Enum):
    RANDOMIZED = "randomized"
    DETERMINISTIC = "deterministic"


class KeyScope(enum.Enum):
    """The scope of a column's data keys: the whole column, or each subject."""

    COLUMN = "column"
    """One data key (and its versions) for every value of the column."""

    SUBJECT = "subject"
    """One data key per value of the row's subject column, such as an owner id."""


class OnDecryptError(enum.Enum):
    """The value a client reads when a stored value of the column fails to open."""

    ERROR = "error"
    NULL = "null"
    CIPHERTEXT = "ciphertext"


@dataclass(frozen=True, slots=True)
class Source:
    """The file and line of a rule, for error messages."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"rule file {self.path} line {self.line}"


@dataclass(frozen=True, slots=True)
class ColumnRule:
    schema: str
    table: str
    column: str
    encryption: Encryption
    source: Source
    key: str | None = None
    on_decrypt_error: OnDecryptError = OnDecryptError.ERROR
    # The type the application sees, and the table's storage type; None
    # means the column's own type.
    type: str | None = None
    storage: str | None = None
    # Seconds after which the proxy creates a new data key version for new
    # values; randomized columns only. None means only operators rotate.
    rotation_period: float | None = None
    # The keyring set of the config file that wraps this column's data keys;
    # None means the set named 'default'.
    keyring: str | None = None
    # Plain columns of the same table whose values in the row are bound into
    # each value's associated data, in this order.
    associated_columns: tuple[str, ...] = ()
    key_scope: KeyScope = KeyScope.COLUMN
    # With key_scope subject: the plain column of the same table whose
    # value in each row selects the data key.
    subject_column: str | None = None

    @property
    def identity(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"

    @property
    def key_name(self) -> str:
        """The data key's name, which every value's associated data also binds.

        Columns that share a `key` share this name, so equal plaintexts seal
        to equal ciphertexts across them and they can be joined.
        """
        return f"key:{self.key}" if self.key else self.identity


@dataclass(frozen=True, slots=True)
class TableRule:
    schema: str
    table: str
    database: str | None
    columns: tuple[ColumnRule, ...]
    source: Source

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    tables: tuple[TableRule, ...]

    def for_database(self, database: str, default: str) -> tuple[TableRule, ...]:
        """Return the table rules that apply to `database`.

        A rule without a `database` key applies to the `default` database,
        the one named in the proxy's upstream connection string.
        """
        return tuple(
            rule for rule in self.tables if (rule.database or default) == database
        )

    def databases(self, default: str) -> set[str]:
        return {rule.database or default for rule in self.tables}


_TABLE_KEYS = {"name", "database", "columns"}
_COLUMN_KEYS = {
    "name",
    "encryption",
    "key",
    "on_decrypt_error",
    "type",
    "storage",
    "rotation_period",
    "keyring",
    "associated_columns",
    "key_scope",
    "subject_column",
}
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_STORAGES = ("text", "bytea")


def load_rules(folder: Path) -> RuleSet:
    """Read and validate every `*.yaml` file in `folder`."""
    if not folder.is_dir():
        raise RuleError(f"rules folder {folder} does not exist or is not a folder")
    tables: list[TableRule] = []
    for path in sorted(folder.glob("*.yaml")):
        tables.extend(load_rule_file(path))
    _check_duplicates(tables)
    return RuleSet(tuple(tables))


def load_rule_file(path: Path) -> list[TableRule]:
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RuleError(f"rule file {path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise RuleError(f"rule file {path}: cannot be read: {exc}") from exc
    if root is None:
        return []
    mapping = _mapping(path, root, "the document", {"tables"})
    if "tables" not in mapping:
        raise RuleError(f"{_source(path, root)}: missing key 'tables'")
    items = _sequence(path, mapping["tables"], "tables")
    return [_table(path, item) for item in items]


def _table(path: Path, node: Node) -> TableRule:
    mapping = _mapping(path, node, "a table", _TABLE_KEYS)
    name = _required_scalar(path, node, mapping, "name")
    schema, _, table = name.rpartition(".")
    schema = schema or "public"
    database = None
    if "database" in mapping:
        database = _scalar(path, mapping["database"], "database")
    if "columns" not in mapping:
        raise RuleError(f"{_source(path, node)}: table {name} has no 'columns'")
    column_nodes = _sequence(path, mapping["columns"], "columns")
    if not column_nodes:
        raise RuleError(f"{_source(path, node)}: table {name} lists no columns")
    columns = tuple(_column(path, item, schema, table) for item in column_nodes)
    _check_associated_names(path, column_nodes, columns)
    _check_subject_columns(columns)
    return TableRule(schema, table, database, columns, _source(path, node))


def _column(path: Path, node: Node, schema: str, table: str) -> ColumnRule:
    mapping = _mapping(path, node, "a column", _COLUMN_KEYS)
    name = _required_scalar(path, node, mapping, "name")
    encryption = _choice(path, mapping, "encryption", Encryption, Encryption.RANDOMIZED)
    on_error = _choice(
        path, mapping, "on_decrypt_error", OnDecryptError, OnDecryptError.ERROR
    )
    key = None
    if "key" in mapping:
        key = _scalar(path, mapping["key"], "key")
        if encryption is not Encryption.DETERMINISTIC:
            raise RuleError(
                f"{_source(path, mapping['key'])}: column {name} sets 'key' but only "
                "deterministic columns can share a data key"
            )
    logical = _optional_choice(path, mapping, "type", tuple(TYPES))
    storage = _optional_choice(path, mapping, "storage", _STORAGES)
    if on_error is OnDecryptError.CIPHERTEXT and logical not in (None, "text", "varchar", "bytea"):
        raise RuleError(
            f"{_source(path, mapping['on_decrypt_error'])}: column {name} has type "
            f"{logical}, which cannot carry ciphertext; use 'error' or 'null'"
        )
    rotation_period = _rotation_period(path, mapping, name, encryption)
    keyring = None
    if "keyring" in mapping:
        keyring = _scalar(path, mapping["keyring"], "keyring")
    associated = _associated_columns(path, mapping, name, encryption)
    key_scope, subject_column = _key_scope(path, node, mapping, name, encryption)
    return ColumnRule(
        schema,
        table,
        name,
        encryption,
        _source(path, node),
        key,
        on_error,
        logical,
        storage,
        rotation_period,
        keyring,
        associated,
        key_scope,
        subject_column,
    )


def _associated_columns(
    path: Path, mapping: dict[str, Node], name: str, encryption: Encryption
) -> tuple[str, ...]:
    if "associated_columns" not in mapping:
        return ()
    node = mapping["associated_columns"]
    if encryption is Encryption.DETERMINISTIC:
        raise RuleError(
            f"{_source(path, node)}: column {name} is deterministic and sets "
            "'associated_columns', but a search value for it would then have to be "
            "sealed with the values of the row it is looking for; use "
            "'encryption: randomized' for a column bound to other columns"
        )
    items = _sequence(path, node, "associated_columns")
    if not items:
        raise RuleError(
            f"{_source(path, node)}: 'associated_columns' of column {name} is an "
            "empty list; name at least one column or remove the key"
        )
    names: list[str] = []
    for item in items:
        other = _scalar(path, item, "associated_columns")
        if other == name:
            raise RuleError(
                f"{_source(path, item)}: column {name} lists itself in "
                "'associated_columns'; name other columns of the same table"
            )
        if other in names:
            raise RuleError(
                f"{_source(path, item)}: column {name} lists {other!r} twice in "
                "'associated_columns'"
            )
        names.append(other)
    return tuple(names)


def _check_associated_names(
    path: Path, nodes: list[Node], columns: tuple[ColumnRule, ...]
) -> None:
    """Reject an associated column that is itself encrypted.

    Its stored value would be ciphertext, which differs from the plaintext the
    application sends, so the associated data could not be rebuilt.
    """
    encrypted = {column.column for column in columns}
    for node, column in zip(nodes, columns):
        items = _associated_items(node)
        for item, other in zip(items, column.associated_columns):
            if other in encrypted:
                raise RuleError(
                    f"{_source(path, item)}: column {column.column} lists encrypted "
                    f"column {other!r} in 'associated_columns'; only plain columns "
                    "of the same table can be associated"
                )


def _key_scope(
    path: Path, node: Node, mapping: dict[str, Node], name: str, encryption: Encryption
) -> tuple[KeyScope, str | None]:
    scope = _choice(path, mapping, "key_scope", KeyScope, KeyScope.COLUMN)
    subject = None
    if "subject_column" in mapping:
        subject = _scalar(path, mapping["subject_column"], "subject_column")
    if scope is KeyScope.COLUMN:
        if subject is not None:
            raise RuleError(
                f"{_source(path, mapping['subject_column'])}: column {name} sets "
                "'subject_column' but not 'key_scope: subject'; add it, or remove "
                "'subject_column'"
            )
        return scope, None
    where = _source(path, mapping["key_scope"])
    if encryption is Encryption.DETERMINISTIC:
        raise RuleError(
            f"{where}: column {name} is deterministic and cannot be keyed per "
            "subject: equal values of different subjects would seal differently, "
            "so equality search, joins and unique constraints would stop matching; "
            "use 'encryption: randomized' or 'key_scope: column'"
        )
    if "rotation_period" in mapping:
        raise RuleError(
            f"{where}: column {name} is keyed per subject and sets "
            "'rotation_period', which only rotates column keys; remove it"
        )
    if subject is None:
        raise RuleError(
            f"{_source(path, node)}: column {name} sets 'key_scope: subject' but "
            "no 'subject_column'; name the plain column of the same table that "
            "identifies each row's subject, for example 'subject_column: creator_id'"
        )
    if subject == name:
        raise RuleError(
            f"{_source(path, mapping['subject_column'])}: column {name} names "
            "itself as its subject_column; name a plain column of the same table"
        )
    return scope, subject


def _check_subject_columns(columns: tuple[ColumnRule, ...]) -> None:
    """Reject a subject column that is itself encrypted: it must stay readable."""
    encrypted = {column.column for column in columns}
    for column in columns:
        if column.subject_column in encrypted:
            raise RuleError(
                f"{column.source}: column {column.identity} takes its subject from "
                f"{column.subject_column}, which is encrypted; the subject column "
                "must be a plain column, so that the proxy can read each row's subject"
            )


def _rotation_period(
    path: Path, mapping: dict[str, Node], name: str, encryption: Encryption
) -> float | None:
    if "rotation_period" not in mapping:
        return None
    node = mapping["rotation_period"]
    if encryption is Encryption.DETERMINISTIC:
        raise RuleError(
            f"{_source(path, node)}: column {name} is deterministic and sets "
            "'rotation_period', but deterministic keys never rotate by themselves: "
            "a new version would stop equality search, joins and unique "
            "constraints from matching older rows; rotate it with "
            "pgseal keys rotate and re-encrypt instead"
        )
    text = _scalar(path, node, "rotation_period")
    seconds = parse_duration(text)
    if seconds is None:
        raise RuleError(
            f"{_source(path, node)}: invalid rotation_period {text!r}; expected a "
            "positive whole number followed by d, h, m or s, for example 90d"
        )
    return seconds


def parse_duration(text: str) -> float | None:
    """Return the seconds in a duration such as 90d, 12h, 30m or 45s, else None."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not (number.isascii() and number.isdigit()):
        return None
    if int(number) == 0:
        return None
    return float(int(number) * _DURATION_UNITS[unit])


def _optional_choice(
    path: Path, mapping: dict[str, Node], key: str, choices: tuple[str, ...]
) -> str | None:
    if key not in mapping:
        return None
    value = _scalar(path, mapping[key], key)
    if value not in choices:
        raise RuleError(
            f"{_source(path, mapping[key])}: invalid {key} {value!r}; "
            f"expected one of: {', '.join(choices)}"
        )
    return value


_E = TypeVar("_E", bound=enum.Enum)


def _choice(
    path: Path, mapping: dict[str, Node], key: str, choices: type[_E], default: _E
) -> _E:
    if key not in mapping:
        return default
    value = _scalar(path, mapping[key], key)
    try:
        return choices(value)
    except ValueError:
        allowed = ", ".join(str(choice.value) for choice in choices)
        raise RuleError(
            f"{_source(path, mapping[key])}: invalid {key} {value!r}; "
            f"expected one of: {allowed}"
        ) from None


def _check_duplicates(tables: list[TableRule]) -> None:
    seen: dict[tuple[str | None, str, str], Source] = {}
    for rule in tables:
        for column in rule.columns:
            key = (rule.database, column.schema, column.table + "." + column.column)
            if key in seen:
                raise RuleError(
                    f"{column.source}: column {column.identity} is already "
                    f"ruled in {seen[key]}"
                )
            seen[key] = column.source


def _associated_items(column_node: Node) -> list[Node]:
    for key_node, value_node in column_node.value:
        if key_node.value == "associated_columns":
            return list(value_node.value)
    return []


def _source(path: Path, node: Node) -> Source:
    return Source(path, node.start_mark.line + 1)


def _mapping(
    path: Path, node: Node, what: str, allowed: set[str]
) -> dict[str, Node]:
    if not isinstance(node, MappingNode):
        raise RuleError(f"{_source(path, node)}: {what} must be a mapping")
    result: dict[str, Node] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, ScalarNode) else None
        if key not in allowed:
            expected = ", ".join(sorted(allowed))
            raise RuleError(
                f"{_source(path, key_node)}: unknown key {key!r} in {what}; "
                f"expected one of: {expected}"
            )
        result[key] = value_node
    return result


def _sequence(path: Path, node: Node, key: str) -> list[Node]:
    if not isinstance(node, SequenceNode):
        raise RuleError(f"{_source(path, node)}: '{key}' must be a list")
    return list(node.value)


def _scalar(path: Path, node: Node, key: str) -> str:
    if not isinstance(node, ScalarNode) or not node.value:
        raise RuleError(f"{_source(path, node)}: '{key}' must be a non-empty string")
    return str(node.value)


def _required_scalar(
    path: Path, parent: Node, mapping: dict[str, Node], key: str
) -> str:
    if key not in mapping:
        raise RuleError(f"{_source(path, parent)}: missing key '{key}'")
    return _scalar(path, mapping[key], key)
