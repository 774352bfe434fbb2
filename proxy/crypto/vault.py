"""The Vault Transit keyring: data keys wrapped by a transit key through hvac.

It works with HashiCorp Vault and with OpenBao, which keeps Vault's transit
API. The settings come from the environment, as for the ``vault`` and ``bao``
command-line tools:

- ``VAULT_ADDR``, else ``BAO_ADDR``: the server URL (required);
- ``VAULT_TOKEN``, else ``BAO_TOKEN``: the token (required);
- ``VAULT_CACERT``, else ``BAO_CACERT``: a PEM file of CAs for TLS;
- ``VAULT_NAMESPACE``, else ``BAO_NAMESPACE``: a namespace;
- ``PGSEAL_VAULT_TRANSIT_MOUNT``: the transit engine's mount path, by default
  ``transit``.

The wrap context is bound into the plaintext, not sent as transit's
``context`` parameter, so any transit key that can encrypt works, including
keys created without ``derived=true``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
import requests.adapters
from urllib3.util.retry import Retry

from proxy.crypto.keyring import check_remote_settings, context_digest
from proxy.errors import KeyringError

__all__ = ["SPEC_PREFIX", "VaultSettings", "VaultTransitKeyring"]

logger = logging.getLogger(__name__)

SPEC_PREFIX = "vault-transit:"
DEFAULT_MOUNT = "transit"
MOUNT_VARIABLE = "PGSEAL_VAULT_TRANSIT_MOUNT"

# Transit ciphertexts start with "vault:v" and the key version, in OpenBao too.
_CIPHERTEXT_PREFIX = "vault:v"
_CONTEXT_DIGEST_SIZE = hashlib.sha256().digest_size
# HTTP statuses worth another attempt: a busy, sealed or restarting server.
_RETRY_STATUSES = (429, 502, 503, 504)


@dataclass(frozen=True)
class VaultSettings:
    """Address, token and options of a Vault server, read from the environment."""

    address: str
    token: str = field(repr=False)
    mount: str = DEFAULT_MOUNT
    ca_cert: str | None = None
    namespace: str | None = None

    @classmethod
    def from_environment(cls, keyring_name: str) -> VaultSettings:
        """Read the VAULT_* variables, or the BAO_* ones where those are unset.

        Raises KeyringError naming the variable that is missing or invalid.
        """
        address = _variable("ADDR")
        if not address:
            raise KeyringError(
                f"keyring {keyring_name}: no Vault address is configured, so set "
                "VAULT_ADDR (or BAO_ADDR), for example https://vault.internal:8200"
            )
        if not address.startswith(("http://", "https://")):
            raise KeyringError(
                f"keyring {keyring_name}: VAULT_ADDR must be an http:// or "
                f"https:// URL, got {address!r}"
            )
        token = _variable("TOKEN")
        if not token:
            raise KeyringError(
                f"keyring {keyring_name}: no Vault token is configured, so set "
                "VAULT_TOKEN (or BAO_TOKEN)"
            )
        mount = os.environ.get(MOUNT_VARIABLE, "").strip("/") or DEFAULT_MOUNT
        if any(char.isspace() for char in mount):
            raise KeyringError(
                f"keyring {keyring_name}: {MOUNT_VARIABLE} must not contain "
                f"whitespace, got {mount!r}"
            )
        return cls(
            address=address.rstrip("/"),
            token=token,
            mount=mount,
            ca_cert=_variable("CACERT"),
            namespace=_variable("NAMESPACE"),
        )


class VaultTransitKeyring:
    """A keyring whose key-encryption key is a Vault or OpenBao transit key.

    wrap() sends sha256(context) followed by the data key to transit encrypt,
    and unwrap() checks that digest after transit decrypt, so a wrapped data
    key opens only for the same key store, key name and version. Both calls
    block, so async callers run them in a worker thread. Each thread gets its
    own hvac client, because a requests session is not documented as safe to
    share between threads.
    """

    service = "Vault"
    """Name of the remote service in log lines."""

    def __init__(
        self,
        key_name: str,
        *,
        max_retries: int = 2,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
    ) -> None:
        """Prepare calls to transit key key_name; nothing is sent yet.

        max_retries is the number of retries after the first request, for
        connection failures, timeouts and the statuses 429, 502, 503 and 504.
        The timeouts are in seconds. Raises KeyringError if the environment
        names no server or token.
        """
        _check_key_name(key_name)
        check_remote_settings(max_retries, connect_timeout, read_timeout)

        self.key_name = key_name
        self.settings = VaultSettings.from_environment(SPEC_PREFIX + key_name)
        self.calls = 0
        """Number of transit API calls made, failed ones included."""
        self.operations: Counter[str] = Counter()
        """Number of transit API calls made per operation, encrypt or decrypt."""
        self._max_retries = max_retries
        self._timeout = (connect_timeout, read_timeout)
        self._lock = threading.Lock()
        self._local = threading.local()
        logger.info(
            "using Vault transit key %s at %s, mount %s",
            key_name,
            self.settings.address,
            self.settings.mount,
        )

    @property
    def name(self) -> str:
        """``vault-transit:`` and the transit key name exactly as configured."""
        return SPEC_PREFIX + self.key_name

    @property
    def can_unwrap(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"VaultTransitKeyring(name={self.name!r}, "
            f"address={self.settings.address!r}, mount={self.settings.mount!r})"
        )

    def wrap(self, data_key: bytes, context: str) -> bytes:
        """Encrypt sha256(context) and data_key with the transit key.

        Returns the transit ciphertext (``vault:v1:...``) as ASCII bytes.
        """
        if not isinstance(data_key, bytes):
            raise TypeError("data_key must be bytes")
        if not data_key:
            raise ValueError("data_key must not be empty")
        payload = context_digest(context) + data_key

        data = self._call(
            "encrypt",
            context,
            plaintext=base64.b64encode(payload).decode("ascii"),
        )
        ciphertext = data.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith(
            _CIPHERTEXT_PREFIX
        ):
            raise KeyringError(
                f"keyring {self.name}: Vault transit encrypt for {context!r} "
                "returned no ciphertext"
            )
        return ciphertext.encode("ascii")

    def unwrap(self, wrapped: bytes, context: str) -> bytes:
        """Decrypt a data key that wrap() returned for the same context."""
        if not isinstance(wrapped, bytes):
            raise TypeError("wrapped must be bytes")
        expected_digest = context_digest(context)
        failure = KeyringError(
            f"keyring {self.name} failed to unwrap the data key for {context!r}"
        )
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise failure from None
        if not ciphertext.startswith(_CIPHERTEXT_PREFIX):
            raise failure

        data = self._call("decrypt", context, ciphertext=ciphertext)
        try:
            payload = base64.b64decode(data.get("plaintext") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise failure from None
        digest = payload[:_CONTEXT_DIGEST_SIZE]
        data_key = payload[_CONTEXT_DIGEST_SIZE:]
        if not data_key or not hmac.compare_digest(digest, expected_digest):
            raise failure
        return data_key

    def _call(self, operation: str, context: str, **params: str) -> dict[str, Any]:
        """Call transit encrypt or decrypt and convert failures into KeyringError.

        The messages name the key, the operation and the context, and quote
        only the server's error list, never the request, which contains the
        data key.
        """
        with self._lock:
            self.calls += 1
            self.operations[operation] += 1
        transit = self._client().secrets.transit
        method = (
            transit.encrypt_data if operation == "encrypt" else transit.decrypt_data
        )
        failure = (
            f"keyring {self.name}: Vault transit {operation} for {context!r} failed"
        )
        try:
            response = method(
                name=self.key_name, mount_point=self.settings.mount, **params
            )
        except hvac.exceptions.VaultError as exc:
            # Vault wraps some messages in a multi-line "1 error occurred".
            errors = "; ".join(" ".join(str(e).split()) for e in exc.errors or [])
            errors = errors or "no error message"
            raise KeyringError(f"{failure}: {type(exc).__name__}: {errors}") from None
        except requests.RequestException as exc:
            raise KeyringError(
                f"{failure}: cannot reach {self.settings.address}: {exc}"
            ) from None
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise KeyringError(f"{failure}: the response has no data")
        return data

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
        return client

    def _new_client(self) -> Any:
        retry = Retry(
            total=self._max_retries,
            backoff_factor=0.2,
            status_forcelist=_RETRY_STATUSES,
            # Transit encrypt and decrypt are POST requests, and repeating
            # either is harmless: it only returns another ciphertext.
            allowed_methods=None,
            raise_on_status=False,
        )
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(max_retries=retry))
        session.mount("https://", requests.adapters.HTTPAdapter(max_retries=retry))
        settings = self.settings
        return hvac.Client(
            url=settings.address,
            token=settings.token,
            verify=settings.ca_cert or True,
            timeout=self._timeout,
            namespace=settings.namespace,
            session=session,
        )


def _variable(suffix: str) -> str | None:
    """Return VAULT_<suffix>, else BAO_<suffix>, ignoring empty values."""
    return os.environ.get(f"VAULT_{suffix}") or os.environ.get(f"BAO_{suffix}") or None


def _check_key_name(key_name: str) -> None:
    if not isinstance(key_name, str):
        raise TypeError("key_name must be a str")
    if not key_name:
        raise ValueError("key_name must not be empty")
    if "/" in key_name or any(char.isspace() for char in key_name):
        raise ValueError(
            f"key_name must not contain '/' or whitespace, got {key_name!r}"
        )
