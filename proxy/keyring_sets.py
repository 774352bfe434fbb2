"""Keyring sets: which keyrings wrap the data keys of which rule columns.

A set is an ordered list of keyrings. Creating a data key needs every
keyring of its column's set, and unwrapping needs any one, tried in order.
The set named `default` serves every column whose rule names none.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.config import DEFAULT_SET
from proxy.crypto.keyring import Keyring, parse_keyring_spec
from proxy.crypto.keystore import KeyStore
from proxy.errors import ConfigError
from proxy.rules import ColumnRule, RuleSet

__all__ = ["KeyringSets", "load_keyring_sets", "set_names"]


@dataclass(frozen=True)
class KeyringSets:
    """Loaded keyrings by set name. A spec named in several sets is loaded once."""

    sets: Mapping[str, tuple[Keyring, ...]]

    @property
    def keyrings(self) -> tuple[Keyring, ...]:
        """Every distinct keyring, in the order of first mention."""
        seen: dict[int, Keyring] = {}
        for keyrings in self.sets.values():
            for keyring in keyrings:
                seen.setdefault(id(keyring), keyring)
        return tuple(seen.values())

    @property
    def default(self) -> tuple[Keyring, ...]:
        return self.sets[DEFAULT_SET]

    def for_columns(self, columns: Iterable[ColumnRule]) -> dict[str, tuple[Keyring, ...]]:
        """Return the keyring set of each column's key name.

        Raises ConfigError for a set name that is not defined, and for
        columns that share a data key but name different sets.
        """
        names = set_names(columns, self.sets)
        return {key_name: self.sets[name] for key_name, name in names.items()}

    def for_rules(self, rules: RuleSet) -> dict[str, tuple[Keyring, ...]]:
        """Return the keyring set of each key name of the rules."""
        return self.for_columns(c for table in rules.tables for c in table.columns)

    def assign(self, store: KeyStore, rules: RuleSet | None) -> None:
        """Tell the key store which set wraps each key name of the rules."""
        mapping = self.for_rules(rules) if rules is not None else {}
        store.assign_keyrings(mapping, self.default)


def set_names(columns: Iterable[ColumnRule], defined: Collection[str]) -> dict[str, str]:
    """Return the keyring set name of each column's key name.

    Raises ConfigError for a set name not in defined, and for columns that
    share a data key but name different sets.
    """
    chosen: dict[str, ColumnRule] = {}
    result: dict[str, str] = {}
    for column in columns:
        name = column.keyring or DEFAULT_SET
        if name not in defined:
            raise ConfigError(_unknown_set(column, name, defined))
        other = chosen.setdefault(column.key_name, column)
        if (other.keyring or DEFAULT_SET) != name:
            raise ConfigError(
                f"{column.source}: column {column.identity} uses keyring set "
                f"{name!r}, but {other.identity} ({other.source}) shares its "
                f"data key {column.key_name!r} and uses "
                f"{other.keyring or DEFAULT_SET!r}; give both the same set"
            )
        result[column.key_name] = name
    return result


def load_keyring_sets(
    default: Sequence[str], named: Mapping[str, Sequence[str]]
) -> KeyringSets:
    """Load the keyrings of every set. May block, as a KMS client is built."""
    if DEFAULT_SET in named:
        raise ConfigError(f"keyring set {DEFAULT_SET!r} is given twice")
    loaded: dict[str, Keyring] = {}
    sets: dict[str, tuple[Keyring, ...]] = {}
    for name, specs in ((DEFAULT_SET, default), *named.items()):
        if not specs:
            raise ConfigError(f"keyring set {name!r} is empty")
        for spec in specs:
            if spec not in loaded:
                loaded[spec] = parse_keyring_spec(spec)
        sets[name] = tuple(loaded[spec] for spec in specs)
    return KeyringSets(sets)


def _unknown_set(column: ColumnRule, name: str, sets: Collection[str]) -> str:
    if set(sets) == {DEFAULT_SET}:
        return (
            f"{column.source}: column {column.identity} names keyring set "
            f"{name!r}, but only the default set is defined; define it under "
            "'keyrings' in a config file given with --config"
        )
    return (
        f"{column.source}: column {column.identity} names keyring set {name!r}, "
        f"which the config file does not define; defined sets: "
        f"{', '.join(sorted(sets))}"
    )
