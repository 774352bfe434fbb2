"""TLS settings and the SCRAM channel-binding guard, without a server."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.server import Upstream
from proxy.tls import (
    ChannelBindingGuard,
    SslMode,
    asyncpg_ssl,
    check_upstream_tls,
    load_client_tls,
    upstream_context,
)
from proxy.wire.frames import Frame, build
from tests.fixtures.tls import TlsFiles

BOTH = [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]


def _sasl(mechanisms: list[bytes]) -> Frame:
    payload = struct.pack("!i", 10) + b"".join(m + b"\0" for m in mechanisms) + b"\0"
    return Frame(ord("R"), build(b"R", payload))


def _auth(code: int) -> Frame:
    return Frame(ord("R"), build(b"R", struct.pack("!i", code)))


def _initial_response(gs2: bytes) -> Frame:
    data = gs2 + b",,n=,r=nonce"
    payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(data)) + data
    return Frame(ord("p"), build(b"p", payload))


def _mechanisms(frame: Frame) -> list[bytes]:
    return [name for name in bytes(frame.raw[9:]).split(b"\0") if name]


# sslmode and contexts


def test_sslmode_parse_invalid() -> None:
    with pytest.raises(ConfigError, match="invalid sslmode 'allow'"):
        SslMode.parse("allow")


@pytest.mark.parametrize(
    ("mode", "rootcert", "message"),
    [
        (SslMode.VERIFY_CA, None, "needs a root certificate"),
        (SslMode.VERIFY_FULL, None, "needs a root certificate"),
        (SslMode.PREFER, "ca.crt", "no effect with sslmode prefer"),
        (SslMode.DISABLE, "ca.crt", "no effect with sslmode disable"),
        (SslMode.VERIFY_CA, "system", "requires sslmode verify-full"),
    ],
)
def test_check_upstream_tls_rejects(
    mode: SslMode, rootcert: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_upstream_tls(mode, rootcert)


def test_upstream_context_disable() -> None:
    assert upstream_context(SslMode.DISABLE, None) is None


@pytest.mark.parametrize("mode", [SslMode.PREFER, SslMode.REQUIRE])
def test_upstream_context_unverified(mode: SslMode) -> None:
    context = upstream_context(mode, None)
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("mode", "check_hostname"),
    [(SslMode.REQUIRE, False), (SslMode.VERIFY_CA, False), (SslMode.VERIFY_FULL, True)],
)
def test_upstream_context_verified(
    tls_files: TlsFiles, mode: SslMode, check_hostname: bool
) -> None:
    context = upstream_context(mode, str(tls_files.ca_cert))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is check_hostname


def test_upstream_context_missing_rootcert(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load root certificate file"):
        upstream_context(SslMode.VERIFY_CA, str(tmp_path / "missing.crt"))


def test_asyncpg_ssl_per_mode(tls_files: TlsFiles) -> None:
    context = upstream_context(SslMode.REQUIRE, None)
    assert asyncpg_ssl(SslMode.DISABLE, None) is False
    assert asyncpg_ssl(SslMode.PREFER, context) == "prefer"
    assert asyncpg_ssl(SslMode.REQUIRE, context) is context


# Upstream URI


def test_upstream_parse_sslmode_default() -> None:
    upstream = Upstream.parse("postgresql://u:p@db:5432/app")
    assert upstream.sslmode is SslMode.PREFER
    assert upstream.sslrootcert is None


def test_upstream_parse_query() -> None:
    upstream = Upstream.parse(
        "postgresql://u:p@db/app?sslmode=verify-full&sslrootcert=/etc/ca.crt"
    )
    assert upstream.sslmode is SslMode.VERIFY_FULL
    assert upstream.sslrootcert == "/etc/ca.crt"


def test_upstream_parse_options_override_query() -> None:
    upstream = Upstream.parse("postgresql://u:p@db/app?sslmode=disable", "require")
    assert upstream.sslmode is SslMode.REQUIRE


def test_upstream_parse_unknown_parameter() -> None:
    with pytest.raises(ConfigError, match="unsupported parameter 'sslcert'"):
        Upstream.parse("postgresql://u:p@db/app?sslcert=client.crt")


# Client certificate and key


def test_load_client_tls_none() -> None:
    assert load_client_tls(None, None) is None


def test_load_client_tls_needs_both(tls_files: TlsFiles) -> None:
    with pytest.raises(ConfigError, match="must be given together"):
        load_client_tls(tls_files.proxy.cert, None)


def test_load_client_tls_open_key(tls_files: TlsFiles, tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(tls_files.proxy.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="has mode 0644"):
        load_client_tls(tls_files.proxy.cert, key)


def test_load_client_tls_mismatched_key(tls_files: TlsFiles) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        load_client_tls(tls_files.proxy.cert, tls_files.server.key)


def test_load_client_tls_certificate(tls_files: TlsFiles) -> None:
    client_tls = load_client_tls(tls_files.proxy.cert, tls_files.proxy.key)
    assert client_tls is not None
    pem = tls_files.proxy.cert.read_text()
    assert client_tls.certificate == ssl.PEM_cert_to_DER_cert(pem)


# Channel binding guard


def test_guard_removes_plus() -> None:
    guard = ChannelBindingGuard(keep_plus=False)
    (frame,) = guard.from_server([_sasl(BOTH)])
    assert _mechanisms(frame) == [b"SCRAM-SHA-256"]


def test_guard_keeps_plus_for_same_certificate() -> None:
    guard = ChannelBindingGuard(keep_plus=True)
    (frame,) = guard.from_server([_sasl(BOTH)])
    assert _mechanisms(frame) == BOTH


def test_guard_leaves_plain_offer_unchanged() -> None:
    offer = _sasl([b"SCRAM-SHA-256"])
    guard = ChannelBindingGuard(keep_plus=False)
    (frame,) = guard.from_server([offer])
    assert frame is offer
    assert guard.check_client([_initial_response(b"y")]) is None


def test_guard_rejects_binding_downgrade() -> None:
    guard = ChannelBindingGuard(keep_plus=False)
    guard.from_server([_sasl(BOTH)])
    error = guard.check_client([_initial_response(b"y")])
    assert error is not None
    assert error[:1] == b"E"
    assert b"28000" in error


def test_guard_allows_client_without_binding() -> None:
    guard = ChannelBindingGuard(keep_plus=False)
    guard.from_server([_sasl(BOTH)])
    assert guard.check_client([_initial_response(b"n")]) is None


def test_guard_ends_at_authentication_ok() -> None:
    guard = ChannelBindingGuard(keep_plus=False)
    guard.from_server([_auth(12), _auth(0)])
    assert not guard.active


def test_guard_ends_at_error() -> None:
    guard = ChannelBindingGuard(keep_plus=False)
    guard.from_server([Frame(ord("E"), build(b"E", b"\0"))])
    assert not guard.active
