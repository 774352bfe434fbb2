"""Encrypted backups of the key store, with the recovery key split into shares.

`pgseal keys backup` writes into one folder:

- ``keystore.backup``: a JSON header and, encrypted with XChaCha20-Poly1305
  under a fresh random 32-byte recovery key, a JSON dump of the tables
  ``pgseal.key_store``, ``key_names``, ``subject_keys``, ``data_keys`` and
  ``wrapped_keys`` and the sodium key pair. The header is the associated data, so an edited header
  fails to open.
- ``share-1.txt`` to ``share-N.txt``: Shamir shares of the recovery key, any K
  of which recover it. pycryptodome's Shamir splits 16-byte secrets, so each
  half of the key is split with the same K and N, and a share contains both.

Fewer than K shares still combine, into a wrong key, which then fails the
backup's authentication tag. `pgseal keys restore` writes the tables into a
new database and the key pair into a new key directory. The file formats
are in docs/recovery.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from Crypto.Protocol.SecretSharing import Shamir
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
)
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from proxy.crypto.keyfile import (
    KEY_FILES,
    PUBLIC_KEY_FILE,
    make_keydir,
    read_key_file,
    write_new_file,
)
from proxy.crypto.keyring import SodiumKeyring
from proxy.crypto.keystore import KeyCache, KeyStore
from proxy.errors import ConfigError, KeyringError, KeyStoreError

__all__ = [
    "BackupSummary",
    "RestoreSummary",
    "Share",
    "backup_key_store",
    "combine_key",
    "restore_key_store",
    "split_key",
]

logger = logging.getLogger(__name__)

BACKUP_FILE = "keystore.backup"
TABLES = ("key_store", "key_names", "subject_keys", "data_keys", "wrapped_keys")
"""The key store's tables, in an order that satisfies their foreign keys."""

RECOVERY_KEY_SIZE = 32
MAX_SHARES = 255
_HALF = RECOVERY_KEY_SIZE // 2
_FORMAT = "pgseal-keystore-backup"
_VERSION = 1
_SHARE_PREFIX = "pgseal-share-v1"
_SHARE_LINE = re.compile(
    rf"{_SHARE_PREFIX}:(?P<backup>[0-9a-f]{{32}}):(?P<threshold>\d+):"
    rf"(?P<index>\d+):(?P<value>[0-9a-f]{{{2 * RECOVERY_KEY_SIZE}}})"
)
# Restore tries every K-subset of the shares given until one opens the
# backup, which finds the good shares when some are damaged. The cap bounds
# the work for a long list of shares.
_MAX_COMBINATIONS = 10_000


@dataclass(frozen=True)
class Share:
    """One Shamir share of a backup's recovery key."""

    backup_id: str
    threshold: int
    index: int
    value: bytes = field(repr=False)

    def to_text(self, count: int) -> str:
        return (
            f"# pgseal recovery share {self.index} of {count} for key store "
            f"backup {self.backup_id}.\n"
            f"# Any {self.threshold} different shares of this backup recover "
            "its recovery key. Keep each share apart from the others.\n"
            f"{_SHARE_PREFIX}:{self.backup_id}:{self.threshold}:{self.index}:"
            f"{self.value.hex()}\n"
        )

    @classmethod
    def read(cls, path: Path) -> Share:
        """Read a share file. Raises KeyringError if it contains no valid share."""
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"cannot read share file {path}: {exc}") from exc
        lines = [line.strip() for line in text.splitlines()]
        data = [line for line in lines if line and not line.startswith("#")]
        match = _SHARE_LINE.fullmatch(data[0]) if len(data) == 1 else None
        if match is None:
            raise KeyringError(
                f"share file {path} is invalid: expected one line "
                f"{_SHARE_PREFIX}:BACKUP_ID:THRESHOLD:INDEX:HEX"
            )
        return cls(
            match["backup"],
            int(match["threshold"]),
            int(match["index"]),
            bytes.fromhex(match["value"]),
        )


@dataclass(frozen=True)
class BackupSummary:
    backup_file: Path
    share_files: tuple[Path, ...]
    data_keys: int
    sodium_copies: int
    """Data keys with a copy wrapped by the backed-up sodium key pair."""


