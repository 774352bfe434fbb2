"""TLS on both legs of a connection, negotiated before the startup packet.

A PostgreSQL client requests encryption with an SSLRequest, and the server
responds with one byte, 'S' or 'N'. Since PostgreSQL 17 a client may instead
start the TLS handshake at once (direct TLS). The proxy negotiates on raw
sockets, before any stream reads ahead, so that no byte received in
plaintext is ever handled as if it had arrived through TLS. The proxy
terminates the client's TLS and opens its own TLS connection to the server,
with libpq's sslmode meanings.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import ConfigError, PgsealError, ProtocolError
from proxy.wire import messages as m
from proxy.wire.frames import Frame, build

log = logging.getLogger(__name__)

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
SSL_REQUEST_PACKET = struct.pack("!II", 8, SSL_REQUEST)
ALPN_PROTOCOL = "postgresql"
# The content type of a TLS handshake record: a client using direct TLS
# sends this where a plaintext client sends the first byte of a length.
TLS_HANDSHAKE_RECORD = 0x16
# Authentication request codes in an 'R' message.
AUTH_OK = 0
AUTH_SASL = 10
SCRAM_PLUS = b"SCRAM-SHA-256-PLUS"
# libpq's special sslrootcert value for the system's trusted CA roots.
SYSTEM_ROOTS = "system"


class TlsNegotiationError(PgsealError):
    """The upstream server rejected TLS, or the TLS handshake with it failed."""


class SslMode(enum.Enum):
    """Protection of the proxy's connections to the server, as libpq's sslmode."""

    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"

    @classmethod
    def parse(cls, value: str) -> SslMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ConfigError(
                f"invalid sslmode {value!r}; expected one of {choices}"
            ) from None

    @property
    def requires_tls(self) -> bool:
        """Whether a server that responds 'N' to SSLRequest fails the connection."""
        return self not in (SslMode.DISABLE, SslMode.PREFER)


# Contexts


@dataclass(frozen=True, slots=True)
class ClientTls:
    """The TLS context and certificate that the proxy presents to clients."""

    context: ssl.SSLContext
    # DER of the proxy's own leaf certificate. SCRAM channel binding
    # (tls-server-end-point) hashes it, so binding passes through only when
    # the server presents the very same certificate.
    certificate: bytes


def load_client_tls(cert: Path | None, key: Path | None) -> ClientTls | None:
    """Build the server-side TLS context for client connections, TLS 1.2 or newer.

    Returns None when neither file is given. Raises ConfigError when only one
    is given, or a file is missing, invalid or (the key) readable by others.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key must be given together")
    _check_key_mode(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_PROTOCOL])
    try:
        context.load_cert_chain(cert, key)
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert} with key {key}: {exc}"
        ) from exc
    return ClientTls(context, leaf.public_bytes(Encoding.DER))


def _check_key_mode(path: Path) -> None:
    """Apply the PostgreSQL server's rule for its ssl_key_file.

    The key must be mode 0600 or stricter. Mode 0640 is allowed only when
    root owns the file, as for a key shared through an ssl-cert group.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS key file {path}: {exc}") from exc
    mode = stat.S_IMODE(info.st_mode)
    allowed = 0o640 if info.st_uid == 0 else 0o600
    if mode & ~allowed:
        raise ConfigError(
            f"TLS key file {path} has mode {mode:04o}, which lets group or "
            f"others access it; restrict it with: chmod 600 {path}"
        )


def check_upstream_tls(mode: SslMode, rootcert: str | None) -> None:
    """Raise ConfigError for an sslmode and sslrootcert pair that cannot work."""
    if rootcert is None:
        if mode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL):
            raise ConfigError(
                f"sslmode {mode.value} needs a root certificate: give "
                "--upstream-sslrootcert FILE, or 'system' for the system's CAs"
            )
        return
    if not mode.requires_tls:
        # libpq also checks the chain under prefer, but then falls back to
        # plaintext when the check fails, which makes the check pointless.
        raise ConfigError(
            f"--upstream-sslrootcert has no effect with sslmode {mode.value}, "
            "which falls back to plaintext; use require, verify-ca or verify-full"
        )
    if rootcert == SYSTEM_ROOTS and mode is not SslMode.VERIFY_FULL:
        raise ConfigError(
            "sslrootcert 'system' requires sslmode verify-full, as in libpq, "
            "because any public CA could have signed the server's certificate"
        )


def upstream_context(mode: SslMode, rootcert: str | None) -> ssl.SSLContext | None:
    """Build the client-side TLS context for the server, or None for disable.

    As in libpq, require verifies the chain when a root certificate is given
    (then it behaves as verify-ca), and only verify-full checks the host name.
    """
    check_upstream_tls(mode, rootcert)
    if mode is SslMode.DISABLE:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_PROTOCOL])
    context.check_hostname = mode is SslMode.VERIFY_FULL
    if rootcert is None:
        context.verify_mode = ssl.CERT_NONE
        return context
    if rootcert == SYSTEM_ROOTS:
        context.load_default_certs()
        return context
    try:
        context.load_verify_locations(cafile=rootcert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load root certificate file {rootcert}: {exc}"
        ) from exc
    return context


def asyncpg_ssl(
    mode: SslMode, context: ssl.SSLContext | None
) -> ssl.SSLContext | str | bool:
    """Return asyncpg's `ssl` argument for the same sslmode as the relay.

    asyncpg takes an SSLContext as "TLS required", so prefer stays a string.
    """
    if mode is SslMode.DISABLE or context is None:
        return False
    if mode is SslMode.PREFER:
        return "prefer"
    return context


# Client leg


@dataclass(slots=True)
class ClientLeg:
    """A client connection after encryption was negotiated."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # The first 8 bytes of the startup packet, when negotiation had to read
    # them to see that they were not an encryption request.
    prefix: bytes
    tls: bool


