"""The asyncio listener: client and server sockets, startup, and the relay.

This module, with proxy.tls for the encryption negotiation that comes before
the startup packet, is the only one that touches client and server sockets.
Each client connection gets its own upstream connection and a sans-IO
Session that decides what to forward. Authentication is relayed unchanged,
except that SCRAM-SHA-256-PLUS is taken out of the server's offer (see
ChannelBindingGuard): the proxy never logs in on a client's behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from proxy.crypto.subjects import KeyRequest
from proxy.errors import (
    ConfigError,
    KeyStoreError,
    MessageTooLarge,
    ProtocolError,
    UpstreamError,
)
from proxy.pgpass import lookup_password
from proxy.tls import (
    ChannelBindingGuard,
    ClientLeg,
    ClientTls,
    ServerLeg,
    SslMode,
    TlsNegotiationError,
    asyncpg_ssl,
    check_upstream_tls,
    open_client_leg,
    open_server_leg,
    upstream_context,
)
from proxy.wire import messages as m
from proxy.wire.frames import (
    DEFAULT_MAX_MESSAGE,
    Frame,
    FrameReader,
)
from proxy.wire.session import Output, Planner, Session

log = logging.getLogger(__name__)

CANCEL_REQUEST = 80877102
# A CancelRequest is its length, its code and the backend's process ID (4
# bytes each), then the secret key from BackendKeyData: 4 bytes in protocol
# 3.0, 4 to 256 bytes in 3.2 (PostgreSQL 18 sends 32).
_CANCEL_HEADER = 12
_CANCEL_KEY_MIN = 4
_CANCEL_KEY_MAX = 256
# How long the proxy waits for the server to close a cancel connection.
_CANCEL_TIMEOUT_SECONDS = 10.0
_MAX_STARTUP = 10_000
_READ_SIZE = 256 * 1024
# As asyncio.start_server: the listen backlog, and the pause after accept
# fails, for example when the process is out of file descriptors.
_BACKLOG = 100
_ACCEPT_RETRY_SECONDS = 1.0
# The URI query parameters that Upstream.parse reads. Any other is an error,
# so that a setting such as sslcert is never silently ignored.
_URI_PARAMETERS = ("sslmode", "sslrootcert")
# Exceptions that end a connection in the normal course of things.
_CONNECTION_ENDED = (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)
# Seconds a client has from connecting to sending its whole startup packet,
# TLS negotiation included. As PostgreSQL's authentication_timeout default.
DEFAULT_STARTUP_TIMEOUT = 60.0
# After a FATAL protocol error, how long the proxy reads and discards what the
# client still sends. Closing a socket with unread input sends a TCP reset,
# which can destroy the error before the client reads it.
_LINGER_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """The server behind the proxy, and the proxy's own login to it."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(default="", repr=False)
    sslmode: SslMode = SslMode.PREFER
    # A CA file, or "system" for the system's trusted roots, as in libpq.
    sslrootcert: str | None = None

    def __post_init__(self) -> None:
        check_upstream_tls(self.sslmode, self.sslrootcert)

    @classmethod
    def parse(
        cls, dsn: str, sslmode: str | None = None, sslrootcert: str | None = None
    ) -> Upstream:
        """Parse a postgresql:// URI, where given arguments override its query."""
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ConfigError(
                "upstream must be a URI such as "
                "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
            )
        query = _parse_query(parts.query)
        port = _uri_port(parts)
        user = unquote(parts.username or "postgres")
        database = unquote(parts.path.lstrip("/")) or user
        # As libpq: a password in the URI wins, then PGPASSWORD, then the
        # password file, so that the password need not be on the command line.
        password = unquote(parts.password or "") or lookup_password(
            parts.hostname, port, database, user
        )
        return cls(
            host=parts.hostname,
            port=port,
            user=user,
            database=database,
            password=password or "",
            sslmode=SslMode.parse(sslmode or query.get("sslmode", "prefer")),
            sslrootcert=sslrootcert or query.get("sslrootcert"),
        )

    @property
    def address(self) -> str:
        """HOST:PORT of the server, with an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def unreachable(self, exc: OSError) -> UpstreamError:
        """Describe a failed connection to the server, naming its address."""
        return UpstreamError(
            f"cannot connect to the upstream server at {self.address}: "
            f"{exc.strerror or exc}; check that PostgreSQL is running there and "
            "that --upstream names its host and port"
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """Build the TLS context for connections to the server, or None for disable."""
        return upstream_context(self.sslmode, self.sslrootcert)

    def connect_args(self, database: str | None = None) -> dict[str, Any]:
        """Return the keyword arguments for asyncpg.connect and create_pool."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": database or self.database,
            "ssl": asyncpg_ssl(self.sslmode, self.tls_context()),
        }


