"""Tests for the Vault Transit keyring in proxy.crypto.vault, against OpenBao."""

from __future__ import annotations

import time

import pytest

from proxy.crypto.keyring import Keyring, RemoteKeyring, parse_keyring_spec
from proxy.crypto.vault import VaultTransitKeyring
from proxy.errors import ConfigError, KeyringError
from tests.fixtures.vault import VaultServer

CONTEXT = "00112233445566778899aabbccddeeff/public.users.email/1"
DATA_KEY = bytes(range(32))
UPDATE_ONLY_POLICY = """
path "transit/encrypt/*" { capabilities = ["update"] }
path "transit/decrypt/*" { capabilities = ["update"] }
"""


@pytest.fixture
def keyring(transit_key: str) -> VaultTransitKeyring:
    return VaultTransitKeyring(transit_key)


def assert_hides_key(text: str) -> None:
    assert DATA_KEY.hex() not in text
    assert repr(DATA_KEY) not in text
    assert str(list(DATA_KEY)) not in text


def update_only_token(server: VaultServer) -> str:
    client = server.client()
    client.sys.create_or_update_policy(name="pgseal-update", policy=UPDATE_ONLY_POLICY)
    token: str = client.auth.token.create(policies=["pgseal-update"])["auth"][
        "client_token"
    ]
    return token


