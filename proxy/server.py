"""The asyncio listener: client and server sockets, startup, and the relay.

This is the only module that owns client and server sockets. Each client
connection gets its own upstream connection and a sans-IO Session that
decides what to forward. Authentication is relayed unchanged: the proxy never
logs in on a client's behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from proxy.errors import ConfigError, ProtocolError
from proxy.wire import messages as m
from proxy.wire.frames import (
    DEFAULT_MAX_MESSAGE,
    Frame,
    FrameReader,
    read_startup_length,
)
from proxy.wire.session import Output, Planner, Session

log = logging.getLogger(__name__)

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
_MAX_STARTUP = 10_000
_READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Upstream:
    """The server behind the proxy, and the proxy's own login to it."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, dsn: str) -> Upstream:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ConfigError(
                "upstream must be a URI such as "
                "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
            )
        user = unquote(parts.username or "postgres")
        database = unquote(parts.path.lstrip("/")) or user
        return cls(
            host=parts.hostname,
            port=parts.port or 5432,
            user=user,
            database=database,
            password=unquote(parts.password or ""),
        )

    def connect_args(self, database: str | None = None) -> dict[str, object]:
        """Return the keyword arguments for asyncpg.connect and create_pool."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": database or self.database,
        }


@dataclass(frozen=True, slots=True)
class StartupPacket:
    raw: bytes
    code: int
    params: dict[str, str]


class Relay:
    """Accept client connections and relay each one to the upstream server."""

    def __init__(
        self,
        upstream: Upstream,
        planners: dict[str, Planner],
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._upstream = upstream
        self._planners = planners
        self._max_message = max_message
        self._ids = itertools.count(1)
        self.active_connections = 0
        self.on_catalog_change: Callable[[str], None] = lambda database: None

    def set_planners(self, planners: dict[str, Planner]) -> None:
        """Use new planners for connections that start from now on."""
        self._planners = planners

    async def handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        conn_id = f"c{next(self._ids)}"
        self.active_connections += 1
        try:
            await self._serve(conn_id, client_reader, client_writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("[%s] connection ended: %s", conn_id, exc)
        except ProtocolError as exc:
            log.warning("[%s] protocol violation: %s", conn_id, exc)
            await _send_fatal(client_writer, "08P01", str(exc))
        finally:
            self.active_connections -= 1
            client_writer.close()
            with contextlib.suppress(Exception):
                await client_writer.wait_closed()

    async def _serve(
        self,
        conn_id: str,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        startup = await self._read_startup(client_reader, client_writer)
        if startup is None:
            return
        if startup.code == CANCEL_REQUEST:
            await self._forward_cancel(conn_id, startup.raw)
            return
        database = startup.params.get("database") or startup.params.get("user", "")
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self._upstream.host, self._upstream.port
            )
        except OSError as exc:
            log.warning("[%s] upstream connection failed: %s", conn_id, exc)
            await _send_fatal(
                client_writer,
                "08006",
                "proxy could not connect to the upstream server",
                "Check that the server named in --upstream is running.",
            )
            return
        planner = self._planners.get(database)
        log.info(
            "[%s] connected to database %s (%s)",
            conn_id,
            database,
            "encrypting" if planner else "pass-through",
        )
        session = Session(planner, conn_id)
        server_writer.write(startup.raw)
        try:
            await self._relay(
                session, database, client_reader, client_writer, server_reader, server_writer
            )
        finally:
            server_writer.close()
            with contextlib.suppress(Exception):
                await server_writer.wait_closed()
            log.info("[%s] disconnected", conn_id)

    async def _read_startup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> StartupPacket | None:
        """Read the startup packet, declining SSL and GSS encryption first."""
        while True:
            header = await reader.readexactly(4)
            length = read_startup_length(header)
            if length < 8 or length > _MAX_STARTUP:
                raise ProtocolError(f"invalid startup packet length {length}")
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack_from("!I", body)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                # TODO: terminate TLS; until then clients fall back to plain TCP.
                writer.write(b"N")
                await writer.drain()
                continue
            if code == CANCEL_REQUEST:
                return StartupPacket(header + body, code, {})
            if code >> 16 != 3:
                raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
            return StartupPacket(header + body, code, _startup_params(body[4:]))

    async def _forward_cancel(self, conn_id: str, raw: bytes) -> None:
        try:
            _, writer = await asyncio.open_connection(self._upstream.host, self._upstream.port)
        except OSError as exc:
            log.warning("[%s] cancel request not delivered: %s", conn_id, exc)
            return
        writer.write(raw)
        await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        log.info("[%s] forwarded a cancel request", conn_id)

    async def _relay(
        self,
        session: Session,
        database: str,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        writers = (client_writer, server_writer)
        upward = asyncio.create_task(
            self._pump(client_reader, session.from_client, writers, server_writer, database)
        )
        downward = asyncio.create_task(
            self._pump(server_reader, session.from_server, writers, client_writer, database)
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

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        step: Callable[[list[Frame]], Output],
        writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        destination: asyncio.StreamWriter,
        database: str,
    ) -> None:
        """Read one side, pass its messages through the session, write the result.

        Only the side that normally receives the messages is drained, so a
        slow reader on one side never stops the other direction.
        """
        client_writer, server_writer = writers
        frames = FrameReader(self._max_message)
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            out = step(frames.feed(data))
            if out.to_client:
                client_writer.write(b"".join(out.to_client))
            if out.to_server:
                server_writer.write(b"".join(out.to_server))
            await destination.drain()
            if out.catalog_changed:
                self.on_catalog_change(database)
            if out.close:
                return


def _startup_params(body: bytes) -> dict[str, str]:
    parts = body.split(b"\0")
    params = {}
    for key, value in zip(parts[0::2], parts[1::2]):
        if not key:
            break
        params[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return params


async def _send_fatal(
    writer: asyncio.StreamWriter, sqlstate: str, message: str, hint: str = ""
) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(m.encode_error(sqlstate, message, hint, severity="FATAL"))
        await writer.drain()
