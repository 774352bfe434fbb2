"""Parsing the search_path value a server reports in ParameterStatus."""

from __future__ import annotations

import pytest

from proxy.wire.session import parse_search_path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"$user", public', ("$user", "public")),
        ('app,"My ""odd"" Schema" , public', ("app", 'My "odd" Schema', "public")),
        ("", ()),
    ],
)
def test_parse_search_path(value: str, expected: tuple[str, ...]) -> None:
    assert parse_search_path(value) == expected
