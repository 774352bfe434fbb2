"""Tests for passphrase-protected sodium key files (proxy.crypto.keyfile)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from nacl.pwhash import argon2id

from proxy.cli import main
from proxy.crypto.keyring import SodiumKeyring, parse_keyring_spec
from proxy.errors import KeyringError

CONTEXT = "00112233445566778899aabbccddeeff/public.users.email/1"
DATA_KEY = bytes(range(32))
PASSPHRASE = "correct horse battery staple"
# The cheapest Argon2id cost libsodium accepts, so that the tests stay fast;
# `pgseal keys init` uses the moderate preset.
FAST_OPSLIMIT = argon2id.OPSLIMIT_MIN
FAST_MEMLIMIT = argon2id.MEMLIMIT_MIN


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def protected(keydir: Path) -> SodiumKeyring:
    return SodiumKeyring.create(
        keydir, passphrase=PASSPHRASE, opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT
    )


def test_create_writes_encrypted_file(keydir: Path, protected: SodiumKeyring) -> None:
    assert not (keydir / "private.key").exists()
    path = keydir / "private.key.enc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["format"] == "pgseal-sodium-private-key"
    assert document["kdf"] == "argon2id"
    assert document["opslimit"] == argon2id.OPSLIMIT_MIN
    assert document["memlimit"] == argon2id.MEMLIMIT_MIN
    assert len(bytes.fromhex(document["salt"])) == 16
    assert protected.passphrase_protected


def test_file_hides_private_key(keydir: Path, protected: SodiumKeyring) -> None:
    assert protected.private_key is not None
    text = (keydir / "private.key.enc").read_text()
    assert bytes(protected.private_key).hex() not in text
    assert PASSPHRASE not in text


def test_load_with_passphrase(keydir: Path, protected: SodiumKeyring) -> None:
    loaded = SodiumKeyring.load(keydir, passphrase=PASSPHRASE)
    assert loaded.name == protected.name
    assert loaded.can_unwrap
    assert loaded.unwrap(protected.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY


def test_load_wrong_passphrase(keydir: Path, protected: SodiumKeyring) -> None:
    with pytest.raises(KeyringError) as info:
        SodiumKeyring.load(keydir, passphrase="wrong horse")
    message = str(info.value)
    assert "wrong passphrase" in message
    assert "wrong horse" not in message
    assert PASSPHRASE not in message


def test_load_tampered_ciphertext(keydir: Path, protected: SodiumKeyring) -> None:
    path = keydir / "private.key.enc"
    document = json.loads(path.read_text())
    ciphertext = bytearray.fromhex(document["ciphertext"])
    ciphertext[-1] ^= 0x01
    document["ciphertext"] = ciphertext.hex()
    path.write_text(json.dumps(document))
    with pytest.raises(KeyringError, match="wrong passphrase"):
        SodiumKeyring.load(keydir, passphrase=PASSPHRASE)


def test_load_needs_passphrase(keydir: Path, protected: SodiumKeyring) -> None:
    with pytest.raises(KeyringError) as info:
        SodiumKeyring.load(keydir)
    assert f"sodium:{keydir}?passphrase_env=VAR" in str(info.value)


def test_load_rejects_passphrase_for_plain_key(tmp_path: Path) -> None:
    SodiumKeyring.create(tmp_path / "plain")
    with pytest.raises(KeyringError, match="no passphrase-protected"):
        SodiumKeyring.load(tmp_path / "plain", passphrase=PASSPHRASE)


def test_load_rejects_both_private_files(
    keydir: Path, protected: SodiumKeyring
) -> None:
    assert protected.private_key is not None
    plain = keydir / "private.key"
    plain.write_text(bytes(protected.private_key).hex() + "\n")
    plain.chmod(0o600)
    with pytest.raises(KeyringError, match="both private.key and private.key.enc"):
        SodiumKeyring.load(keydir, passphrase=PASSPHRASE)


def test_load_rejects_open_mode(keydir: Path, protected: SodiumKeyring) -> None:
    (keydir / "private.key.enc").chmod(0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        SodiumKeyring.load(keydir, passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format", "other"),
        ("version", 2),
        ("kdf", "scrypt"),
        ("salt", "00"),
        ("ciphertext", "not hex"),
        ("memlimit", 2**50),
        ("opslimit", 0),
    ],
)
def test_load_invalid_document(
    keydir: Path, protected: SodiumKeyring, field: str, value: object
) -> None:
    path = keydir / "private.key.enc"
    document = json.loads(path.read_text())
    document[field] = value
    path.write_text(json.dumps(document))
    with pytest.raises(KeyringError, match="is invalid"):
        SodiumKeyring.load(keydir, passphrase=PASSPHRASE)


def test_load_not_json(keydir: Path, protected: SodiumKeyring) -> None:
    (keydir / "private.key.enc").write_text("{")
    with pytest.raises(KeyringError, match="is invalid"):
        SodiumKeyring.load(keydir, passphrase=PASSPHRASE)


def test_write_only_ignores_encrypted_file(
    keydir: Path, protected: SodiumKeyring
) -> None:
    (keydir / "private.key.enc").unlink()
    write_only = SodiumKeyring.load(keydir)
    assert not write_only.can_unwrap
    assert write_only.name == protected.name


def test_create_from_given_private_key(tmp_path: Path) -> None:
    original = SodiumKeyring.create(tmp_path / "first")
    assert original.private_key is not None
    copy = SodiumKeyring.create(
        tmp_path / "second",
        private_key=bytes(original.private_key),
        passphrase=PASSPHRASE,
        opslimit=FAST_OPSLIMIT,
        memlimit=FAST_MEMLIMIT,
    )
    assert copy.name == original.name
    assert copy.unwrap(original.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY


def test_create_rejects_weak_limits(keydir: Path) -> None:
    with pytest.raises(ValueError, match="memlimit must be between"):
        SodiumKeyring.create(keydir, passphrase=PASSPHRASE, opslimit=1, memlimit=1024)
    with pytest.raises(ValueError, match="passphrase must not be empty"):
        SodiumKeyring.create(keydir, passphrase="")
    assert not keydir.exists()


def test_create_refuses_existing_encrypted_key(
    keydir: Path, protected: SodiumKeyring
) -> None:
    with pytest.raises(KeyringError, match="private.key.enc already exists"):
        SodiumKeyring.create(keydir)


def test_spec_reads_passphrase_variable(
    keydir: Path, protected: SodiumKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSEAL_TEST_PASSPHRASE", PASSPHRASE)
    keyring = parse_keyring_spec(
        f"sodium:{keydir}?passphrase_env=PGSEAL_TEST_PASSPHRASE"
    )
    assert keyring.name == protected.name
    assert keyring.can_unwrap


def test_spec_passphrase_variable_unset(
    keydir: Path, protected: SodiumKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGSEAL_TEST_PASSPHRASE", raising=False)
    with pytest.raises(KeyringError, match="PGSEAL_TEST_PASSPHRASE.* is not set"):
        parse_keyring_spec(f"sodium:{keydir}?passphrase_env=PGSEAL_TEST_PASSPHRASE")


# Argon2id at the moderate cost of `keys init` takes seconds, twice.
@pytest.mark.slow
def test_cli_init_with_passphrase(
    keydir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGSEAL_TEST_PASSPHRASE", PASSPHRASE)
    args = ["keys", "init", "--keyring", f"sodium:{keydir}"]
    assert main(args + ["--passphrase-env", "PGSEAL_TEST_PASSPHRASE"]) == 0
    assert (keydir / "private.key.enc").exists()
    assert not (keydir / "private.key").exists()
    document = json.loads((keydir / "private.key.enc").read_text())
    assert document["opslimit"] == argon2id.OPSLIMIT_MODERATE
    assert document["memlimit"] == argon2id.MEMLIMIT_MODERATE

    loaded = parse_keyring_spec(
        f"sodium:{keydir}?passphrase_env=PGSEAL_TEST_PASSPHRASE"
    )
    assert loaded.can_unwrap
    assert loaded.name in capsys.readouterr().out


def test_cli_init_passphrase_unset(
    keydir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PGSEAL_TEST_PASSPHRASE", raising=False)
    args = ["keys", "init", "--keyring", f"sodium:{keydir}"]
    assert main(args + ["--passphrase-env", "PGSEAL_TEST_PASSPHRASE"]) == 1
    assert "PGSEAL_TEST_PASSPHRASE" in capsys.readouterr().err
    assert not (keydir / "public.key").exists()


def test_cli_init_conflicting_variables(
    keydir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["keys", "init", "--keyring", f"sodium:{keydir}?passphrase_env=FIRST"]
    assert main(args + ["--passphrase-env", "SECOND"]) == 1
    assert "differ" in capsys.readouterr().err