def is_unreachable(exc: OSError) -> bool:
    """Tell whether a failed connect means that the server could not be reached.

    A TLS failure, an ssl.SSLError or asyncpg's ConnectionError for a
    rejected SSL upgrade, means that the server was reached, so it keeps its
    own message.
    """
    if isinstance(exc, ssl.SSLError):
        return False
    if isinstance(exc, ConnectionError):
        return isinstance(exc, ConnectionRefusedError)
    return True


def _uri_port(parts: SplitResult) -> int:
    """Return the URI's port, 5432 if it has none. Raises ConfigError if invalid."""
    # The port text comes after the last '@', so a password never reaches
    # the message.
    text = parts.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")[2]
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None:
        return 5432
    if not 1 <= port <= 65535:
        raise ConfigError(
            f"upstream port must be a number from 1 to 65535, got {text!r}"
        )
    return port


def _parse_query(query: str) -> dict[str, str]:
    values = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(values) - set(_URI_PARAMETERS))
    if unknown:
        raise ConfigError(
            f"unsupported parameter {unknown[0]!r} in the upstream URI; "
            f"supported: {', '.join(_URI_PARAMETERS)}"
        )
    return {name: found[-1] for name, found in values.items()}


@dataclass(frozen=True, slots=True)
class StartupPacket:
    raw: bytes
    code: int
    params: dict[str, str]


@dataclass(slots=True)
class LiveConnection:
    """The relay's state of one open client connection: deadline and buffers."""

    # Loop time by which the client must have sent its whole startup packet.
    startup_deadline: float
    writers: tuple[asyncio.StreamWriter, ...] = ()
    frame_readers: tuple[FrameReader, ...] = ()

    def buffered_bytes(self) -> int:
        """Count the bytes of partial messages and of writes not yet sent."""
        size = sum(reader.pending_bytes for reader in self.frame_readers)
        for writer in self.writers:
            size += writer.transport.get_write_buffer_size()
        return size


ConnectionHandler = Callable[[socket.socket], Coroutine[Any, Any, None]]


class Listener:
    """Listening sockets that pass each accepted socket to a handler.

    Unlike asyncio.start_server, the handler gets the raw socket before any
    stream reads from it. A client using direct TLS sends its TLS handshake
    first, and those bytes must reach the TLS layer unread.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        handler: ConnectionHandler,
    ) -> None:
        self.sockets = sockets
        self._handler = handler
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting = [asyncio.create_task(self._accept(sock)) for sock in sockets]

    @classmethod
    async def start(
        cls, handler: ConnectionHandler, host: str, port: int
    ) -> Listener:
        """Bind every address of host and start accepting connections."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(_BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, handler)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:
                log.warning(
                    "accept failed, retrying in %gs: %s", _ACCEPT_RETRY_SECONDS, exc
                )
                await asyncio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handler(sock))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def serve_forever(self) -> None:
        """Wait until the listener is closed. Cancelling the wait closes it."""
        try:
            await asyncio.gather(*self._accepting)
        finally:
            self.close()

    def close(self) -> None:
        """Stop accepting. Connections already accepted go on, as in asyncio."""
        for task in self._accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)


