"""The parser fast path for writes, and writes into relations not in the catalog."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.catalog import Catalog, RelationKind
from proxy.sql.analyze import Analyzer
from proxy.sql.relations import CatalogStale, write_needs_analysis
from tests.sql.test_analyze import ACCOUNTS

PLAIN = frozenset({("public", "orders"), ("sales", "orders")})


def _catalog() -> Catalog:
    return replace(Catalog.build([ACCOUNTS]), relations=PLAIN, has_snapshot=True)


@pytest.mark.parametrize(
    "sql",
    [
        "insert into orders (id) values (1)",
        "update orders set n = 2 where id = 1",
        "update only sales.orders set n = 2",
        "copy orders from stdin",
        "select * from orders",
    ],
)
def test_plain_write_skips_parser(sql: str) -> None:
    assert not write_needs_analysis(sql, _catalog(), ("public",))


@pytest.mark.parametrize(
    "sql",
    [
        "insert into new_view (id) values (1)",
        'insert into "Orders" (id) values (1)',
        "insert into orders values (1); insert into new_view values (2)",
        "with x as (insert into new_view values (1) returning 1) select * from x",
        "select * from orders for update",
    ],
)
def test_other_write_parsed(sql: str) -> None:
    assert write_needs_analysis(sql, _catalog(), ("public",))


def test_unknown_write_target_stale() -> None:
    planner = Analyzer(_catalog())
    with pytest.raises(CatalogStale) as raised:
        planner.plan("INSERT INTO new_view (id) VALUES (1)", ("public",))
    plan = planner.plan(
        "INSERT INTO new_view (id) VALUES (1)", ("public",), frozenset({"new_view"})
    )
    assert raised.value.relations == ("new_view",)
    assert plan.is_empty


def test_classify_without_snapshot_plain() -> None:
    kind, _ = Catalog.build([ACCOUNTS]).classify(None, "anything", ("public",))
    assert kind is RelationKind.PLAIN
