"""Tests for the sodium keyring in proxy.crypto.keyring."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.crypto.keyring import (
    Keyring,
    SodiumKeyring,
    SodiumSpec,
    parse_keyring_spec,
    parse_sodium_spec,
)
from proxy.errors import ConfigError, KeyringError

CONTEXT = "00112233445566778899aabbccddeeff/public.users.email/1"
DATA_KEY = bytes(range(32))


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def keyring(keydir: Path) -> SodiumKeyring:
    return SodiumKeyring.create(keydir)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_key_files(keydir: Path, keyring: SodiumKeyring) -> None:
    public = (keydir / "public.key").read_text()
    private = (keydir / "private.key").read_text()
    assert len(public.strip()) == 64
    assert len(private.strip()) == 64
    assert public.endswith("\n")
    assert bytes.fromhex(public) == bytes(keyring.public_key)


def test_create_private_key_mode(keydir: Path, keyring: SodiumKeyring) -> None:
    assert file_mode(keydir / "private.key") == 0o600


def test_create_keydir_mode(keydir: Path, keyring: SodiumKeyring) -> None:
    assert file_mode(keydir) == 0o700


def test_create_private_key_mode_with_open_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        SodiumKeyring.create(tmp_path / "keys")
    finally:
        os.umask(previous)
    assert file_mode(tmp_path / "keys" / "private.key") == 0o600


def test_create_refuses_overwrite(keydir: Path, keyring: SodiumKeyring) -> None:
    before = (keydir / "private.key").read_bytes()
    with pytest.raises(KeyringError, match="already exists"):
        SodiumKeyring.create(keydir)
    assert (keydir / "private.key").read_bytes() == before


def test_create_refuses_half_pair(keydir: Path) -> None:
    keydir.mkdir()
    (keydir / "public.key").write_text("00" * 32 + "\n")
    with pytest.raises(KeyringError, match="public.key already exists"):
        SodiumKeyring.create(keydir)
    assert not (keydir / "private.key").exists()


def test_load_round_trip(keydir: Path, keyring: SodiumKeyring) -> None:
    loaded = SodiumKeyring.load(keydir)
    assert loaded.name == keyring.name
    assert loaded.can_unwrap
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert loaded.unwrap(wrapped, CONTEXT) == DATA_KEY


def test_name_format(keyring: SodiumKeyring) -> None:
    prefix, _, digest = keyring.name.partition(":")
    assert prefix == "sodium"
    assert len(digest) == 16
    int(digest, 16)


def test_is_keyring_protocol(keyring: SodiumKeyring) -> None:
    as_protocol: Keyring = keyring
    assert as_protocol.can_unwrap


def test_load_rejects_group_readable(keydir: Path, keyring: SodiumKeyring) -> None:
    private = keydir / "private.key"
    private.chmod(0o640)
    with pytest.raises(KeyringError) as info:
        SodiumKeyring.load(keydir)
    assert "chmod 600" in str(info.value)
    assert str(private) in str(info.value)


def test_load_rejects_other_readable(keydir: Path, keyring: SodiumKeyring) -> None:
    (keydir / "private.key").chmod(0o604)
    with pytest.raises(KeyringError, match="chmod 600"):
        SodiumKeyring.load(keydir)


def test_load_missing_keydir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(KeyringError) as info:
        SodiumKeyring.load(missing)
    assert f"pgseal keys init --keyring sodium:{missing}" in str(info.value)


def test_load_missing_public_key(keydir: Path) -> None:
    keydir.mkdir()
    with pytest.raises(KeyringError, match="pgseal keys init"):
        SodiumKeyring.load(keydir)


def test_load_invalid_public_key(keydir: Path) -> None:
    keydir.mkdir()
    (keydir / "public.key").write_text("not hex\n")
    with pytest.raises(KeyringError, match="invalid"):
        SodiumKeyring.load(keydir)


def test_load_mismatched_pair(tmp_path: Path) -> None:
    first = SodiumKeyring.create(tmp_path / "first")
    second_dir = tmp_path / "second"
    SodiumKeyring.create(second_dir)
    (second_dir / "public.key").unlink()
    (second_dir / "public.key").write_text(bytes(first.public_key).hex() + "\n")
    with pytest.raises(KeyringError, match="do not match"):
        SodiumKeyring.load(second_dir)


def test_public_only_wraps(keydir: Path, keyring: SodiumKeyring) -> None:
    (keydir / "private.key").unlink()
    write_only = SodiumKeyring.load(keydir)
    assert not write_only.can_unwrap
    assert write_only.name == keyring.name

    wrapped = write_only.wrap(DATA_KEY, CONTEXT)
    assert keyring.unwrap(wrapped, CONTEXT) == DATA_KEY
    with pytest.raises(KeyringError, match="private key .* is not present"):
        write_only.unwrap(wrapped, CONTEXT)


def test_unwrap_wrong_context(keyring: SodiumKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    with pytest.raises(KeyringError, match="failed to unwrap"):
        keyring.unwrap(wrapped, CONTEXT.replace("/1", "/2"))


def test_unwrap_other_key_pair(tmp_path: Path) -> None:
    first = SodiumKeyring.create(tmp_path / "first")
    second = SodiumKeyring.create(tmp_path / "second")
    wrapped = first.wrap(DATA_KEY, CONTEXT)
    with pytest.raises(KeyringError, match="failed to unwrap"):
        second.unwrap(wrapped, CONTEXT)


def test_unwrap_tampered(keyring: SodiumKeyring) -> None:
    wrapped = bytearray(keyring.wrap(DATA_KEY, CONTEXT))
    wrapped[-1] ^= 0x01
    with pytest.raises(KeyringError):
        keyring.unwrap(bytes(wrapped), CONTEXT)
    with pytest.raises(KeyringError):
        keyring.unwrap(b"", CONTEXT)


def test_wrap_randomized(keyring: SodiumKeyring) -> None:
    first = keyring.wrap(DATA_KEY, CONTEXT)
    second = keyring.wrap(DATA_KEY, CONTEXT)
    assert first != second
    assert DATA_KEY not in first


def test_wrap_invalid_arguments(keyring: SodiumKeyring) -> None:
    with pytest.raises(TypeError, match="data_key must be bytes"):
        keyring.wrap("key", CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_key must not be empty"):
        keyring.wrap(b"", CONTEXT)
    with pytest.raises(ValueError, match="context must not be empty"):
        keyring.wrap(DATA_KEY, "")


def test_repr_hides_key_bytes(keydir: Path, keyring: SodiumKeyring) -> None:
    text = repr(keyring)
    private_hex = (keydir / "private.key").read_text().strip()
    public_hex = (keydir / "public.key").read_text().strip()
    assert private_hex not in text
    assert public_hex not in text
    assert repr(bytes(keyring.public_key)) not in text
    assert keyring.name in text


def test_parse_spec_sodium(keydir: Path, keyring: SodiumKeyring) -> None:
    parsed = parse_keyring_spec(f"sodium:{keydir}")
    assert parsed.name == keyring.name


@pytest.mark.parametrize("spec", ["", "sodium:", "sodium", "kms:alias/x", "/keys"])
def test_parse_spec_invalid(spec: str) -> None:
    with pytest.raises(ConfigError, match="sodium:KEYDIR"):
        parse_keyring_spec(spec)


def test_parse_sodium_spec_options(keydir: Path) -> None:
    assert parse_sodium_spec(f"sodium:{keydir}") == SodiumSpec(keydir)
    parsed = parse_sodium_spec(f"sodium:{keydir}?passphrase_env=KEY_PASSPHRASE")
    assert parsed == SodiumSpec(keydir, "KEY_PASSPHRASE")


@pytest.mark.parametrize(
    "query",
    [
        "passphrase=secret",
        "passphrase_env=A&passphrase_env=B",
        "passphrase_env=",
        "passphrase_env=NOT-A-NAME",
        "passphrase_env",
    ],
)
def test_parse_sodium_spec_invalid_option(keydir: Path, query: str) -> None:
    with pytest.raises(ConfigError, match="passphrase_env"):
        parse_sodium_spec(f"sodium:{keydir}?{query}")


def test_parse_spec_lists_vault_form() -> None:
    with pytest.raises(ConfigError, match="vault-transit:KEY_NAME"):
        parse_keyring_spec("vault:pgseal")
