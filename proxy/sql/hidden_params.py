"""Randomized-column literals of a parsed statement, moved into hidden parameters.

A statement that is parsed once and executed many times would store the
same ciphertext at every execution if its literals were sealed at Parse.
Each literal bound for a randomized column is instead replaced by a
parameter numbered after the client's own, and the session fills those
parameters with a fresh seal at every Bind. Literals of deterministic
columns seal alike every time, so they are still sealed once at Parse.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any

from pglast import parser

from proxy.catalog import EncryptedColumn
from proxy.errors import StatementRejected
from proxy.rules import Encryption
from proxy.sql.arrays import STORAGE_ARRAY_OIDS, parse_text_array
from proxy.sql.literals import LiteralSlot
from proxy.types import TEXT_FORMAT

# Statements whose $n are the Bind parameters. Others keep their literals
# sealed once at Parse.
_KINDS = frozenset(
    {
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "SelectStmt",
        "ExecuteStmt",
        "DeclareCursorStmt",
    }
)
# Bind carries the parameter count as a 16-bit unsigned integer.
_MAX_PARAMS = 65535
_LIMIT_EXCEEDED = "54000"
_UNSUPPORTED = "0A000"
_INVALID_TEXT = "22P02"


@dataclass(frozen=True, slots=True)
class HiddenParams:
    """A statement text whose randomized literals became parameters.

    `slots` contains the literal behind each hidden parameter, in order:
    `slots[0]` is parameter `client_count + 1`. `sealed_at_parse` contains
    the other literals, with positions in the new text.
    """

    sql: str
    client_count: int
    slots: tuple[LiteralSlot, ...]
    sealed_at_parse: tuple[LiteralSlot, ...]

    def param_types(self, types: tuple[int, ...]) -> tuple[int, ...]:
        """Return the client's Parse types, padded to its count, and the hidden ones."""
        padded = types + (0,) * (self.client_count - len(types))
        return padded + tuple(_storage_type(slot) for slot in self.slots)

    def position(self, offset: int) -> int:
        """Return where an offset of the client's text lies in `sql`.

        The offset must not fall inside a hidden literal.
        """
        shift = 0
        for number, slot in enumerate(self.slots, self.client_count + 1):
            if slot.end > offset:
                break
            shift += len(f"${number}") - (slot.end - slot.start)
        return offset + shift


# Clients parse the same texts again and again, and the rewrite parses the
# new text, so results are kept like the analyzer's plans.
@functools.lru_cache(maxsize=1024)
def hide_randomized_literals(
    sql: str, literals: tuple[LiteralSlot, ...], declared_count: int
) -> HiddenParams | None:
    """Replace each randomized literal of `sql` by a new parameter, or return None.

    `declared_count` is the number of parameter types the client sent in
    Parse. None means that the literals are to be sealed at Parse: there
    are no randomized ones, or the statement is one whose `$n` can name
    something else, such as PREPARE, where it names the PREPARE's own
    parameters. Raises StatementRejected when a literal is not valid input
    for its column, or when the text does not parse with a parameter in
    its place, as in the typed literal `text 'value'`.
    """
    # TODO: a literal bound to associated columns or keyed per subject is
    # still sealed once at Parse, where its row's values are known.
    hidden = sorted(
        (
            slot
            for slot in literals
            if _randomized(slot.column) and not slot.associated and slot.subject is None
        ),
        key=lambda s: s.start,
    )
    if not hidden:
        return None
    client_count = max(declared_count, _max_param_number(sql))
    if client_count + len(hidden) > _MAX_PARAMS:
        raise StatementRejected(
            _LIMIT_EXCEEDED,
            f"column {hidden[0].column.identity} is encrypted: its literal needs a "
            f"parameter of its own, and the statement has {client_count} already",
            f"A statement can have at most {_MAX_PARAMS} parameters; split it.",
        )
    numbers = {id(slot): client_count + i + 1 for i, slot in enumerate(hidden)}
    pieces = []
    sealed_at_parse = []
    position = 0
    shift = 0
    for slot in sorted(literals, key=lambda s: s.start):
        if id(slot) not in numbers:
            sealed_at_parse.append(
                replace(slot, start=slot.start + shift, end=slot.end + shift)
            )
            continue
        placeholder = f"${numbers[id(slot)]}"
        pieces.append(sql[position : slot.start])
        pieces.append(placeholder)
        position = slot.end
        shift += len(placeholder) - (slot.end - slot.start)
    pieces.append(sql[position:])
    rewritten = "".join(pieces)
    if not _binds_parameters(rewritten, client_count, hidden[0].column):
        return None
    for slot in hidden:
        _check_input(slot)
    return HiddenParams(rewritten, client_count, tuple(hidden), tuple(sealed_at_parse))


def _randomized(column: EncryptedColumn) -> bool:
    return column.rule.encryption is Encryption.RANDOMIZED


def _storage_type(slot: LiteralSlot) -> int:
    storage_oid = slot.column.storage_oid
    if slot.array:
        return STORAGE_ARRAY_OIDS[storage_oid]
    return storage_oid


def _max_param_number(sql: str) -> int:
    numbers = [
        int(sql[token.start + 1 : token.end + 1])
        for token in parser.scan(sql)
        if token.name == "PARAM"
    ]
    return max(numbers, default=0)


def _check_input(slot: LiteralSlot) -> None:
    """Reject a literal that the column's logical type would not accept.

    The literal is sealed only at Bind, so it is checked here, at Parse,
    where the server and a literal sealed at once would report it.
    """
    logical = slot.column.logical
    raw = slot.value.encode("utf-8")
    try:
        values = parse_text_array(raw) if slot.array else [raw]
        for value in values:
            if value is not None:
                logical.from_wire(value, TEXT_FORMAT)
    except (ValueError, UnicodeError):
        raise StatementRejected(
            _INVALID_TEXT,
            f"a literal for encrypted column {slot.column.identity} is not valid "
            f"{logical.name} input",
            "Check the value's format; it is checked by the proxy before sealing.",
        ) from None


def _binds_parameters(sql: str, client_count: int, column: EncryptedColumn) -> bool:
    """Tell whether the rewritten text takes its $n from Bind, or reject it.

    libpg_query accepts a parameter after a type name, as in `text $2`,
    which the server rejects, so such a cast is looked for in the tree.
    """
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError:
        tree = None
    statements = tree.get("stmts", []) if tree is not None else []
    if len(statements) == 1:
        if next(iter(statements[0]["stmt"])) not in _KINDS:
            return False
        if not _has_typed_parameter(statements, client_count):
            return True
    raise StatementRejected(
        _UNSUPPORTED,
        f"column {column.identity} is encrypted: a literal for it cannot be "
        "given a fresh seal at each execution in this form",
        "Write the literal as 'value' or 'value'::type, or send it as a parameter.",
    )


def _has_typed_parameter(node: Any, client_count: int) -> bool:
    """Tell whether a hidden parameter follows a type name, as a typed literal does."""
    if isinstance(node, list):
        return any(_has_typed_parameter(item, client_count) for item in node)
    if not isinstance(node, dict):
        return False
    cast = node.get("TypeCast")
    if cast is not None and cast.get("location", -1) == -1:
        number = cast.get("arg", {}).get("ParamRef", {}).get("number", 0)
        if number > client_count:
            return True
    return any(_has_typed_parameter(value, client_count) for value in node.values())
