"""Keyrings: key-encryption keys that wrap and unwrap data keys.

The AWS KMS keyring is in proxy.crypto.kms.

The sodium keyring keeps an X25519 key pair in a directory:

- ``public.key``: the 32-byte public key as 64 lowercase hexadecimal
  characters and a newline.
- ``private.key``: the 32-byte private key in the same encoding, mode 0600.

A directory that holds only ``public.key`` gives a write-only keyring, which
can wrap data keys but not unwrap them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections import Counter
from typing import Protocol, runtime_checkable

import nacl.exceptions
from nacl.public import PrivateKey, PublicKey, SealedBox

from proxy.errors import ConfigError, KeyringError

__all__ = ["Keyring", "RemoteKeyring", "SodiumKeyring", "parse_keyring_spec"]

logger = logging.getLogger(__name__)

PUBLIC_KEY_FILE = "public.key"
PRIVATE_KEY_FILE = "private.key"
_X25519_KEY_SIZE = 32
_CONTEXT_DIGEST_SIZE = hashlib.sha256().digest_size


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


@runtime_checkable
class RemoteKeyring(Keyring, Protocol):
    """A keyring that calls a remote service, such as a KMS, and counts the calls."""

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
            f"can_unwrap={self.can_unwrap})"
        )

    @classmethod
    def create(cls, keydir: Path) -> SodiumKeyring:
        """Generate a key pair and write it to keydir.

        Creates keydir with mode 0700 if missing. Raises KeyringError if
        either key file already exists, so a key pair is never overwritten.
        """
        keydir = Path(keydir)
        _make_keydir(keydir)
        for file_name in (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE):
            if (keydir / file_name).exists():
                raise KeyringError(
                    f"key file {keydir / file_name} already exists, and pgseal "
                    "never overwrites a key pair: remove the old pair first or "
                    "choose another directory"
                )

        private_key = PrivateKey.generate()
        private_path = keydir / PRIVATE_KEY_FILE
        _write_new_file(private_path, bytes(private_key), 0o600)
        try:
            public_key = bytes(private_key.public_key)
            _write_new_file(keydir / PUBLIC_KEY_FILE, public_key, 0o644)
        except KeyringError:
            # Leave no half pair behind: a private key without its public key
            # would block the next create() and fail every load().
            private_path.unlink(missing_ok=True)
            raise
        keyring = cls(keydir, private_key.public_key, private_key)
        logger.info("created sodium key pair %s in %s", keyring.name, keydir)
        return keyring

    @classmethod
    def load(cls, keydir: Path) -> SodiumKeyring:
        """Read the key pair in keydir, or only its public key if that is all.

        Raises KeyringError if the public key is missing or invalid, or if
        the private key file is open to group or others.
        """
        keydir = Path(keydir)
        public_path = keydir / PUBLIC_KEY_FILE
        if not public_path.is_file():
            raise KeyringError(
                f"sodium public key {public_path} not found, so create a key "
                f"pair with: pgseal keys init --keyring sodium:{keydir}"
            )
        public_key = PublicKey(_read_key_file(public_path))

        private_path = keydir / PRIVATE_KEY_FILE
        if not private_path.exists():
            keyring = cls(keydir, public_key)
            logger.info("loaded write-only sodium keyring %s", keyring.name)
            return keyring

        _check_private_mode(private_path)
        private_key = PrivateKey(_read_key_file(private_path))
        if bytes(private_key.public_key) != bytes(public_key):
            raise KeyringError(
                f"sodium keys in {keydir} do not match: {private_path} is not "
                f"the private key of {public_path}"
            )
        keyring = cls(keydir, public_key, private_key)
        logger.info("loaded sodium keyring %s", keyring.name)
        return keyring

    def wrap(self, data_key: bytes, context: str) -> bytes:
        """Seal sha256(context) and data_key to the public key."""
        if not isinstance(data_key, bytes):
            raise TypeError("data_key must be bytes")
        if not data_key:
            raise ValueError("data_key must not be empty")
        payload = _context_digest(context) + data_key
        return SealedBox(self.public_key).encrypt(payload)

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        """Open a sealed data key and check that it was wrapped for context."""
        if not isinstance(wrapped, bytes):
            raise TypeError("wrapped must be bytes")
        expected_digest = _context_digest(context)
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


def parse_keyring_spec(spec: str) -> Keyring:
    """Load the keyring that a spec names.

    The accepted forms are sodium:KEYDIR and aws-kms:KEY, where KEY is a KMS
    key id, key ARN, alias (alias/NAME) or alias ARN. Raises ConfigError for
    a malformed spec and KeyringError if the keys cannot be loaded.
    """
    scheme, separator, location = spec.partition(":")
    if scheme == "sodium" and separator and location:
        return SodiumKeyring.load(Path(location))
    if scheme == "aws-kms" and separator and location:
        return _load_aws_kms(spec, location)
    raise ConfigError(
        f"invalid keyring spec {spec!r}: expected sodium:KEYDIR or aws-kms:KEY, "
        "for example sodium:/etc/pgseal/keys or aws-kms:alias/pgseal"
    )


def _load_aws_kms(spec: str, key_id: str) -> Keyring:
    # Imported here because boto3 takes more than half a second to import,
    # which a proxy with only sodium keyrings need not pay.
    from proxy.crypto.kms import AwsKmsKeyring

    try:
        return AwsKmsKeyring(key_id)
    except ValueError as exc:
        raise ConfigError(f"invalid keyring spec {spec!r}: {exc}") from None


def _context_digest(context: str) -> bytes:
    if not isinstance(context, str):
        raise TypeError("context must be a str")
    if not context:
        raise ValueError("context must not be empty")
    return hashlib.sha256(context.encode("utf-8")).digest()


def _make_keydir(keydir: Path) -> None:
    try:
        keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyringError(f"cannot create key directory {keydir}: {exc}") from exc


def _write_new_file(path: Path, key: bytes, mode: int) -> None:
    """Write a key file that must not exist yet, created with mode from the start.

    O_EXCL makes creation fail if the file (or a symbolic link) exists, and
    passing the mode to open() means the key is never readable by others, not
    even briefly. The process umask can only remove bits from mode.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyringError(
            f"key file {path} already exists, and pgseal never overwrites a key pair"
        ) from None
    except OSError as exc:
        raise KeyringError(f"cannot create key file {path}: {exc}") from exc

    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(key.hex() + "\n")
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyringError(f"cannot write key file {path}: {exc}") from exc


def _check_private_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyringError(f"cannot read private key file {path}: {exc}") from exc
    if mode & 0o077:
        raise KeyringError(
            f"private key file {path} has mode {mode & 0o777:04o}, which lets "
            f"group or others access it; restrict it with: chmod 600 {path}"
        )


def _read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read key file {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _X25519_KEY_SIZE:
        raise KeyringError(
            f"key file {path} is invalid: expected {2 * _X25519_KEY_SIZE} "
            "hexadecimal characters"
        )
    return key
