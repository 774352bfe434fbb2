"""Per-connection resources of a running proxy, counted to compare before and after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from tests.fixtures.proxy import RunningProxy


@dataclass(frozen=True)
class ProxyState:
    """Per-connection resources of one proxy, as seen from inside its process."""

    active_connections: int
    live_connections: int
    tasks: int
    # Accepted client sockets of the proxy, in any TCP state but LISTEN.
    client_sockets: int


def proxy_state(proxy: RunningProxy) -> ProxyState:
    """Take the counts on the proxy's own event loop, so that none is mid-update."""

    async def snapshot() -> tuple[int, int, int]:
        relay = proxy.proxy.relay
        assert relay is not None
        return (
            relay.active_connections,
            len(relay.connections),
            len(asyncio.all_tasks()),
        )

    active, live, tasks = proxy.run(snapshot())
    return ProxyState(active, live, tasks, _client_sockets(proxy.port))


def _client_sockets(port: int) -> int:
    # The proxy runs in the test process, so its sockets are this process's.
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status != psutil.CONN_LISTEN
    )


def buffered_bytes(proxy: RunningProxy) -> int:
    """Count the bytes of partial messages and unsent writes in the proxy's relay."""

    async def measure() -> int:
        relay = proxy.proxy.relay
        assert relay is not None
        return relay.buffered_bytes()

    result: int = proxy.run(measure())
    return result


def wait_until(
    condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05
) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass.

    Returns whether it became true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for_state(proxy: RunningProxy, expected: ProxyState) -> ProxyState:
    """Wait until the proxy's state equals `expected`, then return the state seen."""
    wait_until(lambda: proxy_state(proxy) == expected)
    return proxy_state(proxy)
