"""Backpressure: a side that drains slowly neither deadlocks nor bloats the proxy."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.live_state import buffered_bytes
from tests.integration.test_extended_protocol import (
    SYNC,
    RawClient,
    bind,
    execute,
    kinds,
    parse,
    query,
)


@dataclass(frozen=True)
class Workload:
    """A statement to pipeline, its parameter, and the replies to one Execute."""

    sql: str
    parameter: str
    replies: str
    count: int


WORKLOADS = {
    # Large results: 5 rows of 10 kB per Execute, 100 MB in all.
    "large_results": Workload(
        "SELECT repeat('x', 10000) FROM generate_series(1, $1::int)",
        "5",
        "2DDDDDC",
        2000,
    ),
    # Large input, small results: 20 MB of parameters, under 500 kB of
    # replies. The server keeps reading while its replies wait unread in
    # the socket buffers, so the proxy must keep reading the client too.
    "large_input": Workload("SELECT $1::text WHERE false", "v" * 1000, "2C", 20_000),
}


def _pipeline_without_reading(client: RawClient, workload: Workload) -> str:
    """Send every Bind and Execute before reading any reply, then read them all.

    The batch is sent from a thread: if no side reads, the send blocks and
    the thread is still alive when the wait ends.
    """
    client.run(parse("s", workload.sql), SYNC)
    pair = bind("", "s", (workload.parameter,)) + execute()
    failures: list[BaseException] = []

    def send() -> None:
        try:
            client.send(pair * workload.count, SYNC)
        except OSError as exc:
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), "the pipelined batch could not be sent"
    assert failures == []
    return kinds(client.read_until_ready())


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("path", ["direct", "proxy"])
def test_pipeline_without_reading(
    oauth_proxy: RunningProxy, workload: str, path: str
) -> None:
    # Through the proxy the batch must succeed exactly where it succeeds
    # on the server alone, the control case.
    server = oauth_proxy.server
    host, port = (server.host, server.port)
    if path == "proxy":
        host, port = ("127.0.0.1", oauth_proxy.port)
    client = RawClient(
        host, port, server.superuser, server.password, oauth_proxy.database
    )
    chosen = WORKLOADS[workload]
    expected = chosen.replies * chosen.count + "Z"
    assert _pipeline_without_reading(client, chosen) == expected
    client.close()


RESULT_ROWS = 1000
ROW_BYTES = 100_000
# What the relay may hold for one slow reader: one read of the server
# (256 KiB) on top of asyncio's write buffer limit (64 KiB), and one partial
# DataRow (100 kB), with room to spare. The result itself is 100 MB; a relay
# that reads on without waiting for the client buffers most of it.
BUFFER_BOUND = 1024 * 1024
READY_IDLE = b"Z\0\0\0\5I"


def test_slow_reader_bounded_buffer(oauth_proxy: RunningProxy) -> None:
    server = oauth_proxy.server
    client = RawClient(
        "127.0.0.1",
        oauth_proxy.port,
        server.superuser,
        server.password,
        oauth_proxy.database,
    )
    sock: socket.socket = client._sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.send(
        query(f"SELECT repeat('x', {ROW_BYTES}) FROM generate_series(1, {RESULT_ROWS})")
    )

    received = 0
    peak = 0
    reads = 0
    tail = b""
    while tail != READY_IDLE:
        chunk = sock.recv(64 * 1024)
        assert chunk, "the proxy closed the connection"
        received += len(chunk)
        reads += 1
        # Reading slower than the server writes keeps the client's side full.
        time.sleep(0.001)
        if reads % 50 == 0:
            peak = max(peak, buffered_bytes(oauth_proxy))
        tail = (tail + chunk)[-len(READY_IDLE) :]
    client.close()

    assert received > RESULT_ROWS * ROW_BYTES
    assert reads >= 50
    assert peak < BUFFER_BOUND