class Relay:
    """Accept client connections and relay each one to the upstream server."""

    def __init__(
        self,
        upstream: Upstream,
        planners: dict[str, Planner],
        max_message: int = DEFAULT_MAX_MESSAGE,
        client_tls: ClientTls | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self._upstream = upstream
        self._upstream_tls = upstream.tls_context()
        self._client_tls = client_tls
        self._planners = planners
        self._max_message = max_message
        self._startup_timeout = startup_timeout
        self._ids = itertools.count(1)
        self.active_connections = 0
        self.connections: dict[str, LiveConnection] = {}
        self.on_catalog_change: Callable[[str], None] = lambda database: None
        self.catalog_ready: Callable[[str], Awaitable[None]] = _nothing_to_wait_for
        """Waits until a catalog reload of the database in progress has finished."""
        self.refresh_catalog: Callable[[str], Awaitable[None]] = _nothing_to_wait_for
        """Reads the catalog of the database again, in a reload that starts now."""
        self.fetch_keys: Callable[[tuple[KeyRequest, ...]], Awaitable[None]] = _no_keys
        """Loads or creates the data keys a session asked for, into the cache."""

    def set_planners(self, planners: dict[str, Planner]) -> None:
        """Use new planners for connections that start from now on."""
        self._planners = planners

    async def accept(self, sock: socket.socket) -> None:
        """Serve one accepted client socket until either side closes."""
        conn_id = f"c{next(self._ids)}"
        deadline = asyncio.get_running_loop().time() + self._startup_timeout
        self.connections[conn_id] = LiveConnection(deadline)
        self.active_connections += 1
        try:
            client = await self._open_client(conn_id, sock)
            if client is not None:
                await self._handle(conn_id, client)
        finally:
            self.active_connections -= 1
            del self.connections[conn_id]

    def buffered_bytes(self) -> int:
        """Count the bytes held for all open connections, as LiveConnection does."""
        return sum(live.buffered_bytes() for live in self.connections.values())

    async def _open_client(self, conn_id: str, sock: socket.socket) -> ClientLeg | None:
        try:
            async with asyncio.timeout_at(self.connections[conn_id].startup_deadline):
                return await open_client_leg(sock, self._client_tls)
        except TimeoutError:
            self._log_startup_timeout(conn_id)
        except ProtocolError as exc:
            log.warning("[%s] protocol violation: %s", conn_id, exc)
        except ssl.SSLError as exc:
            log.info("[%s] TLS handshake with the client failed: %s", conn_id, exc)
        except ConnectionError as exc:
            log.debug("[%s] connection ended during negotiation: %s", conn_id, exc)
        except BaseException:
            sock.close()
            raise
        sock.close()
        return None

    async def _handle(self, conn_id: str, client: ClientLeg) -> None:
        try:
            await self._serve(conn_id, client)
        except _CONNECTION_ENDED as exc:
            log.debug("[%s] connection ended: %s", conn_id, exc)
        except MessageTooLarge as exc:
            log.warning("[%s] protocol violation: %s", conn_id, exc)
            hint = (
                f"The proxy accepts messages of up to {exc.limit} bytes. Its "
                "operator can raise that with pgseal serve --max-message-size."
            )
            await _send_fatal(client.writer, "08P01", str(exc), hint)
            await _linger(client)
        except ProtocolError as exc:
            log.warning("[%s] protocol violation: %s", conn_id, exc)
            await _send_fatal(client.writer, "08P01", str(exc))
            await _linger(client)
        finally:
            client.writer.close()
            with contextlib.suppress(Exception):
                await client.writer.wait_closed()

    async def _serve(self, conn_id: str, client: ClientLeg) -> None:
        startup = await self._read_startup_in_time(conn_id, client)
        if startup is None:
            return
        if startup.code == CANCEL_REQUEST:
            await self._forward_cancel(conn_id, startup.raw)
            return
        database = startup.params.get("database") or startup.params.get("user", "")
        server = await self._open_server(conn_id, client.writer)
        if server is None:
            return
        planner = self._planners.get(database)
        log.info(
            "[%s] connected to database %s (%s, client %s, server %s)",
            conn_id,
            database,
            "encrypting" if planner else "pass-through",
            "TLS" if client.tls else "plaintext",
            "TLS" if server.certificate is not None else "plaintext",
        )
        session = Session(planner, conn_id, startup.params.get("user", ""))
        guard = ChannelBindingGuard(keep_plus=self._same_certificate(client, server))
        server.writer.write(startup.raw)
        try:
            await self._relay(conn_id, session, guard, database, client, server)
        finally:
            server.writer.close()
            with contextlib.suppress(Exception):
                await server.writer.wait_closed()
            log.info("[%s] disconnected", conn_id)

    async def _read_startup_in_time(
        self, conn_id: str, client: ClientLeg
    ) -> StartupPacket | None:
        """Read the startup packet, or return None once the startup timeout passed.

        The caller then closes the connection without an error message, as
        PostgreSQL does on its authentication_timeout. Once the startup packet
        is forwarded, the server's own authentication_timeout applies.
        """
        try:
            async with asyncio.timeout_at(self.connections[conn_id].startup_deadline):
                return await _read_startup(client)
        except TimeoutError:
            self._log_startup_timeout(conn_id)
            return None

    def _log_startup_timeout(self, conn_id: str) -> None:
        log.info(
            "[%s] no startup packet within %gs, closing the connection",
            conn_id,
            self._startup_timeout,
        )

    def _same_certificate(self, client: ClientLeg, server: ServerLeg) -> bool:
        """Whether the client sees the server's own certificate on the proxy.

        Only then does SCRAM channel binding compute the same data on both
        ends, and SCRAM-SHA-256-PLUS can pass through.
        """
        if not client.tls or self._client_tls is None:
            return False
        return server.certificate == self._client_tls.certificate

    async def _open_server(
        self, conn_id: str, client_writer: asyncio.StreamWriter
    ) -> ServerLeg | None:
        """Connect to the server, or send the client a FATAL error and return None."""
        upstream = self._upstream
        try:
            return await open_server_leg(
                upstream.host, upstream.port, upstream.sslmode, self._upstream_tls
            )
        except TlsNegotiationError as exc:
            log.warning("[%s] upstream TLS failed: %s", conn_id, exc)
            await _send_fatal(
                client_writer,
                "08006",
                f"proxy could not connect to the upstream server: {exc}",
                "Check --upstream-sslmode and --upstream-sslrootcert, and the "
                "server's ssl settings.",
            )
        except OSError as exc:
            log.warning("[%s] upstream connection failed: %s", conn_id, exc)
            await _send_fatal(
                client_writer,
                "08006",
                "proxy could not connect to the upstream server",
                "Check that the server named in --upstream is running.",
            )
        return None

    async def _forward_cancel(self, conn_id: str, raw: bytes) -> None:
        """Pass a CancelRequest to the server and send the client nothing.

        The server sends no response to a CancelRequest, so a client cannot
        tell whether its key matched a session. The proxy keeps it so, and
        closes the client's connection only after the server closed its own.
        """
        key_size = len(raw) - _CANCEL_HEADER
        if not _CANCEL_KEY_MIN <= key_size <= _CANCEL_KEY_MAX:
            log.warning(
                "[%s] cancel request dropped: invalid secret key length %d",
                conn_id,
                key_size,
            )
            return
        # The cancel key goes over TLS when the sslmode gives TLS, since
        # anyone who reads it can cancel that session's queries.
        upstream = self._upstream
        try:
            server = await open_server_leg(
                upstream.host, upstream.port, upstream.sslmode, self._upstream_tls
            )
        except (OSError, TlsNegotiationError) as exc:
            log.warning("[%s] cancel request not delivered: %s", conn_id, exc)
            return
        try:
            await _deliver_cancel(server, raw)
        except TimeoutError:
            log.warning(
                "[%s] cancel request sent, but the server did not close the "
                "connection within %gs",
                conn_id,
                _CANCEL_TIMEOUT_SECONDS,
            )
            return
        except _CONNECTION_ENDED as exc:
            log.warning("[%s] cancel connection to the server failed: %s", conn_id, exc)
            return
        finally:
            server.writer.close()
            with contextlib.suppress(Exception):
                await server.writer.wait_closed()
        log.info("[%s] forwarded a cancel request", conn_id)

    async def _relay(
        self,
        conn_id: str,
        session: Session,
        guard: ChannelBindingGuard,
        database: str,
        client: ClientLeg,
        server: ServerLeg,
    ) -> None:
        writers = (client.writer, server.writer)
        client_frames = FrameReader(self._max_message, "client")
        server_frames = FrameReader(self._max_message, "server")
        live = self.connections[conn_id]
        live.writers = writers
        live.frame_readers = (client_frames, server_frames)

        def from_client(frames: list[Frame]) -> Output:
            if guard.active:
                error = guard.check_client(frames)
                if error is not None:
                    return Output(to_client=[error], close=True)
            return session.from_client(frames)

        def from_server(frames: list[Frame]) -> Output:
            if guard.active:
                frames = guard.from_server(frames)
            return session.from_server(frames)

        def forwards_unchanged() -> bool:
            return session.passes_through and not guard.active

        upward = asyncio.create_task(
            self._pump(
                client.reader,
                client_frames,
                from_client,
                writers,
                server.writer,
                database,
                forwards_unchanged,
                # Statements after DDL wait for the catalog that DDL changed.
                lambda: self.catalog_ready(database),
            )
        )
        downward = asyncio.create_task(
            self._pump(
                server.reader,
                server_frames,
                from_server,
                writers,
                client.writer,
                database,
                forwards_unchanged,
            )
        )
        done, pending = await asyncio.wait(
            {upward, downward}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            exc = task.exception()
            if isinstance(exc, ProtocolError):
                raise exc
            if exc is not None and not isinstance(exc, _CONNECTION_ENDED):
                log.error(
                    "[%s] relay failed, closing the connection", conn_id, exc_info=exc
                )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        frames: FrameReader,
        step: Callable[[list[Frame]], Output],
        writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        destination: asyncio.StreamWriter,
        database: str,
        forwards_unchanged: Callable[[], bool],
        before_step: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Read one side, pass its messages through the session, write the result.

        Only the side that normally receives the messages is drained, so a
        slow reader on one side never stops the other direction. Waiting for
        that drain before the next read bounds what the proxy buffers for a
        slow reader: asyncio's StreamReader then stops reading the socket.

        Once forwards_unchanged() holds at a message boundary (a session
        without rules, after authentication), every later read goes on as it
        was read: only the message lengths are checked, and no message is
        split out or copied.
        """
        client_writer, server_writer = writers
        unchanged = False
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            if unchanged:
                frames.scan(data)
                destination.write(data)
                await destination.drain()
                continue
            if before_step is not None:
                await before_step()
            out = step(frames.feed(data))
            fetched: tuple[KeyRequest, ...] = ()
            while True:
                if out.catalog_changed:
                    # Before the client sees ReadyForQuery, so that its next
                    # statement waits for the reload.
                    self.on_catalog_change(database)
                if out.to_client:
                    client_writer.write(b"".join(out.to_client))
                if out.to_server:
                    server_writer.write(b"".join(out.to_server))
                # NOTE: a peer that stops reading blocks this drain without a
                # time limit. Its connection stays open, even after the other
                # side has ended the session, until it reads again or its
                # socket fails.
                await destination.drain()
                if out.close:
                    return
                if out.catalog_needed:
                    await self.refresh_catalog(database)
                    out = step(out.retry)
                    continue
                if not out.keys_needed:
                    break
                # The session stopped at a message whose data keys are not
                # cached, and hands back that message and the ones after it.
                if out.keys_needed == fetched:
                    raise KeyStoreError(
                        "data keys were fetched but are still missing from the cache"
                    )
                fetched = out.keys_needed
                await self.fetch_keys(fetched)
                out = step(out.retry)
            unchanged = frames.pending_bytes == 0 and forwards_unchanged()


async def _nothing_to_wait_for(database: str) -> None:
    return None


async def _no_keys(requests: tuple[KeyRequest, ...]) -> None:
    raise KeyStoreError("this relay has no key store to fetch data keys from")


async def _deliver_cancel(server: ServerLeg, raw: bytes) -> None:
    """Send a CancelRequest and wait until the server closes the connection.

    The server closes it once it has signalled the backend. libpq's PQcancel
    waits for that close before it returns, because the client may send its
    next query right after, and a late signal would cancel that query
    instead. So the client's cancel connection stays open until then.
    """
    server.writer.write(raw)
    await server.writer.drain()
    async with asyncio.timeout(_CANCEL_TIMEOUT_SECONDS):
        while await server.reader.read(_READ_SIZE):
            pass


async def _read_startup(client: ClientLeg) -> StartupPacket:
    """Read the startup packet or CancelRequest that follows the negotiation.

    A second SSLRequest or GSSENCRequest is an error here, as in the server:
    each may come once, and neither after TLS is established.
    """
    head = client.prefix or await client.reader.readexactly(8)
    # The length is an Int32, so a negative one shows as negative.
    length, code = struct.unpack("!iI", head)
    if length < 8 or length > _MAX_STARTUP:
        raise ProtocolError(f"invalid startup packet length {length}")
    raw = head + await client.reader.readexactly(length - 8)
    if code == CANCEL_REQUEST:
        return StartupPacket(raw, code, {})
    # The code of an SSLRequest or GSSENCRequest is protocol 1234.x.
    if code >> 16 != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "the proxy supports protocol 3"
        )
    return StartupPacket(raw, code, _startup_params(raw[8:]))


def _startup_params(body: bytes) -> dict[str, str]:
    parts = body.split(b"\0")
    params = {}
    for key, value in zip(parts[0::2], parts[1::2]):
        if not key:
            break
        params[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return params


async def _linger(client: ClientLeg) -> None:
    """Close the client's sending side, then discard its input until it closes.

    Gives the client time to read a FATAL error before the socket closes,
    for at most _LINGER_SECONDS.
    """
    writer = client.writer
    with contextlib.suppress(*_CONNECTION_ENDED, TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(_LINGER_SECONDS):
            while await client.reader.read(_READ_SIZE):
                pass


async def _send_fatal(
    writer: asyncio.StreamWriter, sqlstate: str, message: str, hint: str = ""
) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(m.encode_error(sqlstate, message, hint, severity="FATAL"))
        await writer.drain()
