"""Tests for the AWS KMS keyring in proxy.crypto.kms, against moto's server."""

from __future__ import annotations

import boto3  # type: ignore[import-untyped]
import pytest

from proxy.crypto.keyring import Keyring, RemoteKeyring, parse_keyring_spec
from proxy.crypto.kms import AwsKmsKeyring
from proxy.errors import ConfigError, KeyringError
from tests.fixtures.kms import KmsKey

CONTEXT = "00112233445566778899aabbccddeeff/public.users.email/1"
DATA_KEY = bytes(range(32))


@pytest.fixture
def keyring(kms_key: KmsKey) -> AwsKmsKeyring:
    return AwsKmsKeyring(kms_key.key_id)


def assert_hides_key(text: str) -> None:
    assert DATA_KEY.hex() not in text
    assert repr(DATA_KEY) not in text
    assert str(list(DATA_KEY)) not in text


def test_wrap_unwrap_round_trip(keyring: AwsKmsKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert keyring.unwrap(wrapped, CONTEXT) == DATA_KEY


def test_wrap_hides_data_key(keyring: AwsKmsKeyring) -> None:
    first = keyring.wrap(DATA_KEY, CONTEXT)
    second = keyring.wrap(DATA_KEY, CONTEXT)
    assert DATA_KEY not in first
    assert DATA_KEY[:16] not in first
    assert first != second


def test_wrap_64_byte_key(keyring: AwsKmsKeyring) -> None:
    siv_key = bytes(range(64))
    assert keyring.unwrap(keyring.wrap(siv_key, CONTEXT), CONTEXT) == siv_key


def test_unwrap_wrong_context(keyring: AwsKmsKeyring) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    other_context = CONTEXT.replace("/1", "/2")
    with pytest.raises(KeyringError) as info:
        keyring.unwrap(wrapped, other_context)
    message = str(info.value)
    assert "Decrypt" in message
    assert keyring.key_id in message
    assert_hides_key(message)


def test_unwrap_other_kms_key(keyring: AwsKmsKeyring, aws_env: str) -> None:
    client = boto3.session.Session().client("kms")
    other_id = client.create_key()["KeyMetadata"]["KeyId"]
    wrapped = AwsKmsKeyring(other_id).wrap(DATA_KEY, CONTEXT)
    with pytest.raises(KeyringError, match="Decrypt"):
        keyring.unwrap(wrapped, CONTEXT)


def test_unwrap_tampered(keyring: AwsKmsKeyring) -> None:
    wrapped = bytearray(keyring.wrap(DATA_KEY, CONTEXT))
    wrapped[-1] ^= 0x01
    with pytest.raises(KeyringError):
        keyring.unwrap(bytes(wrapped), CONTEXT)
    with pytest.raises(KeyringError, match="empty"):
        keyring.unwrap(b"", CONTEXT)


def test_alias_round_trip(kms_key: KmsKey) -> None:
    keyring = AwsKmsKeyring(kms_key.alias)
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert keyring.unwrap(wrapped, CONTEXT) == DATA_KEY
    assert keyring.name == f"aws-kms:{kms_key.alias}"


def test_alias_unwraps_key_id_ciphertext(
    kms_key: KmsKey, keyring: AwsKmsKeyring
) -> None:
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    assert AwsKmsKeyring(kms_key.alias).unwrap(wrapped, CONTEXT) == DATA_KEY


def test_arn_round_trip(kms_key: KmsKey) -> None:
    keyring = AwsKmsKeyring(kms_key.arn)
    assert keyring.unwrap(keyring.wrap(DATA_KEY, CONTEXT), CONTEXT) == DATA_KEY


def test_unknown_key(aws_env: str) -> None:
    keyring = AwsKmsKeyring("alias/pgseal-missing")
    with pytest.raises(KeyringError) as info:
        keyring.wrap(DATA_KEY, CONTEXT)
    message = str(info.value)
    assert "alias/pgseal-missing" in message
    assert "Encrypt" in message
    assert "NotFoundException" in message
    assert_hides_key(message)


def test_name_and_repr(keyring: AwsKmsKeyring, kms_key: KmsKey) -> None:
    assert keyring.name == f"aws-kms:{kms_key.key_id}"
    text = repr(keyring)
    assert keyring.name in text
    assert "us-east-1" in text
    assert_hides_key(text)


def test_repr_after_use_hides_key(keyring: AwsKmsKeyring) -> None:
    keyring.unwrap(keyring.wrap(DATA_KEY, CONTEXT), CONTEXT)
    assert_hides_key(repr(keyring))
    assert_hides_key(repr(vars(keyring)))


def test_is_remote_keyring(keyring: AwsKmsKeyring) -> None:
    as_protocol: Keyring = keyring
    assert as_protocol.can_unwrap
    assert isinstance(keyring, RemoteKeyring)


def test_endpoint_from_environment(keyring: AwsKmsKeyring, kms_key: KmsKey) -> None:
    assert keyring.endpoint_url == kms_key.endpoint_url
    assert keyring.region == "us-east-1"


def test_counts_calls(keyring: AwsKmsKeyring) -> None:
    assert keyring.calls == 0
    wrapped = keyring.wrap(DATA_KEY, CONTEXT)
    keyring.unwrap(wrapped, CONTEXT)
    keyring.unwrap(wrapped, CONTEXT)
    with pytest.raises(KeyringError):
        keyring.unwrap(wrapped, "another/context/1")
    assert keyring.calls == 4
    assert keyring.operations["Encrypt"] == 1
    assert keyring.operations["Decrypt"] == 3


def test_invalid_arguments_make_no_call(keyring: AwsKmsKeyring) -> None:
    with pytest.raises(TypeError, match="data_key must be bytes"):
        keyring.wrap("key", CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_key must not be empty"):
        keyring.wrap(b"", CONTEXT)
    with pytest.raises(ValueError, match="at most 4096 bytes"):
        keyring.wrap(b"k" * 4097, CONTEXT)
    with pytest.raises(ValueError, match="context must not be empty"):
        keyring.wrap(DATA_KEY, "")
    with pytest.raises(TypeError, match="wrapped must be bytes"):
        keyring.unwrap("blob", CONTEXT)  # type: ignore[arg-type]
    assert keyring.calls == 0


@pytest.mark.parametrize("key_id", ["", "alias/with space", "x" * 2049])
def test_invalid_key_id(key_id: str, aws_env: str) -> None:
    with pytest.raises(ValueError, match="key_id"):
        AwsKmsKeyring(key_id)


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_region_from_environment(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, variable: str
) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv(variable, "eu-west-3")
    assert AwsKmsKeyring("alias/pgseal").region == "eu-west-3"


def test_aws_region_overrides_default(
    monkeypatch: pytest.MonkeyPatch, aws_env: str
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert AwsKmsKeyring("alias/pgseal").region == "eu-west-3"


def test_missing_region(monkeypatch: pytest.MonkeyPatch, aws_env: str) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(KeyringError, match="no AWS region .* AWS_REGION"):
        AwsKmsKeyring("alias/pgseal")


def test_unreachable_endpoint(
    closed_kms_endpoint: str, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", closed_kms_endpoint)
    keyring = AwsKmsKeyring("alias/pgseal", max_retries=2, connect_timeout=1)
    sent: list[str] = []
    keyring._client.meta.events.register(
        "before-send.kms.Encrypt", lambda **kwargs: sent.append("Encrypt")
    )
    with pytest.raises(KeyringError) as info:
        keyring.wrap(DATA_KEY, CONTEXT)
    message = str(info.value)
    assert "aws-kms:alias/pgseal" in message
    assert "Encrypt" in message
    assert closed_kms_endpoint in message
    assert_hides_key(message)
    # botocore retries within one API call, so the counter counts it once.
    assert sent == ["Encrypt"] * 3
    assert keyring.calls == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_retries", -1), ("connect_timeout", 0), ("read_timeout", -1.0)],
)
def test_invalid_client_settings(option: str, value: float, aws_env: str) -> None:
    with pytest.raises(ValueError, match=option):
        AwsKmsKeyring("alias/pgseal", **{option: value})  # type: ignore[arg-type]


def test_parse_spec_aws_kms(kms_key: KmsKey) -> None:
    parsed = parse_keyring_spec(f"aws-kms:{kms_key.arn}")
    assert isinstance(parsed, AwsKmsKeyring)
    assert parsed.key_id == kms_key.arn
    assert parsed.name == f"aws-kms:{kms_key.arn}"


@pytest.mark.parametrize("spec", ["aws-kms:", "aws-kms", "aws-kms:alias/a b"])
def test_parse_spec_aws_kms_invalid(spec: str, aws_env: str) -> None:
    with pytest.raises(ConfigError, match="invalid keyring spec"):
        parse_keyring_spec(spec)


def test_parse_spec_lists_forms() -> None:
    with pytest.raises(ConfigError) as info:
        parse_keyring_spec("vault:transit/pgseal")
    assert "sodium:KEYDIR" in str(info.value)
    assert "aws-kms:KEY" in str(info.value)
