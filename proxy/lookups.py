"""Lookups on deterministic columns while their key has several live versions.

AES-SIV seals one plaintext to one ciphertext per data key version. After an
operator rotates a deterministic column's key, and until reencrypt has moved
every row and the old versions are retired, the table contains values sealed
under each live version. A lookup must then match any of them, so the proxy
rewrites each compared value. With versions v1 and v2 live:

- `col = $1` is sent as `col = ANY($1::text[])`, and each Bind carries an
  array of the value sealed under v1 and under v2. `col <> $1` becomes
  `col <> ALL($1::text[])`.
- `col IN ($1)` becomes `col IN (($1::text[])[1], ($1::text[])[2])`, and
  `NOT IN` likewise.
- `col = 'a'` becomes `col = ANY(ARRAY['a' under v1, 'a' under v2]::text[])`,
  and `col IN ('a')` becomes `col IN ('a' under v1, 'a' under v2)`.
- `'a' = col` swaps the two sides first.

With one live version nothing is rewritten. Joins, grouping and
deduplication on such a column cannot be rewritten and are rejected while
several versions are live (see VersionCheck).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from proxy.catalog import BYTEA_OID, EncryptedColumn
from proxy.crypto.keycache import KeyRef
from proxy.errors import StatementRejected
from proxy.sql.analyze import SearchValue, StatementPlan, reject

KeyVersions = tuple[tuple[str, tuple[KeyRef, ...]], ...]
"""Per key name, sorted by name, the versions that are not retired."""

# Renders one value sealed under each live version, in SQL literal form.
SealLiteral = Callable[[SearchValue], list[str]]

ROTATION_HINT = (
    "Finish the key rotation: run pgseal reencrypt on the table, then "
    "pgseal keys retire on the column, so that one version remains."
)


@dataclass(frozen=True, slots=True)
class SealedStatement:
    """A statement text with its literals sealed for the key versions live now."""

    text: str
    # The live versions of every key the text depends on. When they change,
    # the statement must be sealed and sent to the server again.
    versions: KeyVersions = ()
    # Parameters rewritten into arrays, which each Bind fills with the value
    # sealed under every live version.
    arrays: frozenset[int] = frozenset()


def statement_keys(plan: StatementPlan) -> tuple[str, ...]:
    """Return the key names whose live versions decide how `plan` is sealed."""
    names = {slot.column.key_name for slot in plan.literals}
    names.update(search.column.key_name for search in plan.searches)
    names.update(check.column.key_name for check in plan.version_checks)
    return tuple(sorted(names))


def check_versions(plan: StatementPlan, live: Mapping[str, tuple[KeyRef, ...]]) -> None:
    """Reject a join or grouping on a column whose key has several live versions."""
    for check in plan.version_checks:
        count = len(live.get(check.column.key_name, ()))
        if count > 1:
            raise _rejected(check.column, check.reason, count)


def lookup_edits(
    plan: StatementPlan,
    live: Mapping[str, tuple[KeyRef, ...]],
    seal_literal: SealLiteral,
) -> tuple[list[tuple[int, int, str]], frozenset[int]]:
    """Return the text edits for lookups on keys with several live versions.

    Also returns the parameters that become arrays of sealed values.
    """
    edits = []
    arrays = set()
    for search in plan.searches:
        count = len(live.get(search.column.key_name, ()))
        if count <= 1:
            continue
        element = "bytea" if search.column.storage_oid == BYTEA_OID else "text"
        if search.number is not None:
            arrays.add(search.number)
            text = _array_parameter(search, element, count)
        else:
            text = _literal_list(search, element, seal_literal(search))
        if search.column_span is None:
            edits.append((search.start, search.end, text))
            continue
        # `'a' = col` becomes `col = ANY(...)`, because ANY is allowed only
        # right of the operator.
        edits.append((search.start, search.end, search.column_text))
        edits.append((*search.column_span, text))
    return edits, frozenset(arrays)


def move_searches(
    searches: tuple[SearchValue, ...], position: Callable[[int], int]
) -> tuple[SearchValue, ...]:
    """Return the searches with their spans mapped into a rewritten text.

    `position` maps an offset of the original text to the rewritten one, as
    after randomized literals became hidden parameters.
    """
    moved = []
    for search in searches:
        literal = search.literal
        if literal is not None:
            literal = replace(
                literal, start=position(literal.start), end=position(literal.end)
            )
        column_span = search.column_span
        if column_span is not None:
            column_span = (position(column_span[0]), position(column_span[1]))
        moved.append(
            replace(
                search,
                start=position(search.start),
                end=position(search.end),
                literal=literal,
                column_span=column_span,
            )
        )
    return tuple(moved)


def covered(start: int, end: int, edits: Sequence[tuple[int, int, str]]) -> bool:
    """Tell whether the span lies inside one of the edits."""
    return any(s <= start and end <= e for s, e, _ in edits)


def _array_parameter(search: SearchValue, element: str, count: int) -> str:
    array = f"${search.number}::{element}[]"
    if search.in_list:
        return ", ".join(f"({array})[{i}]" for i in range(1, count + 1))
    quantifier = "ALL" if search.negated else "ANY"
    return f"{quantifier}({array})"


def _literal_list(search: SearchValue, element: str, sealed: list[str]) -> str:
    if search.in_list:
        return ", ".join(sealed)
    quantifier = "ALL" if search.negated else "ANY"
    return f"{quantifier}(ARRAY[{', '.join(sealed)}]::{element}[])"


def _rejected(column: EncryptedColumn, reason: str, count: int) -> StatementRejected:
    return reject(
        column, f"{reason}, and {count} data key versions of it are live", ROTATION_HINT
    )