@dataclass(frozen=True)
class RestoreSummary:
    store_id: str
    keyring: str
    data_keys: int
    unwrapped: int
    """Data keys that the restored sodium key pair unwrapped in the new store."""
    retired: int = 0
    """Retired data key versions, restored as retired; part of `data_keys`."""
    store_present: bool = False
    """The database contained this backup's key store already, so no row was written."""
    pair_present: bool = False
    """The key directory contained this backup's key pair already, so no file was written."""


def split_key(key: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Split a 32-byte key into count shares, any threshold of which recover it."""
    if len(key) != RECOVERY_KEY_SIZE:
        raise ValueError(f"key must be {RECOVERY_KEY_SIZE} bytes")
    _check_shares(threshold, count)
    low = Shamir.split(threshold, count, key[:_HALF])
    high = Shamir.split(threshold, count, key[_HALF:])
    shares = []
    for (index, low_share), (high_index, high_share) in zip(low, high, strict=True):
        assert index == high_index
        shares.append((index, low_share + high_share))
    return shares


def combine_key(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """Combine shares into the key. Too few shares give a wrong key, no error."""
    low = Shamir.combine([(index, value[:_HALF]) for index, value in shares])
    high = Shamir.combine([(index, value[_HALF:]) for index, value in shares])
    return low + high


async def backup_key_store(
    connect_args: Mapping[str, Any],
    keyring: SodiumKeyring,
    out: Path,
    count: int,
    threshold: int,
) -> BackupSummary:
    """Write an encrypted backup of the key store and keyring, and its shares.

    Raises ConfigError for invalid share numbers or a keyring without its
    private key, KeyStoreError if the database has no key store, and
    KeyringError if a file exists already or cannot be written.
    """
    _check_shares(threshold, count)
    if keyring.private_key is None:
        raise ConfigError(
            f"keyring {keyring.name} has no private key in {keyring.keydir}, and "
            "a backup without it could not unwrap any data key"
        )
    out = Path(out)
    paths = [out / BACKUP_FILE] + [out / f"share-{i}.txt" for i in range(1, count + 1)]
    for path in paths:
        if path.exists():
            raise KeyringError(f"{path} already exists, and pgseal never overwrites it")

    tables = await _dump_tables(connect_args)
    wrapped_rows = tables["wrapped_keys"]
    sodium_copies = sum(1 for row in wrapped_rows if row["keyring"] == keyring.name)
    if tables["data_keys"] and not sodium_copies:
        raise ConfigError(
            f"keyring {keyring.name} wraps none of the {len(tables['data_keys'])} "
            "data keys, so check that --keyring names the key directory that the "
            "proxies use"
        )

    key = secrets.token_bytes(RECOVERY_KEY_SIZE)
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "backup_id": secrets.token_hex(16),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "store_id": tables["key_store"][0]["store_id"],
        "keyring": keyring.name,
        "threshold": threshold,
        "shares": count,
    }
    payload = {
        "tables": tables,
        "sodium": {
            "public_key": bytes(keyring.public_key).hex(),
            "private_key": bytes(keyring.private_key).hex(),
        },
    }
    make_keydir(out)
    write_new_file(paths[0], _seal(header, payload, key), 0o600, role="backup file")
    shares = split_key(key, threshold, count)
    for path, (index, value) in zip(paths[1:], shares, strict=True):
        share = Share(header["backup_id"], threshold, index, value)
        write_new_file(path, share.to_text(count), 0o600, role="share file")
    logger.info(
        "wrote key store backup %s with %d shares, threshold %d",
        header["backup_id"],
        count,
        threshold,
    )
    return BackupSummary(
        paths[0], tuple(paths[1:]), len(tables["data_keys"]), sodium_copies
    )


async def restore_key_store(
    connect_args: Mapping[str, Any],
    source: Path,
    share_files: Sequence[Path],
    keydir: Path,
    passphrase: str | None = None,
) -> RestoreSummary:
    """Rebuild the key store in an empty database and the key pair in keydir.

    With a passphrase, the private key is written as private.key.enc. A
    database that contains the backup's key store already, with the same data
    key versions, and a keydir that contains its key pair already are left as
    they are, so that a second run changes nothing. Raises KeyringError "not
    enough valid shares" when the shares do not open the backup or keydir
    contains another key pair, and KeyStoreError if the database has other data
    keys.
    """
    header, sealed = _read_backup(Path(source) / BACKUP_FILE)
    shares = _read_shares(share_files, header)
    payload = _open_with_shares(header, sealed, shares)
    private_key = _private_key(payload)
    keydir = Path(keydir)
    has_pair = _contains_key_pair(keydir, private_key)

    tables: dict[str, list[dict[str, Any]]] = payload["tables"]
    try:
        pool = await asyncpg.create_pool(**connect_args, min_size=1, max_size=2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise KeyStoreError(
            f"connecting to the new database at {_address(connect_args)} failed: {exc}"
        ) from exc
    try:
        keyring = SodiumKeyring(keydir, private_key.public_key, private_key)
        await KeyStore(pool, [keyring]).setup()
        pair = None if has_pair else (bytes(private_key), passphrase)
        present = await _load_tables(pool, tables, keydir, pair)
        unwrapped, retired = await _unwrap_all(pool, keyring, tables)
    finally:
        await pool.close()
    store_id = str(tables["key_store"][0]["store_id"])
    logger.info("restored key store %s into %s", store_id, connect_args.get("database"))
    return RestoreSummary(
        store_id,
        keyring.name,
        len(tables["data_keys"]),
        unwrapped,
        retired=retired,
        store_present=present,
        pair_present=has_pair,
    )


def _check_shares(threshold: int, count: int) -> None:
    for name, value in (("threshold", threshold), ("shares", count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int")
    if not 2 <= threshold <= count <= MAX_SHARES:
        raise ConfigError(
            f"shares and threshold must satisfy 2 <= threshold <= shares <= "
            f"{MAX_SHARES}, got {count} shares and threshold {threshold}; a "
            "threshold of 1 would put the recovery key itself in every share"
        )


async def _dump_tables(connect_args: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Read the key store's tables as JSON rows, in one snapshot."""
    try:
        conn = await asyncpg.connect(**connect_args)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise KeyStoreError(
            f"connecting to the key store at {_address(connect_args)} failed: {exc}"
        ) from exc
    try:
        found = await conn.fetchval("SELECT to_regclass('pgseal.wrapped_keys')")
        if found is None:
            raise KeyStoreError(
                f"database {connect_args.get('database')!r} has no pgseal key "
                "store: check --upstream"
            )
        tables: dict[str, Any] = {}
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for table in TABLES:
                if not await conn.fetchval("SELECT to_regclass($1)", f"pgseal.{table}"):
                    # A key store set up before subject keys existed lacks
                    # pgseal.subject_keys.
                    tables[table] = []
                    continue
                text = await conn.fetchval(
                    "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]')::text "
                    f"FROM pgseal.{table} t"
                )
                tables[table] = json.loads(text)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise KeyStoreError(f"reading the key store failed: {exc}") from exc
    finally:
        await conn.close()
    if len(tables["key_store"]) != 1:
        raise KeyStoreError("pgseal.key_store must hold exactly one row")
    return tables


def _seal(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    nonce = secrets.token_bytes(crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)
    plaintext = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _associated_data(header), nonce, key
    )
    document = dict(header)
    document["nonce"] = nonce.hex()
    document["ciphertext"] = base64.b64encode(ciphertext).decode("ascii")
    return json.dumps(document, indent=2) + "\n"


def _associated_data(header: Mapping[str, Any]) -> bytes:
    """Encode the header as canonical JSON: sorted keys, no spaces."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _read_backup(path: Path) -> tuple[dict[str, Any], tuple[bytes, bytes]]:
    """Return the header and the (nonce, ciphertext) of a backup file."""
    invalid = KeyringError(
        f"backup file {path} is invalid: expected a {_FORMAT} version {_VERSION} "
        "document written by pgseal keys backup"
    )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyringError(f"cannot read backup file {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise invalid from None
    try:
        nonce = bytes.fromhex(document.pop("nonce"))
        ciphertext = base64.b64decode(document.pop("ciphertext"), validate=True)
        valid = (document["format"], document["version"]) == (_FORMAT, _VERSION)
        threshold = document["threshold"]
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error):
        raise invalid from None
    if not valid or not isinstance(threshold, int):
        raise invalid
    return document, (nonce, ciphertext)


def _read_shares(paths: Sequence[Path], header: Mapping[str, Any]) -> list[Share]:
    backup_id = header["backup_id"]
    shares: dict[int, Share] = {}
    for path in paths:
        share = Share.read(Path(path))
        if share.backup_id != backup_id:
            raise KeyringError(
                f"share file {path} belongs to backup {share.backup_id}, not to "
                f"backup {backup_id}"
            )
        if share.index in shares:
            raise KeyringError(
                f"share file {path} repeats share {share.index}: give different shares"
            )
        shares[share.index] = share
    threshold = header["threshold"]
    if len(shares) < threshold:
        raise KeyringError(
            f"not enough valid shares: backup {backup_id} needs {threshold} "
            f"different shares, and {len(shares)} were given"
        )
    return list(shares.values())


def _open_with_shares(
    header: dict[str, Any], sealed: tuple[bytes, bytes], shares: list[Share]
) -> dict[str, Any]:
    """Decrypt the payload with the first K-subset of shares that opens it."""
    nonce, ciphertext = sealed
    associated_data = _associated_data(header)
    subsets = itertools.combinations(shares, header["threshold"])
    for subset in itertools.islice(subsets, _MAX_COMBINATIONS):
        key = combine_key([(share.index, share.value) for share in subset])
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, associated_data, nonce, key
            )
        except CryptoError:
            continue
        payload: dict[str, Any] = json.loads(plaintext)
        return payload
    raise KeyringError(
        f"not enough valid shares: no {header['threshold']} of the {len(shares)} "
        f"shares given open backup {header['backup_id']}, so a share is damaged "
        "or the backup file was changed"
    )


def _private_key(payload: Mapping[str, Any]) -> PrivateKey:
    sodium = payload["sodium"]
    private_key = PrivateKey(bytes.fromhex(sodium["private_key"]))
    if bytes(private_key.public_key).hex() != sodium["public_key"]:
        raise KeyringError("the backup's sodium private and public keys do not match")
    return private_key


def _contains_key_pair(keydir: Path, private_key: PrivateKey) -> bool:
    """Tell whether keydir contains the backup's key pair; False if it has no key file.

    Raises KeyringError if it contains another key pair, because pgseal never
    overwrites one.
    """
    present = [name for name in KEY_FILES if (keydir / name).exists()]
    if not present:
        return False
    public_file = keydir / PUBLIC_KEY_FILE
    if public_file.exists() and read_key_file(public_file) == bytes(
        private_key.public_key
    ):
        return True
    raise KeyringError(
        f"key file {keydir / present[0]} already exists and is not the backup's "
        "key pair, and pgseal never overwrites a key pair: restore into a new "
        "key directory"
    )


async def _load_tables(
    pool: asyncpg.Pool[asyncpg.Record],
    tables: Mapping[str, list[dict[str, Any]]],
    keydir: Path,
    pair: tuple[bytes, str | None] | None,
) -> bool:
    """Insert the backed-up rows and write the key pair, all or nothing.

    `pair` is the private key and passphrase to write, or None to write no
    key file. The key files are written inside the transaction, so a failed
    write rolls the rows back, and a failed commit removes the files. Returns
    True if the database contained the backup's key store already, so that no row
    was inserted.
    """
    written = False
    try:
        async with pool.acquire() as conn, conn.transaction():
            tables_sql = ", ".join(f"pgseal.{table}" for table in TABLES)
            await conn.execute(f"LOCK TABLE {tables_sql} IN ACCESS EXCLUSIVE MODE")
            present = await _contains_backup(conn, tables)
            if not present:
                await _insert_backup(conn, tables)
            if pair is not None:
                private_key, passphrase = pair
                # The Argon2id derivation for a passphrase takes seconds.
                await asyncio.to_thread(
                    SodiumKeyring.create,
                    keydir,
                    private_key=private_key,
                    passphrase=passphrase,
                )
                written = True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        if written:
            for name in KEY_FILES:
                (keydir / name).unlink(missing_ok=True)
        raise KeyStoreError(f"restoring the key store failed: {exc}") from exc
    return present


async def _insert_backup(conn: Any, tables: Mapping[str, list[dict[str, Any]]]) -> None:
    await conn.execute("DELETE FROM pgseal.key_store")
    for table in TABLES:
        # Backups made before subject keys existed lack subject_keys.
        await _insert_rows(conn, table, tables.get(table, []))
    await conn.execute(
        "SELECT setval(pg_get_serial_sequence('pgseal.key_names', 'key_id'), "
        "coalesce(max(key_id), 1), max(key_id) IS NOT NULL) "
        "FROM pgseal.key_names"
    )


async def _contains_backup(conn: Any, tables: Mapping[str, list[dict[str, Any]]]) -> bool:
    """Tell whether the key store contains exactly the backup's data key versions.

    Returns False for a key store without data keys. Raises KeyStoreError
    for one with other data keys, which a restore must not mix with the
    backup's.
    """
    store_id = str(await conn.fetchval("SELECT store_id FROM pgseal.key_store"))
    rows = await conn.fetch("SELECT key_id, version FROM pgseal.data_keys")
    if not rows and not await conn.fetchval("SELECT EXISTS (SELECT FROM pgseal.key_names)"):
        return False
    stored = {(row["key_id"], row["version"]) for row in rows}
    backed_up = {(row["key_id"], row["version"]) for row in tables["data_keys"]}
    backup_store = str(tables["key_store"][0]["store_id"])
    if store_id == backup_store and stored == backed_up:
        return True
    if store_id == backup_store:
        raise KeyStoreError(
            f"the database already has a key store: {store_id}, the store this "
            f"backup was taken from, but with other data keys ({len(stored)} "
            f"versions in the database, {len(backed_up)} in the backup); nothing "
            "was changed. Restore into a database without a key store"
        )
    raise KeyStoreError(
        f"the database already has a key store ({store_id}, with {len(stored)} "
        f"data key versions), not the backup's store {backup_store}; nothing was "
        "changed. Restore into a database without a key store"
    )


async def _insert_rows(conn: Any, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    existing = set(
        await conn.fetchval(
            "SELECT array_agg(column_name::text) FROM information_schema.columns "
            "WHERE table_schema = 'pgseal' AND table_name = $1",
            table,
        )
    )
    columns = sorted(rows[0])
    unknown = [column for column in columns if column not in existing]
    if unknown:
        raise KeyStoreError(
            f"the backup has columns {unknown} in pgseal.{table} that this version "
            "of pgseal does not create; restore with the version that made it"
        )
    names = ", ".join(_quote_identifier(column) for column in columns)
    await conn.execute(
        f"INSERT INTO pgseal.{table} ({names}) SELECT {names} "
        f"FROM jsonb_populate_recordset(NULL::pgseal.{table}, $1::jsonb)",
        json.dumps(rows),
    )


async def _unwrap_all(
    pool: asyncpg.Pool[asyncpg.Record],
    keyring: SodiumKeyring,
    tables: Mapping[str, list[dict[str, Any]]],
) -> tuple[int, int]:
    """Unwrap every data key that has a copy for keyring, from the new store.

    Retired versions stay retired. Each is unwrapped once, outside the
    cache, to check its copy. Returns the count of data keys unwrapped and
    the count of retired versions in the backup.
    """
    retired = {
        (row["key_id"], row["version"])
        for row in tables["data_keys"]
        if row.get("state") == "retired"
    }
    store = KeyStore(pool, [keyring], KeyCache())
    await store.setup()
    unwrapped = 0
    for row in tables["wrapped_keys"]:
        if row["keyring"] != keyring.name:
            continue
        ref = (row["key_id"], row["version"])
        if ref in retired:
            await store.unwrap_stored(*ref)
        else:
            await store.get_key(*ref)
        unwrapped += 1
    return unwrapped, len(retired)


def _address(connect_args: Mapping[str, Any]) -> str:
    return f"{connect_args.get('host')}:{connect_args.get('port')}"


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
