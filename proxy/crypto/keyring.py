"""Keyrings: key-encryption keys that wrap and unwrap data keys.

The AWS KMS keyring is in proxy.crypto.kms, the Vault Transit keyring in
proxy.crypto.vault.

The sodium keyring keeps an X25519 key pair in a directory:

- ``public.key``: the 32-byte public key as 64 lowercase hexadecimal
  characters and a newline.
- ``private.key``: the 32-byte private key in the same encoding, mode 0600;
- or instead ``private.key.enc``: the private key encrypted under a
  passphrase (Argon2id and XSalsa20-Poly1305), mode 0600.

A directory that holds only ``public.key`` gives a write-only keyring, which
can wrap data keys but not unwrap them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl

import nacl.exceptions
from nacl.public import PrivateKey, PublicKey, SealedBox

from proxy.crypto.keyfile import (
    DEFAULT_MEMLIMIT,
    DEFAULT_OPSLIMIT,
    ENCRYPTED_PRIVATE_KEY_FILE,
    KEY_FILES,
    PASSPHRASE_OPTION,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    X25519_KEY_SIZE,
    check_limits,
    check_passphrase,
    encrypt_private_key,
    load_private_key,
    make_keydir,
    read_key_file,
    write_new_file,
)
from proxy.errors import ConfigError, KeyringError

__all__ = [
    "Keyring",
    "RemoteKeyring",
    "SodiumKeyring",
    "SodiumSpec",
    "context_digest",
    "parse_keyring_spec",
    "parse_sodium_spec",
]

logger = logging.getLogger(__name__)

_CONTEXT_DIGEST_SIZE = hashlib.sha256().digest_size
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Keyring(Protocol):
    """A key-encryption key that wraps data keys for storage.

    Implementations may block (network calls to a KMS), so async callers run
    wrap() and unwrap() in a worker thread.
    """

    @property
    def name(self) -> str:
        """Stable identifier stored next to each wrapped data key."""
        ...

    @property
    def can_unwrap(self) -> bool:
        """False for a write-only keyring, which has no private key."""
        ...

    def wrap(self, data_key: bytes, context: str) -> bytes:
        """Encrypt data_key, bound to context. Raises KeyringError on failure."""
        ...

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        """Decrypt a wrapped data key for the same context.

        Raises KeyringError on failure.
        """
        ...


def check_remote_settings(
    max_retries: int, connect_timeout: float, read_timeout: float
) -> None:
    """Validate the retry count and timeouts (seconds) of a remote keyring."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError("max_retries must be an int")
    if max_retries < 0:
        raise ValueError(f"max_retries must not be negative, got {max_retries}")
    for name, value in (
        ("connect_timeout", connect_timeout),
        ("read_timeout", read_timeout),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive seconds, got {value}")


@runtime_checkable
class RemoteKeyring(Keyring, Protocol):
    """A keyring that calls a remote service, such as a KMS, and counts the calls."""

    service: str
    """Name of the remote service in log lines, such as KMS or Vault."""

    calls: int
    """Number of remote API calls made, failed ones included."""

    operations: Counter[str]
    """Number of remote API calls made per operation name."""


@dataclass(frozen=True, repr=False)
class SodiumKeyring:
    """A keyring of X25519 sealed boxes (libsodium, through PyNaCl).

    A sealed box has no associated data, so wrap() seals sha256(context)
    followed by the data key, and unwrap() checks that digest.
    """

    keydir: Path
    public_key: PublicKey = field(repr=False)
    private_key: PrivateKey | None = field(default=None, repr=False)
    passphrase_protected: bool = False

    @property
    def name(self) -> str:
        """``sodium:`` and the first 16 hex digits of sha256(public key)."""
        digest = hashlib.sha256(bytes(self.public_key)).hexdigest()
        return f"sodium:{digest[:16]}"

    @property
    def can_unwrap(self) -> bool:
        return self.private_key is not None

    def __repr__(self) -> str:
        return (
            f"SodiumKeyring(name={self.name!r}, keydir={str(self.keydir)!r}, "
            f"can_unwrap={self.can_unwrap}, "
            f"passphrase_protected={self.passphrase_protected})"
        )

    @classmethod
    def create(
        cls,
        keydir: Path,
        *,
        private_key: bytes | None = None,
        passphrase: str | None = None,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> SodiumKeyring:
        """Write a key pair to keydir: a new one, or the given private key's.

        With a passphrase, the private key goes to ``private.key.enc``,
        encrypted under a key that Argon2id derives from the passphrase with
        opslimit passes over memlimit bytes. Creates keydir with mode 0700 if
        missing. Raises KeyringError if a key file already exists, so a key
        pair is never overwritten.
        """
        keydir = Path(keydir)
        if private_key is not None and len(private_key) != X25519_KEY_SIZE:
            raise ValueError(f"private_key must be {X25519_KEY_SIZE} bytes")
        if passphrase is not None:
            check_passphrase(passphrase)
            check_limits(opslimit, memlimit)
        make_keydir(keydir)
        for file_name in KEY_FILES:
            if (keydir / file_name).exists():
                raise KeyringError(
                    f"key file {keydir / file_name} already exists, and pgseal "
                    "never overwrites a key pair: remove the old pair first or "
                    "choose another directory"
                )

        secret = PrivateKey(private_key) if private_key else PrivateKey.generate()
        if passphrase is None:
            private_path = keydir / PRIVATE_KEY_FILE
            private_text = bytes(secret).hex() + "\n"
        else:
            private_path = keydir / ENCRYPTED_PRIVATE_KEY_FILE
            private_text = encrypt_private_key(
                bytes(secret), passphrase, opslimit, memlimit
            )
        write_new_file(private_path, private_text, 0o600)
        try:
            public_text = bytes(secret.public_key).hex() + "\n"
            write_new_file(keydir / PUBLIC_KEY_FILE, public_text, 0o644)
        except KeyringError:
            # Leave no half pair behind: a private key without its public key
            # would block the next create() and fail every load().
            private_path.unlink(missing_ok=True)
            raise
        keyring = cls(keydir, secret.public_key, secret, passphrase is not None)
        logger.info("wrote sodium key pair %s to %s", keyring.name, keydir)
        return keyring

    @classmethod
    def load(cls, keydir: Path, *, passphrase: str | None = None) -> SodiumKeyring:
        """Read the key pair in keydir, or only its public key if that is all.

        A passphrase is required for ``private.key.enc`` and rejected for the
        other layouts, so that a key believed protected is protected. Raises
        KeyringError if the public key is missing or invalid, if the private
        key file is open to group or others, or if the passphrase is wrong.
        """
        keydir = Path(keydir)
        public_path = keydir / PUBLIC_KEY_FILE
        if not public_path.is_file():
            raise KeyringError(
                f"sodium public key {public_path} not found, so create a key "
                f"pair with: pgseal keys init --keyring sodium:{keydir}"
            )
        public_key = PublicKey(read_key_file(public_path))

        private_bytes = load_private_key(keydir, passphrase)
        if private_bytes is None:
            keyring = cls(keydir, public_key)
            logger.info("loaded write-only sodium keyring %s", keyring.name)
            return keyring
        private_key = PrivateKey(private_bytes)
        if bytes(private_key.public_key) != bytes(public_key):
            raise KeyringError(
                f"sodium keys in {keydir} do not match: the private key is not "
                f"the private key of {public_path}"
            )
        keyring = cls(keydir, public_key, private_key, passphrase is not None)
        logger.info("loaded sodium keyring %s", keyring.name)
        return keyring

    def wrap(self, data_key: bytes, context: str) -> bytes:
        """Seal sha256(context) and data_key to the public key."""
        if not isinstance(data_key, bytes):
            raise TypeError("data_key must be bytes")
        if not data_key:
            raise ValueError("data_key must not be empty")
        payload = context_digest(context) + data_key
        return SealedBox(self.public_key).encrypt(payload)

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        """Open a sealed data key and check that it was wrapped for context."""
        if not isinstance(wrapped, bytes):
            raise TypeError("wrapped must be bytes")
        expected_digest = context_digest(context)
        if self.private_key is None:
            raise KeyringError(
                f"keyring {self.name} cannot unwrap data keys: the private key "
                f"{self.keydir / PRIVATE_KEY_FILE} is not present"
            )

        failure = KeyringError(
            f"keyring {self.name} failed to unwrap the data key for {context!r}"
        )
        try:
            payload = SealedBox(self.private_key).decrypt(wrapped)
        except nacl.exceptions.CryptoError:
            raise failure from None
        digest = payload[:_CONTEXT_DIGEST_SIZE]
        data_key = payload[_CONTEXT_DIGEST_SIZE:]
        if not data_key or not hmac.compare_digest(digest, expected_digest):
            raise failure
        return data_key


@dataclass(frozen=True)
class SodiumSpec:
    """The parts of ``sodium:KEYDIR[?passphrase_env=VAR]``."""

    keydir: Path
    passphrase_env: str | None = None

    def load(self) -> SodiumKeyring:
        """Load the keyring, reading the passphrase from its variable."""
        passphrase = None
        if self.passphrase_env is not None:
            passphrase = read_passphrase(self.passphrase_env)
        return SodiumKeyring.load(self.keydir, passphrase=passphrase)


def parse_keyring_spec(spec: str) -> Keyring:
    """Load the keyring that a spec names.

    The accepted forms are sodium:KEYDIR, with an optional
    ?passphrase_env=VAR, aws-kms:KEY, where KEY is a KMS key id, key ARN,
    alias (alias/NAME) or alias ARN, and vault-transit:KEY_NAME. Raises
    ConfigError for a malformed spec and KeyringError if the keys cannot be
    loaded.
    """
    scheme, separator, location = spec.partition(":")
    if scheme == "sodium" and separator and location:
        return parse_sodium_spec(spec).load()
    if scheme == "aws-kms" and separator and location:
        return _load_aws_kms(spec, location)
    if scheme == "vault-transit" and separator and location:
        return _load_vault_transit(spec, location)
    raise ConfigError(
        f"invalid keyring spec {spec!r}: expected sodium:KEYDIR, aws-kms:KEY or "
        "vault-transit:KEY_NAME, for example sodium:/etc/pgseal/keys, "
        "aws-kms:alias/pgseal or vault-transit:pgseal"
    )


def parse_sodium_spec(spec: str) -> SodiumSpec:
    """Split ``sodium:KEYDIR[?passphrase_env=VAR]`` into its parts.

    Raises ConfigError for another scheme, an empty KEYDIR or an unknown
    option.
    """
    scheme, _, location = spec.partition(":")
    keydir, _, query = location.partition("?")
    if scheme != "sodium" or not keydir:
        raise ConfigError(
            f"invalid sodium keyring spec {spec!r}: expected sodium:KEYDIR or "
            f"sodium:KEYDIR?{PASSPHRASE_OPTION}=VAR"
        )
    if not query:
        return SodiumSpec(Path(keydir))

    try:
        options = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        options = []
    names = [name for name, _ in options]
    if names != [PASSPHRASE_OPTION]:
        raise ConfigError(
            f"invalid sodium keyring spec {spec!r}: the only option is "
            f"{PASSPHRASE_OPTION}=VAR, given once"
        )
    variable = options[0][1]
    if not _ENV_NAME.fullmatch(variable):
        raise ConfigError(
            f"invalid sodium keyring spec {spec!r}: {PASSPHRASE_OPTION} must name "
            f"an environment variable, got {variable!r}"
        )
    return SodiumSpec(Path(keydir), variable)


def read_passphrase(variable: str) -> str:
    """Return the passphrase in environment variable `variable`.

    Raises KeyringError if the variable is unset or empty.
    """
    passphrase = os.environ.get(variable)
    if not passphrase:
        raise KeyringError(
            f"environment variable {variable}, which should hold the passphrase "
            "of the sodium private key, is not set or empty"
        )
    return passphrase


def context_digest(context: str) -> bytes:
    """Return sha256 of the wrap context, which keyrings without associated
    data put in front of the data key and check on unwrap."""
    if not isinstance(context, str):
        raise TypeError("context must be a str")
    if not context:
        raise ValueError("context must not be empty")
    return hashlib.sha256(context.encode("utf-8")).digest()


def _load_aws_kms(spec: str, key_id: str) -> Keyring:
    # Imported here because boto3 takes more than half a second to import,
    # which a proxy with only sodium keyrings need not pay.
    from proxy.crypto.kms import AwsKmsKeyring

    try:
        return AwsKmsKeyring(key_id)
    except ValueError as exc:
        raise ConfigError(f"invalid keyring spec {spec!r}: {exc}") from None


def _load_vault_transit(spec: str, key_name: str) -> Keyring:
    from proxy.crypto.vault import VaultTransitKeyring

    try:
        return VaultTransitKeyring(key_name)
    except ValueError as exc:
        raise ConfigError(f"invalid keyring spec {spec!r}: {exc}") from None
