"""A loopback TCP forwarder that records what passes and can delay cancels.

Placed between a client and the proxy, it shows the messages the client
receives, such as BackendKeyData and NegotiateProtocolVersion. Placed
between the proxy and the server, it can hold a CancelRequest back, so a
test can tell whether the proxy waits for the server before it closes the
client's cancel connection. Both legs must be plaintext
(`sslmode=disable`), because the forwarder reads the startup packet.

The functions below build and send CancelRequests for the cancel tests.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy

CANCEL_REQUEST_CODE = 80877102
_CHUNK = 65536


@dataclass
class Connection:
    """What one forwarded connection carried."""

    # The client's startup packet, SSLRequest or CancelRequest.
    startup: bytes = b""
    startup_code: int = 0
    # Every byte the target sent back, in order.
    from_target: bytearray = field(default_factory=bytearray)
    # For a CancelRequest: monotonic time at which the target closed the
    # connection after receiving it, so the cancel had been processed.
    cancel_done_at: float | None = None

    def messages(self) -> list[tuple[str, bytes]]:
        """Split the target's bytes into (type letter, payload) pairs."""
        data = bytes(self.from_target)
        found = []
        pos = 0
        while pos + 5 <= len(data):
            (length,) = struct.unpack_from("!I", data, pos + 1)
            found.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
            pos += 1 + length
        return found


class Forwarder:
    """Forward each connection on a loopback port to `target_port`.

    `cancel_delay` is the number of seconds a CancelRequest is held before
    it goes on to the target.
    """

    def __init__(self, target_port: int, cancel_delay: float = 0.0) -> None:
        self._target_port = target_port
        self._cancel_delay = cancel_delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[Connection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting. Connections already forwarded go on until they end."""
        self._listener.close()

    def cancels(self) -> list[Connection]:
        return [c for c in self.connections if c.startup_code == CANCEL_REQUEST_CODE]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        record = Connection()
        self.connections.append(record)
        with (
            client,
            socket.create_connection(("127.0.0.1", self._target_port)) as target,
        ):
            head = _recv_exactly(client, 8)
            length, record.startup_code = struct.unpack("!II", head)
            record.startup = head + _recv_exactly(client, length - 8)
            if record.startup_code == CANCEL_REQUEST_CODE:
                time.sleep(self._cancel_delay)
                target.sendall(record.startup)
                # The server sends nothing back and closes once it has
                # signalled the backend.
                while chunk := target.recv(_CHUNK):
                    record.from_target += chunk
                record.cancel_done_at = time.monotonic()
                return
            target.sendall(record.startup)
            upward = threading.Thread(
                target=_copy, args=(client, target, None), daemon=True
            )
            upward.start()
            _copy(target, client, record.from_target)
            upward.join(10)


def cancel_request(pid: int, key: bytes) -> bytes:
    return struct.pack("!III", 12 + len(key), CANCEL_REQUEST_CODE, pid) + key


def backend_key(forwarder: Forwarder) -> tuple[int, bytes]:
    """Return the process ID and secret key of the first forwarded session."""
    (payload,) = [p for kind, p in forwarder.connections[0].messages() if kind == "K"]
    (pid,) = struct.unpack_from("!I", payload)
    return pid, payload[4:]


def send_cancel(port: int, packet: bytes) -> bytes:
    """Send a CancelRequest to the port and return all it sent back before EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(packet)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


def client_dsn(proxy: RunningProxy, port: int, protocol: str | None = None) -> str:
    """Conninfo for a plaintext libpq client of the proxy's database on `port`.

    `protocol` sets libpq's max_protocol_version, such as "3.2" (libpq 18).
    """
    server = proxy.server
    options = {"max_protocol_version": protocol} if protocol else {}
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1",
        port=port,
        user=server.superuser,
        password=server.password,
        dbname=proxy.database,
        sslmode="disable",
        gssencmode="disable",
        **options,
    )


def sleep_cancelled(conn: psycopg.Connection, cancel: Callable[[], object]) -> float:
    """Run pg_sleep(30), call `cancel` after half a second; return the seconds taken."""
    timer = threading.Timer(0.5, cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
    finally:
        timer.cancel()
        timer.join()
    return time.monotonic() - started


def _copy(source: socket.socket, sink: socket.socket, log: bytearray | None) -> None:
    try:
        while chunk := source.recv(_CHUNK):
            if log is not None:
                log += chunk
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed before the startup packet ended")
        data += chunk
    return data
