"""Tests for the recovery-key shares and files in proxy.crypto.backup."""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path

import pytest

from proxy.crypto.backup import Share, combine_key, split_key
from proxy.errors import ConfigError, KeyringError

KEY = bytes(range(32))


def test_split_combine_any_threshold() -> None:
    shares = split_key(KEY, 3, 5)
    assert [index for index, _ in shares] == [1, 2, 3, 4, 5]
    for subset in itertools.combinations(shares, 3):
        assert combine_key(subset) == KEY


def test_combine_more_than_threshold() -> None:
    shares = split_key(KEY, 2, 4)
    assert combine_key(shares) == KEY


def test_combine_too_few_gives_wrong_key() -> None:
    shares = split_key(KEY, 3, 5)
    for subset in itertools.combinations(shares, 2):
        assert combine_key(subset) != KEY


def test_shares_hide_key() -> None:
    key = secrets.token_bytes(32)
    for _, value in split_key(key, 2, 3):
        assert len(value) == 32
        assert key[:16] not in value
        assert key[16:] not in value


@pytest.mark.parametrize(("threshold", "count"), [(1, 3), (4, 3), (0, 0), (2, 256)])
def test_split_invalid_numbers(threshold: int, count: int) -> None:
    with pytest.raises(ConfigError, match="2 <= threshold <= shares <= 255"):
        split_key(KEY, threshold, count)


def test_split_wrong_key_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        split_key(KEY[:16], 2, 3)


def test_share_file_round_trip(tmp_path: Path) -> None:
    share = Share("ab" * 16, 3, 2, bytes(range(32)))
    path = tmp_path / "share-2.txt"
    path.write_text(share.to_text(5))
    assert Share.read(path) == share
    assert "share 2 of 5" in path.read_text()


def test_share_repr_hides_value() -> None:
    share = Share("ab" * 16, 3, 2, bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(share)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "pgseal-share-v1:abc:3:2:00\n",
        "pgseal-share-v1:" + "ab" * 16 + ":3:2:" + "00" * 31 + "\n",
        "# comment only\n",
    ],
)
def test_share_file_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "share.txt"
    path.write_text(text)
    with pytest.raises(KeyringError, match="is invalid"):
        Share.read(path)


def test_share_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read share file"):
        Share.read(tmp_path / "absent.txt")
