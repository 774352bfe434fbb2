"""The exception hierarchy of pgseal: one root, a class per failing layer."""

from __future__ import annotations


class PgsealError(Exception):
    """Root of every error pgseal raises on purpose."""


class ConfigError(PgsealError):
    """Invalid command-line options, keyring specs or settings."""


class RuleError(ConfigError):
    """A rule file that cannot be loaded or does not match the database."""


class UpstreamError(PgsealError):
    """The upstream server that cannot be reached, or that refused a command's work."""


class ClusterError(PgsealError):
    """A throwaway PostgreSQL cluster that failed to initialise, start or stop."""


class KeyringError(PgsealError):
    """A key-encryption key that is missing, unreadable or unusable."""


class KeyUnavailableError(KeyringError):
    """A data key that no keyring could unwrap just now, or that is not loaded.

    The keyrings that hold a copy failed, for example because the KMS could
    not be reached, so the key may load on a later try. Statements that need
    it fail, but the proxy keeps running.
    """


class KeyStoreError(PgsealError):
    """The data-key store in PostgreSQL could not be read or written."""


class DecryptionError(PgsealError):
    """A sealed value could not be opened.

    Raised for every failing check alike (format, key, associated data, tag),
    so that the error tells an attacker nothing about which check failed.
    """

    def __init__(self) -> None:
        super().__init__("sealed value could not be opened")


class ValueNotOpened(DecryptionError):
    """A result value of a named column that failed to open.

    The column comes from the analysis, not from the value, and the failing
    check is still not reported.
    """

    def __init__(self, column: str) -> None:
        PgsealError.__init__(
            self,
            f"a value of encrypted column {column} could not be opened: it was "
            "not sealed for this column, row and key store, or it was changed",
        )
        self.column = column


class AssociatedValuesMissing(DecryptionError):
    """A value of a bound column in a result row that lacks its associated columns.

    The analysis could not trace the row's associated values, as for a
    column read through a subquery, so the value cannot be opened. It names
    the column because no cryptographic check ran.
    """

    def __init__(self, column: str) -> None:
        PgsealError.__init__(
            self,
            f"the result does not contain the associated columns of {column} "
            "from the same row",
        )
        self.column = column


class ProtocolError(PgsealError):
    """A peer sent bytes that break the PostgreSQL v3 protocol."""


class MessageTooLarge(ProtocolError):
    """A peer announced a message longer than the proxy's maximum message size."""

    def __init__(self, source: str, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes from the {source} exceeds the maximum "
            f"message size of {limit} bytes"
        )
        self.source = source
        self.size = size
        self.limit = limit


class StatementRejected(PgsealError):
    """A statement that cannot run on encrypted columns, sent back as an error.

    The proxy rejects instead of passing such a statement through, because
    the server would otherwise store plaintext or compute on ciphertext.
    """

    def __init__(
        self, sqlstate: str, message: str, hint: str = "", position: int | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint
        # 1-based character index into the statement text, as in the
        # ErrorResponse position field.
        self.position = position
