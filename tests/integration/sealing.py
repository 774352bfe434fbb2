"""Checks on what the table holds when read directly, bypassing the proxy."""

from __future__ import annotations

from proxy.crypto.values import dearmour, read_key_ref


def assert_sealed(stored: str | None, plaintext: str) -> None:
    """Assert that `stored` is a well-formed armoured value hiding `plaintext`."""
    assert stored is not None
    assert stored.startswith("pgs:")
    if plaintext:
        assert plaintext not in stored
    key_id, version = read_key_ref(dearmour(stored.encode("ascii")))
    assert key_id >= 1
    assert version >= 1
