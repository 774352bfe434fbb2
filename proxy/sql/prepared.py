"""SQL-level PREPARE and EXECUTE: sealing the arguments of EXECUTE.

`PREPARE p AS INSERT ... VALUES ($1)` binds its parameters inside the server,
so the values arrive later as the arguments of `EXECUTE p('...')`. The
analysis of PREPARE records which of its parameters reach which encrypted
column; each session keeps that per statement name, and the arguments of a
matching EXECUTE are sealed as literals or Bind parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from proxy.errors import StatementRejected
from proxy.sql.literals import LiteralSlot, find_literal_span

if TYPE_CHECKING:
    from proxy.catalog import EncryptedColumn
    from proxy.sql.analyze import StatementPlan, VersionCheck

Node = dict[str, Any]


@dataclass(frozen=True, slots=True)
class SqlPrepare:
    name: str
    params: dict[int, EncryptedColumn]
    # Lookups, joins and grouping in the prepared statement, which the
    # server runs with every EXECUTE.
    checks: tuple[VersionCheck, ...] = ()
    # Key names of the deterministic literals sealed into the statement and
    # of the checks.
    keys: tuple[str, ...] = ()
    # The live key versions of `keys` when the session sent the PREPARE.
    versions: tuple[object, ...] | None = None


@dataclass(frozen=True, slots=True)
class SqlExecute:
    """An EXECUTE in the statement text, with its argument parse nodes."""

    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class SqlDeallocate:
    name: str | None  # None for DEALLOCATE ALL


class SqlPreparedStatements:
    """One session's SQL-level prepared statements that touch encrypted columns.

    A PREPARE or DEALLOCATE takes effect only when the server reports that
    it completed (`commit`), because a failed one changes nothing there: a
    DEALLOCATE in an aborted transaction must not make the proxy forget which
    arguments of a later EXECUTE to seal.
    """

    def __init__(self) -> None:
        self._params: dict[str, dict[int, EncryptedColumn]] = {}
        self._prepared: dict[str, SqlPrepare] = {}

    def commit(self, change: SqlPrepare | SqlDeallocate) -> None:
        if isinstance(change, SqlPrepare):
            self._params[change.name] = change.params
            self._prepared[change.name] = change
        elif change.name is None:
            self._params.clear()
            self._prepared.clear()
        else:
            self._params.pop(change.name, None)
            self._prepared.pop(change.name, None)

    def get(self, name: str) -> SqlPrepare | None:
        """Return the committed PREPARE of a name, if it touches encrypted columns."""
        return self._prepared.get(name)

    def apply(self, plan: StatementPlan, sql: str) -> StatementPlan:
        """Return the plan with the EXECUTE arguments that need sealing added.

        A statement prepared earlier in the same text counts as well as the
        committed ones; where both name a statement, every argument that
        either seals is sealed, which can only err towards ciphertext.
        """
        if not plan.sql_executes:
            return plan
        pending: dict[str, dict[int, EncryptedColumn]] = {}
        for change in plan.sql_prepared:
            if isinstance(change, SqlPrepare):
                pending[change.name] = change.params
        params = dict(plan.params)
        literals = list(plan.literals)
        checks = list(plan.version_checks)
        for execute in plan.sql_executes:
            targets = {**self._params.get(execute.name, {}), **pending.get(execute.name, {})}
            for number, column in targets.items():
                if number <= len(execute.args):
                    _seal_argument(sql, execute.args[number - 1], column, params, literals)
            prepared = self._prepared.get(execute.name)
            if prepared is not None:
                checks.extend(prepared.checks)
        return replace(
            plan, params=params, literals=tuple(literals), version_checks=tuple(checks)
        )


def _seal_argument(
    sql: str,
    arg: Node,
    column: EncryptedColumn,
    params: dict[int, EncryptedColumn],
    literals: list[LiteralSlot],
) -> None:
    ((kind, body),) = arg.items()
    if kind == "TypeCast":
        ((kind, body),) = body["arg"].items()
    if kind == "ParamRef":
        params[body["number"]] = column
    elif kind == "A_Const":
        if not body.get("isnull"):
            literals.append(find_literal_span(sql, body, column))
    else:
        raise StatementRejected(
            "0A000",
            f"column {column.identity} is encrypted: an EXECUTE argument for it "
            "would be computed by the server and stored in plaintext",
            "Pass the value as a literal or a parameter.",
        )