def test_wrap_unwrap_round_trip(keyring: VaultTransitKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert wrapped.startswith(b"vault:v1:")
    assert keyring.unwrap(wrapped, CONTEXT) == DATA_KEY


def test_wrap_hides_data_key(keyring: VaultTransitKeyring) -> None:
    first = keyring.wrap(DATA_KEY, CONTEXT)
    second = keyring.wrap(DATA_KEY, CONTEXT)
    assert first != second
    assert DATA_KEY not in first
    assert_hides_key(first.decode("ascii"))


def test_wrap_64_byte_key(keyring: VaultTransitKeyring) -> None:
    siv_key = bytes(range(64))
    assert keyring.unwrap(keyring.wrap(siv_key, CONTEXT), CONTEXT) == siv_key


def test_unwrap_wrong_context(keyring: VaultTransitKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    with pytest.raises(KeyringError) as info:
        keyring.unwrap(wrapped, CONTEXT.replace("/1", "/2"))
    message = str(info.value)
    assert keyring.name in message
    assert "unwrap" in message
    assert_hides_key(message)


def test_unwrap_tampered(keyring: VaultTransitKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    tampered = wrapped[:-6] + (b"AAAAAA" if wrapped[-6:] != b"AAAAAA" else b"BBBBBB")
    with pytest.raises(KeyringError) as info:
        keyring.unwrap(tampered, CONTEXT)
    assert "decrypt" in str(info.value)
    assert_hides_key(str(info.value))


def test_unwrap_not_transit_ciphertext(keyring: VaultTransitKeyring) -> None:
    for blob in (b"", b"\xff\x00", b"sealed-box-bytes"):
        with pytest.raises(KeyringError, match="failed to unwrap"):
            keyring.unwrap(blob, CONTEXT)
    assert keyring.calls == 0


def test_unwrap_other_transit_key(
    keyring: VaultTransitKeyring, vault_env: VaultServer
) -> None:
    vault_env.client().secrets.transit.create_key(name="pgseal-other")
    wrapped = VaultTransitKeyring("pgseal-other").wrap(DATA_KEY, CONTEXT)
    with pytest.raises(KeyringError, match="decrypt"):
        keyring.unwrap(wrapped, CONTEXT)


def test_unknown_key_decrypt(keyring: VaultTransitKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    missing = VaultTransitKeyring("pgseal-missing-key")
    with pytest.raises(KeyringError) as info:
        missing.unwrap(wrapped, CONTEXT)
    message = str(info.value)
    assert "pgseal-missing-key" in message
    assert "decrypt" in message
    assert "not found" in message


def test_update_only_token_creates_no_key(
    vault_env: VaultServer, transit_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", update_only_token(vault_env))
    allowed = VaultTransitKeyring(transit_key)
    assert allowed.unwrap(allowed.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY

    typo = VaultTransitKeyring(transit_key + "-typo")
    with pytest.raises(KeyringError, match="encrypt .*Forbidden: .*permission denied"):
        typo.wrap(DATA_KEY, CONTEXT)
    keys = vault_env.client().secrets.transit.list_keys()["data"]["keys"]
    assert transit_key + "-typo" not in keys


def test_wrong_token(transit_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token")
    keyring = VaultTransitKeyring(transit_key)
    with pytest.raises(KeyringError) as info:
        keyring.wrap(DATA_KEY, CONTEXT)
    assert "permission denied" in str(info.value)
    assert "not-a-token" not in str(info.value)


def test_bao_variables_fallback(
    vault_env: VaultServer, transit_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_ADDR")
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("BAO_ADDR", vault_env.address)
    monkeypatch.setenv("BAO_TOKEN", vault_env.token)
    keyring = VaultTransitKeyring(transit_key)
    assert keyring.settings.address == vault_env.address
    assert keyring.unwrap(keyring.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY


def test_vault_variables_win(
    vault_env: VaultServer, transit_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAO_ADDR", "http://127.0.0.1:1")
    monkeypatch.setenv("BAO_TOKEN", "ignored")
    keyring = VaultTransitKeyring(transit_key)
    assert keyring.settings.address == vault_env.address
    assert keyring.unwrap(keyring.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY


@pytest.mark.parametrize("variable", ["VAULT_ADDR", "VAULT_TOKEN"])
def test_missing_setting(
    vault_env: VaultServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv(variable)
    with pytest.raises(KeyringError, match=variable):
        VaultTransitKeyring("pgseal")


def test_invalid_address(
    vault_env: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "127.0.0.1:8200")
    with pytest.raises(KeyringError, match="http:// or https://"):
        VaultTransitKeyring("pgseal")


def test_mount_from_environment(
    vault_env: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = vault_env.client()
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if "pgseal-transit/" not in mounts:
        client.sys.enable_secrets_engine("transit", path="pgseal-transit")
    client.secrets.transit.create_key(name="mounted", mount_point="pgseal-transit")
    monkeypatch.setenv("PGSEAL_VAULT_TRANSIT_MOUNT", "/pgseal-transit/")

    keyring = VaultTransitKeyring("mounted")
    assert keyring.settings.mount == "pgseal-transit"
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert keyring.unwrap(wrapped, CONTEXT) == DATA_KEY
    monkeypatch.delenv("PGSEAL_VAULT_TRANSIT_MOUNT")
    with pytest.raises(KeyringError, match="not found"):
        VaultTransitKeyring("mounted").unwrap(wrapped, CONTEXT)


def test_counts_calls(keyring: VaultTransitKeyring) -> None:
    assert keyring.calls == 0
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    keyring.unwrap(wrapped, CONTEXT)
    keyring.unwrap(wrapped, CONTEXT)
    with pytest.raises(KeyringError):
        keyring.unwrap(wrapped, "another/context/1")
    assert keyring.calls == 4
    assert keyring.operations["encrypt"] == 1
    assert keyring.operations["decrypt"] == 3


def test_invalid_arguments_make_no_call(keyring: VaultTransitKeyring) -> None:
    with pytest.raises(TypeError, match="data_key must be bytes"):
        keyring.wrap("key", CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_key must not be empty"):
        keyring.wrap(b"", CONTEXT)
    with pytest.raises(ValueError, match="context must not be empty"):
        keyring.wrap(DATA_KEY, "")
    with pytest.raises(TypeError, match="wrapped must be bytes"):
        keyring.unwrap("blob", CONTEXT)  # type: ignore[arg-type]
    assert keyring.calls == 0


def test_is_remote_keyring(keyring: VaultTransitKeyring) -> None:
    as_protocol: Keyring = keyring
    assert as_protocol.can_unwrap
    assert isinstance(keyring, RemoteKeyring)
    assert keyring.service == "Vault"


def test_name_and_repr(keyring: VaultTransitKeyring, vault_env: VaultServer) -> None:
    assert keyring.name == f"vault-transit:{keyring.key_name}"
    text = repr(keyring)
    assert keyring.name in text
    assert vault_env.address in text
    assert vault_env.token not in text
    assert vault_env.token not in repr(keyring.settings)


def test_repr_after_use_hides_key(keyring: VaultTransitKeyring) -> None:
    keyring.unwrap(keyring.wrap(DATA_KEY, CONTEXT), CONTEXT)
    assert_hides_key(repr(keyring))
    assert_hides_key(repr(vars(keyring)))


def test_unreachable_server(
    transit_key: str, closed_vault_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", closed_vault_address)
    keyring = VaultTransitKeyring(transit_key)
    started = time.monotonic()
    with pytest.raises(KeyringError) as info:
        keyring.wrap(DATA_KEY, CONTEXT)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "cannot reach" in message
    assert closed_vault_address in message
    assert keyring.calls == 1


def test_parse_spec(keyring: VaultTransitKeyring) -> None:
    parsed = parse_keyring_spec(keyring.name)
    assert isinstance(parsed, VaultTransitKeyring)
    assert parsed.name == keyring.name


@pytest.mark.parametrize(
    "spec", ["vault-transit:", "vault-transit:a/b", "vault-transit:with space"]
)
def test_parse_spec_invalid(spec: str, vault_env: VaultServer) -> None:
    with pytest.raises(ConfigError, match="vault-transit"):
        parse_keyring_spec(spec)


def test_rotated_key_unwraps_old(
    keyring: VaultTransitKeyring, transit_key: str, vault_env: VaultServer
) -> None:
    old = keyring.wrap(DATA_KEY, CONTEXT)
    vault_env.client().secrets.transit.rotate_key(name=transit_key)
    new = keyring.wrap(DATA_KEY, CONTEXT)
    assert old.startswith(b"vault:v1:")
    assert new.startswith(b"vault:v2:")
    assert keyring.unwrap(old, CONTEXT) == DATA_KEY
    assert keyring.unwrap(new, CONTEXT) == DATA_KEY