async def open_client_leg(sock: socket.socket, tls: ClientTls | None) -> ClientLeg:
    """Answer the client's encryption requests, then wrap its socket in streams.

    SSLRequest gets 'S' when TLS is configured, else 'N'. GSSENCRequest always
    gets 'N'. Each may come once, in either order, as in the PostgreSQL
    server. Raises ProtocolError after sending the client a FATAL error, where
    the client can read one.
    """
    loop = asyncio.get_running_loop()
    if await _peek_byte(sock) == TLS_HANDSHAKE_RECORD:
        return await _direct_tls(sock, tls)
    ssl_done = gss_done = False
    while True:
        head = await _recv_exactly(sock, 8)
        length, code = struct.unpack("!II", head)
        if length == 8 and code == SSL_REQUEST and not ssl_done:
            await _reject_pipelined(sock, "SSL request")
            if tls is not None:
                await loop.sock_sendall(sock, b"S")
                reader, writer = await _wrap_socket(sock, tls.context)
                return ClientLeg(reader, writer, b"", tls=True)
            await loop.sock_sendall(sock, b"N")
            ssl_done = True
        elif length == 8 and code == GSSENC_REQUEST and not gss_done:
            await _reject_pipelined(sock, "GSSAPI encryption request")
            await loop.sock_sendall(sock, b"N")
            gss_done = True
        else:
            reader, writer = await _wrap_socket(sock, None)
            return ClientLeg(reader, writer, head, tls=False)


async def _direct_tls(sock: socket.socket, tls: ClientTls | None) -> ClientLeg:
    """Run the TLS handshake a client began without SSLRequest (direct TLS).

    As the PostgreSQL 17 server does, require the ALPN protocol "postgresql",
    so that a TLS client of some other protocol cannot be confused for one.
    """
    if tls is None:
        # The client expects a TLS record, so a plaintext error would only
        # garble its handshake. Closing is the clearest response.
        raise ProtocolError("direct TLS connection attempt, but TLS is not configured")
    reader, writer = await _wrap_socket(sock, tls.context)
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
        message = (
            "received direct SSL connection request without ALPN protocol "
            f"negotiation extension for {ALPN_PROTOCOL!r}"
        )
        writer.write(m.encode_error("08P01", message, severity="FATAL"))
        await _close(writer)
        raise ProtocolError(message)
    return ClientLeg(reader, writer, b"", tls=True)


async def _reject_pipelined(sock: socket.socket, request: str) -> None:
    """Reject a client that sent more bytes before reading the one-byte response.

    Such bytes were sent in plaintext and could have been injected by a man
    in the middle (CVE-2021-23214). The check runs before the response,
    because a client may legally send its TLS handshake once it reads 'S'.
    """
    if not _has_pending(sock):
        return
    message = f"received unencrypted data after {request}"
    error = m.encode_error(
        "08P01",
        message,
        "This could be either a client-software bug or evidence of an "
        "attempted man-in-the-middle attack.",
        severity="FATAL",
    )
    await asyncio.get_running_loop().sock_sendall(sock, error)
    raise ProtocolError(message)


