"""Sodium key files: the key pair's layout, passphrase protection, safe writes.

``private.key.enc`` is a JSON document:

- ``format``, ``version``: ``pgseal-sodium-private-key`` and 1;
- ``kdf``, ``opslimit``, ``memlimit``, ``salt``: Argon2id with its cost (passes
  and bytes of memory) and its 16-byte salt, in hex, which derive a 32-byte key
  from the UTF-8 passphrase;
- ``ciphertext``: the private key sealed under that key with libsodium's
  secretbox (XSalsa20-Poly1305), as the 24-byte nonce, ciphertext and tag, in
  hex.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.utils
from nacl.pwhash import argon2id
from nacl.secret import SecretBox

from proxy.errors import KeyringError

PUBLIC_KEY_FILE = "public.key"
PRIVATE_KEY_FILE = "private.key"
ENCRYPTED_PRIVATE_KEY_FILE = "private.key.enc"
KEY_FILES = (PRIVATE_KEY_FILE, ENCRYPTED_PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
PASSPHRASE_OPTION = "passphrase_env"
X25519_KEY_SIZE = 32

_KEY_FILE_FORMAT = "pgseal-sodium-private-key"
_KEY_FILE_VERSION = 1
# Argon2id cost of a new passphrase-protected key: libsodium's "moderate"
# preset, 3 passes over 256 MiB. It is paid once per proxy start.
DEFAULT_OPSLIMIT: int = argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT: int = argon2id.MEMLIMIT_MODERATE
# Upper bounds on the cost read from a key file, so that a damaged file cannot
# make the proxy allocate memory without limit: 16 and 4 times libsodium's
# "sensitive" preset.
_MAX_OPSLIMIT: int = 16 * argon2id.OPSLIMIT_SENSITIVE
_MAX_MEMLIMIT: int = 4 * argon2id.MEMLIMIT_SENSITIVE


def load_private_key(keydir: Path, passphrase: str | None) -> bytes | None:
    """Read private.key or private.key.enc, or return None if neither exists."""
    plain_path = keydir / PRIVATE_KEY_FILE
    sealed_path = keydir / ENCRYPTED_PRIVATE_KEY_FILE
    plain, sealed = plain_path.exists(), sealed_path.exists()
    if plain and sealed:
        raise KeyringError(
            f"{keydir} contains both {PRIVATE_KEY_FILE} and "
            f"{ENCRYPTED_PRIVATE_KEY_FILE}, so it is unclear which one is in "
            "use: remove one of them"
        )
    if sealed and passphrase is None:
        raise KeyringError(
            f"sodium private key {sealed_path} is protected by a passphrase, so "
            "name the environment variable that holds it: "
            f"sodium:{keydir}?{PASSPHRASE_OPTION}=VAR"
        )
    if not sealed and passphrase is not None:
        raise KeyringError(
            f"{PASSPHRASE_OPTION} is set, but {keydir} has no passphrase-protected "
            f"{ENCRYPTED_PRIVATE_KEY_FILE}: remove the option, or write a "
            "protected key pair with pgseal keys init --passphrase-env VAR"
        )

    if plain:
        check_private_mode(plain_path)
        return read_key_file(plain_path)
    if sealed and passphrase is not None:
        check_private_mode(sealed_path)
        return decrypt_private_key(sealed_path, passphrase)
    return None


def encrypt_private_key(
    private_key: bytes, passphrase: str, opslimit: int, memlimit: int
) -> str:
    """Return the JSON text of private.key.enc for private_key."""
    salt = nacl.utils.random(argon2id.SALTBYTES)
    box = SecretBox(_derive_key(passphrase, salt, opslimit, memlimit))
    document = {
        "format": _KEY_FILE_FORMAT,
        "version": _KEY_FILE_VERSION,
        "kdf": "argon2id",
        "opslimit": opslimit,
        "memlimit": memlimit,
        "salt": salt.hex(),
        # SecretBox output: the 24-byte nonce, then ciphertext and tag.
        "ciphertext": bytes(box.encrypt(private_key)).hex(),
    }
    return json.dumps(document, indent=2) + "\n"


def decrypt_private_key(path: Path, passphrase: str) -> bytes:
    """Read private.key.enc and return the private key.

    A wrong passphrase and a damaged ciphertext fail the same check, so both
    raise KeyringError "wrong passphrase" without further detail.
    """
    invalid = KeyringError(
        f"key file {path} is invalid: expected a {_KEY_FILE_FORMAT} version "
        f"{_KEY_FILE_VERSION} document written by pgseal keys init"
    )
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyringError(f"cannot read key file {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise invalid from None
    try:
        if (document["format"], document["version"], document["kdf"]) != (
            _KEY_FILE_FORMAT,
            _KEY_FILE_VERSION,
            "argon2id",
        ):
            raise invalid
        opslimit, memlimit = document["opslimit"], document["memlimit"]
        salt = bytes.fromhex(document["salt"])
        ciphertext = bytes.fromhex(document["ciphertext"])
    except (KeyError, TypeError, ValueError):
        raise invalid from None
    if len(salt) != argon2id.SALTBYTES:
        raise invalid
    try:
        check_limits(opslimit, memlimit)
    except (TypeError, ValueError) as exc:
        raise KeyringError(f"key file {path} is invalid: {exc}") from None

    box = SecretBox(_derive_key(passphrase, salt, opslimit, memlimit))
    try:
        private_key = box.decrypt(ciphertext)
    except nacl.exceptions.CryptoError:
        raise KeyringError(f"wrong passphrase for sodium private key {path}") from None
    if len(private_key) != X25519_KEY_SIZE:
        raise invalid
    return private_key


def _derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    key: bytes = argon2id.kdf(
        SecretBox.KEY_SIZE,
        passphrase.encode("utf-8"),
        salt,
        opslimit=opslimit,
        memlimit=memlimit,
    )
    return key


def check_passphrase(passphrase: str) -> None:
    if not isinstance(passphrase, str):
        raise TypeError("passphrase must be a str")
    if not passphrase:
        raise ValueError("passphrase must not be empty")


def check_limits(opslimit: int, memlimit: int) -> None:
    for name, value, low, high in (
        ("opslimit", opslimit, argon2id.OPSLIMIT_MIN, _MAX_OPSLIMIT),
        ("memlimit", memlimit, argon2id.MEMLIMIT_MIN, _MAX_MEMLIMIT),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def make_keydir(keydir: Path) -> None:
    try:
        keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyringError(f"cannot create key directory {keydir}: {exc}") from exc


def write_new_file(path: Path, text: str, mode: int, role: str = "key file") -> None:
    """Write a file that must not exist yet, created with mode from the start.

    O_EXCL makes creation fail if the file (or a symbolic link) exists, and
    passing the mode to open() means the content is never readable by others,
    not even briefly. The process umask can only remove bits from mode.
    Raises KeyringError, whose message names the file by its role.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyringError(
            f"{role} {path} already exists, and pgseal never overwrites it"
        ) from None
    except OSError as exc:
        raise KeyringError(f"cannot create {role} {path}: {exc}") from exc

    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyringError(f"cannot write {role} {path}: {exc}") from exc


def check_private_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyringError(f"cannot read private key file {path}: {exc}") from exc
    if mode & 0o077:
        raise KeyringError(
            f"private key file {path} has mode {mode & 0o777:04o}, which lets "
            f"group or others access it; restrict it with: chmod 600 {path}"
        )


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read key file {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != X25519_KEY_SIZE:
        raise KeyringError(
            f"key file {path} is invalid: expected {2 * X25519_KEY_SIZE} "
            "hexadecimal characters"
        )
    return key
