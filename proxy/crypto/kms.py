"""The AWS KMS keyring: data keys wrapped by a KMS key through boto3.

Region, credentials and endpoint come from the standard AWS configuration.
botocore reads ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and the config files,
the credential chain (``AWS_ACCESS_KEY_ID`` and the rest), and
``AWS_ENDPOINT_URL_KMS`` or ``AWS_ENDPOINT_URL``. botocore 1.44 does not read
``AWS_REGION``, which other AWS SDKs use, so this module passes it to the
client itself, ahead of the other region settings.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]

from proxy.crypto.keyring import check_remote_settings
from proxy.errors import KeyringError

__all__ = ["AwsKmsKeyring", "SPEC_PREFIX"]

logger = logging.getLogger(__name__)

SPEC_PREFIX = "aws-kms:"
CONTEXT_KEY = "pgseal"
"""The encryption context key under which the wrap context is sent to KMS."""

# Limits of the KMS API: KeyId is at most 2048 characters, and Encrypt takes
# at most 4096 bytes of plaintext.
_MAX_KEY_ID_LENGTH = 2048
_MAX_PLAINTEXT_SIZE = 4096


class AwsKmsKeyring:
    """A keyring whose key-encryption key is an AWS KMS key.

    wrap() calls KMS Encrypt and unwrap() calls KMS Decrypt, both with the
    encryption context ``{"pgseal": context}``, so a wrapped data key opens
    only for the same key store, key name and version. Both calls block, so
    async callers run them in a worker thread. The boto3 client is safe to
    share between threads.
    """

    service = "KMS"
    """Name of the remote service in log lines."""

    def __init__(
        self,
        key_id: str,
        *,
        max_retries: int = 2,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
    ) -> None:
        """Create a KMS client for key_id: a key id, key ARN, alias or alias ARN.

        max_retries is the number of retries after the first request, which
        botocore's retry setting ``max_attempts`` counts. The timeouts are in
        seconds. Raises KeyringError if the AWS configuration names no region
        or is invalid.
        """
        _check_key_id(key_id)
        check_remote_settings(max_retries, connect_timeout, read_timeout)
        self.key_id = key_id
        self.calls = 0
        """Number of KMS API calls made, failed ones included."""
        self.operations: Counter[str] = Counter()
        """Number of KMS API calls made per operation name, such as Decrypt."""
        self._lock = threading.Lock()

        config = botocore.config.Config(
            retries={"max_attempts": max_retries, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        try:
            # A session of its own, because boto3's default session is not
            # safe to share between threads.
            session = boto3.session.Session()
            region = os.environ.get("AWS_REGION") or None
            self._client: Any = session.client(
                "kms", region_name=region, config=config
            )
        except botocore.exceptions.NoRegionError:
            raise KeyringError(
                f"keyring {self.name}: no AWS region is configured, so set "
                "AWS_REGION or the region of the AWS profile"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise KeyringError(
                f"keyring {self.name}: cannot create the AWS KMS client: {exc}"
            ) from exc
        logger.info(
            "using AWS KMS key %s in region %s at %s",
            key_id,
            self.region,
            self.endpoint_url,
        )

    @property
    def name(self) -> str:
        """``aws-kms:`` and the key id exactly as configured."""
        return SPEC_PREFIX + self.key_id

    @property
    def can_unwrap(self) -> bool:
        return True

    @property
    def region(self) -> str:
        region: str = self._client.meta.region_name
        return region

    @property
    def endpoint_url(self) -> str:
        endpoint: str = self._client.meta.endpoint_url
        return endpoint

    def __repr__(self) -> str:
        return f"AwsKmsKeyring(name={self.name!r}, region={self.region!r})"

    def wrap(self, data_key: bytes, context: str) -> bytes:
        """Encrypt data_key under the KMS key with context as encryption context."""
        if not isinstance(data_key, bytes):
            raise TypeError("data_key must be bytes")
        if not data_key:
            raise ValueError("data_key must not be empty")
        if len(data_key) > _MAX_PLAINTEXT_SIZE:
            raise ValueError(
                f"data_key must be at most {_MAX_PLAINTEXT_SIZE} bytes for KMS Encrypt"
            )
        _check_context(context)

        response = self._call(
            "Encrypt",
            context,
            KeyId=self.key_id,
            Plaintext=data_key,
            EncryptionContext={CONTEXT_KEY: context},
        )
        wrapped: bytes = response["CiphertextBlob"]
        return wrapped

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        """Decrypt a data key that wrap() returned for the same context.

        Decrypt names the configured key id, so KMS rejects a ciphertext of
        another KMS key instead of opening it with whatever key it names.
        """
        if not isinstance(wrapped, bytes):
            raise TypeError("wrapped must be bytes")
        if not wrapped:
            raise KeyringError(f"keyring {self.name}: the wrapped data key is empty")
        _check_context(context)

        response = self._call(
            "Decrypt",
            context,
            KeyId=self.key_id,
            CiphertextBlob=wrapped,
            EncryptionContext={CONTEXT_KEY: context},
        )
        data_key: bytes = response["Plaintext"]
        if not data_key:
            raise KeyringError(
                f"keyring {self.name}: KMS Decrypt returned an empty data key "
                f"for {context!r}"
            )
        return data_key

    def _call(self, operation: str, context: str, **params: Any) -> dict[str, Any]:
        """Call one KMS operation and convert its failures into KeyringError.

        The messages name the key, the operation and the context, never the
        parameters, which contain the data key.
        """
        with self._lock:
            self.calls += 1
            self.operations[operation] += 1
        # boto3 names the method after the operation: Encrypt is encrypt().
        method = getattr(self._client, operation.lower())
        failure = f"keyring {self.name}: KMS {operation} for {context!r} failed"
        try:
            response: dict[str, Any] = method(**params)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "unknown error")
            message = error.get("Message", "")
            raise KeyringError(f"{failure}: {code}: {message}") from exc
        except botocore.exceptions.ParamValidationError:
            # Its message may quote a parameter value, which can be the key.
            raise KeyringError(f"{failure}: invalid request parameters") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise KeyringError(f"{failure}: {exc}") from exc
        return response


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str):
        raise TypeError("key_id must be a str")
    if not key_id:
        raise ValueError("key_id must not be empty")
    if len(key_id) > _MAX_KEY_ID_LENGTH:
        raise ValueError(f"key_id must be at most {_MAX_KEY_ID_LENGTH} characters")
    if any(char.isspace() for char in key_id):
        raise ValueError(f"key_id must not contain whitespace, got {key_id!r}")


def _check_context(context: str) -> None:
    if not isinstance(context, str):
        raise TypeError("context must be a str")
    if not context:
        raise ValueError("context must not be empty")
