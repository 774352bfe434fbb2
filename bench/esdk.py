"""The AWS Encryption SDK comparison: a raw AES keyring behind the caching CMM.

Importing this module raises ImportError when aws-encryption-sdk is not
installed, and the caller then reports the SDK as not measured. No KMS is
involved: the wrapping key is 32 random bytes held in memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import aws_encryption_sdk  # type: ignore[import-untyped]
from aws_encryption_sdk import (
    CachingCryptoMaterialsManager,
    CommitmentPolicy,
    EncryptionSDKClient,
    LocalCryptoMaterialsCache,
)
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    Algorithm,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.internal.crypto.wrapping_keys import (  # type: ignore[import-untyped]
    WrappingKey,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
)

KEY_ID = b"pgseal-bench"

# Cache limits in the range the SDK's own examples use: materials are reused
# for up to 10 minutes and 2^32 messages, far more than a run encrypts.
CACHE_CAPACITY = 100
CACHE_MAX_AGE_S = 600.0
CACHE_MAX_MESSAGES = 2**32

# The SDK's default suite signs every message with ECDSA P-384. The unsigned
# committing suite is the fastest that the default commitment policy allows.
SUITES = {
    "default_signed": None,
    "unsigned": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
}


def _encryptor(client: Any, options: dict[str, Any]) -> Callable[[], bytes]:
    """Return a function that encrypts one message with the given options."""

    def encrypt() -> bytes:
        ciphertext, _header = client.encrypt(**options)
        return bytes(ciphertext)

    return encrypt


class StaticKeyProvider(RawMasterKeyProvider):  # type: ignore[misc]
    """A raw AES-256-GCM wrapping key that lives only in this process."""

    provider_id = "pgseal-bench"

    def __init__(self, **kwargs: Any) -> None:
        self._wrapping_key = secrets.token_bytes(32)

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=self._wrapping_key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


Rates = Callable[[dict[str, Callable[[], object]], int], dict[str, float]]


def measure(count: int, value_size: int, rates: Rates) -> dict[str, Any]:
    """Time encrypt() of one value per message, for each algorithm suite."""
    provider = StaticKeyProvider()
    provider.add_master_key(KEY_ID)
    manager = CachingCryptoMaterialsManager(
        master_key_provider=provider,
        cache=LocalCryptoMaterialsCache(CACHE_CAPACITY),
        max_age=CACHE_MAX_AGE_S,
        max_messages_encrypted=CACHE_MAX_MESSAGES,
    )
    client = EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    value = secrets.token_bytes(value_size)

    results: dict[str, Any] = {
        "measured": True,
        "version": aws_encryption_sdk.__version__,
        "keyring": "raw AES-256-GCM master key, caching CMM",
    }
    operations: dict[str, Callable[[], object]] = {}
    for name, suite in SUITES.items():
        options: dict[str, Any] = {"source": value, "materials_manager": manager}
        if suite is not None:
            options["algorithm"] = suite
        encrypt = _encryptor(client, options)
        stored = len(encrypt())
        operations[name] = encrypt
        results[name] = {"stored_bytes": stored, "overhead_bytes": stored - value_size}

    for name, per_second in rates(operations, count).items():
        results[name]["encrypt_per_s"] = per_second
    return results