async def _wrap_socket(
    sock: socket.socket, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Build streams on an accepted socket, after a TLS handshake if context is set."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=context
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# Server leg


@dataclass(slots=True)
class ServerLeg:
    """A connection to the server, in TLS or plaintext as the sslmode allows."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # DER of the server's certificate; None on a plaintext connection.
    certificate: bytes | None


async def open_server_leg(
    host: str, port: int, mode: SslMode, context: ssl.SSLContext | None
) -> ServerLeg:
    """Connect to the server and negotiate TLS as sslmode `mode` requires.

    Raises OSError when the server cannot be reached and TlsNegotiationError
    when TLS is required but refused, or the handshake or certificate fails.
    Unlike libpq, prefer does not retry in plaintext after a failed handshake.
    """
    if context is None:
        reader, writer = await asyncio.open_connection(host, port)
        return ServerLeg(reader, writer, None)
    sock = await _connect(host, port)
    try:
        return await _negotiate_server_tls(sock, host, mode, context)
    except BaseException:
        sock.close()
        raise


async def _negotiate_server_tls(
    sock: socket.socket, host: str, mode: SslMode, context: ssl.SSLContext
) -> ServerLeg:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, SSL_REQUEST_PACKET)
    response = await _recv_exactly(sock, 1)
    if response == b"N":
        if mode.requires_tls:
            raise TlsNegotiationError(
                f"server does not support SSL, but sslmode {mode.value} requires it"
            )
        reader, writer = await asyncio.open_connection(sock=sock)
        return ServerLeg(reader, writer, None)
    if response != b"S":
        # An ErrorResponse here is unauthenticated, so its text is not shown
        # (CVE-2024-10977).
        raise TlsNegotiationError(
            f"server sent an invalid response {response!r} to SSLRequest"
        )
    if _has_pending(sock):
        raise TlsNegotiationError("server sent unencrypted data after its SSL response")
    try:
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=host
        )
    except ssl.SSLCertVerificationError as exc:
        raise TlsNegotiationError(
            f"server certificate verification failed: {exc.verify_message}"
        ) from exc
    except ssl.SSLError as exc:
        raise TlsNegotiationError(
            f"TLS handshake with the server failed: {exc}"
        ) from exc
    ssl_object = writer.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return ServerLeg(reader, writer, certificate)


async def _connect(host: str, port: int) -> socket.socket:
    """Open a non-blocking TCP socket to the first address of host that accepts."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address found for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


# Channel binding


class ChannelBindingGuard:
    """Remove SCRAM-SHA-256-PLUS from the server's SASL offer to the client.

    Channel binding (tls-server-end-point) hashes the certificate of the TLS
    session the client sees. That session ends at the proxy, so the client
    would hash the proxy's certificate and the server its own, and the
    exchange fails, unless both present the very same certificate. libpq
    also aborts when offered SCRAM-SHA-256-PLUS on a plaintext connection.
    The guard looks only at the authentication phase, until AuthenticationOk
    or an ErrorResponse.
    """

    def __init__(self, keep_plus: bool) -> None:
        self.active = True
        self._keep_plus = keep_plus
        self._removed_plus = False

    def from_server(self, frames: list[Frame]) -> list[Frame]:
        """Return the server's messages, with the SASL offer rewritten if needed."""
        for index, frame in enumerate(frames):
            if frame.type == ord("E"):
                self.active = False
            if frame.type != ord("R") or len(frame.raw) < 9:
                continue
            (code,) = struct.unpack_from("!i", frame.raw, 5)
            if code == AUTH_OK:
                self.active = False
            elif code == AUTH_SASL and not self._keep_plus:
                frames[index] = self._remove_plus(frame)
        return frames

    def check_client(self, frames: list[Frame]) -> bytes | None:
        """Return a FATAL error for a client that the server would reject, or None.

        A client that supports channel binding but is not offered it sends
        the gs2 flag 'y' in its SASLInitialResponse. A server that does
        support binding must then fail the login to stop a downgrade, with
        an error that does not name the proxy, so the proxy fails it first.
        """
        if not self._removed_plus:
            return None
        for frame in frames:
            if frame.type != ord("p"):
                continue
            self._removed_plus = False
            if _gs2_flag(frame) == b"y":
                return m.encode_error(
                    "28000",
                    "channel binding cannot pass through pgseal: the client's "
                    "TLS session ends at the proxy, not at the server",
                    "Set channel_binding=disable in the client's connection "
                    "string, or give the proxy the server's certificate and key.",
                    severity="FATAL",
                )
        return None

    def _remove_plus(self, frame: Frame) -> Frame:
        names = bytes(frame.raw[9:]).split(b"\0")
        kept = [name for name in names if name and name != SCRAM_PLUS]
        if len(kept) == len([name for name in names if name]):
            return frame
        self._removed_plus = True
        log.debug("removed %s from the server's SASL mechanisms", SCRAM_PLUS.decode())
        payload = struct.pack("!i", AUTH_SASL) + b"".join(n + b"\0" for n in kept)
        return Frame(frame.type, build(b"R", payload + b"\0"))


def _gs2_flag(frame: Frame) -> bytes:
    """Return the channel-binding flag ('n', 'y' or 'p') of a SASLInitialResponse."""
    payload = bytes(frame.raw[5:])
    end = payload.find(b"\0")
    if end < 0 or len(payload) < end + 6:
        return b""
    return payload[end + 5 : end + 6]


# Raw socket reads


async def _peek_byte(sock: socket.socket) -> int:
    """Return the first unread byte without taking it from the socket."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), _set_done, readable)
            try:
                await readable
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if not data:
            raise ConnectionError(
                "client closed the connection before its startup packet"
            )
        return data[0]


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly size bytes and nothing more, so no byte is read ahead."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection during negotiation")
        data += chunk
    return data


def _has_pending(sock: socket.socket) -> bool:
    """Check whether bytes already wait in the socket's receive buffer."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
