"""A statement whose result contains a value that fails to open.

The server has already run the statement and goes on sending its rows, so
the proxy cannot make the statement itself fail. It can still report an
error for it when nothing else depends on the outcome: the session drops
the rest of the result and every message up to ReadyForQuery, then sends an
ErrorResponse in place of the command's completion. That is exact when the
statement only read (its tag is SELECT, FETCH or SHOW) and no other message
of the client got a reply in between. Inside a transaction block the proxy
also sends the server a statement that fails, so that the server's
transaction is aborted as the client now expects. In every other case the
session ends the connection instead, because the client would otherwise
believe that a write or a later statement did not happen.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import (
    AssociatedValuesMissing,
    KeyringError,
    PgsealError,
    ValueNotOpened,
)

SQLSTATE = "XX001"
# Tags of commands that change nothing, so an error in their place is exact.
_READ_TAGS = (b"SELECT", b"FETCH", b"SHOW")
# Messages that may follow the failing row without changing that.
_READ_MESSAGES = frozenset(b"DTns")


@dataclass(slots=True)
class FailedStatement:
    """The state of a statement from its failed result value to ReadyForQuery."""

    error: PgsealError
    # Set once a message shows that the server did more than read.
    changed: bool = False
    # Set while the statement that aborts the server's transaction runs.
    aborting: bool = False

    def note(self, kind: int, tag: bytes) -> None:
        """Record one server message that arrived before ReadyForQuery."""
        if kind == ord("C"):
            if not tag.startswith(_READ_TAGS):
                self.changed = True
        elif kind not in _READ_MESSAGES:
            self.changed = True

    @property
    def message(self) -> str:
        if isinstance(self.error, AssociatedValuesMissing):
            return (
                f"a value of encrypted column {self.error.column} could not be "
                f"opened: {self.error}"
            )
        if isinstance(self.error, ValueNotOpened):
            return str(self.error)
        text = "an encrypted value in the result could not be opened"
        # A KeyringError names the data key and why it is missing, as after
        # a shred. A DecryptionError stays without detail.
        if isinstance(self.error, KeyringError):
            return f"{text}: {self.error}"
        return text

    @property
    def hint(self) -> str:
        if isinstance(self.error, ValueNotOpened):
            return (
                "A value copied from another row or column, or changed in the "
                "table, never opens; restore it, or set on_decrypt_error to null "
                "on the column to read it as NULL."
            )
        if isinstance(self.error, AssociatedValuesMissing):
            return (
                "Select its associated columns beside it from the table itself, "
                "not through a subquery or a WITH query."
            )
        if isinstance(self.error, KeyringError):
            return (
                "A value whose data key was shredded never opens again; set "
                "on_decrypt_error to null on the column to read it as NULL."
            )
        return "Check that the proxy has the keyring that sealed this value."
