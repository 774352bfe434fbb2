"""Batch INSERT ... SELECT over VALUES or UNNEST, through a real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKENS = [f"gho_batch_{i}_Rt5Wq9Lm2Xc8" for i in range(3)]

VALUES_SELECT = (
    "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
    "SELECT p0::INTEGER, p1::VARCHAR, p2::TEXT FROM (VALUES "
    "(%s::INTEGER, %s::VARCHAR, %s::TEXT, 0), (%s::INTEGER, %s::VARCHAR, %s::TEXT, 1), "
    "(%s::INTEGER, %s::VARCHAR, %s::TEXT, 2)) AS imp_sen(p0, p1, p2, sen_counter) "
    "ORDER BY sen_counter RETURNING id, access_token"
)
UNNEST_SELECT = (
    "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
    "SELECT * FROM UNNEST((%s)::integer[], (%s)::text[], (%s)::varchar[]) "
    "RETURNING access_token"
)


def _connect(proxy: RunningProxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True)


def _stored(proxy: RunningProxy) -> list[tuple[int, str | None, str | None]]:
    return proxy.direct(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )


def _read(proxy: RunningProxy) -> list[tuple[int, str | None, str | None]]:
    with _connect(proxy) as conn:
        rows = conn.execute(
            "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
            "ORDER BY user_id"
        ).fetchall()
    return [(row[0], row[1], row[2]) for row in rows]


def _check_rows(proxy: RunningProxy) -> None:
    """Check the three rows of TOKENS, the second without a refresh token."""
    expected = [
        (i, token, None if i == 1 else f"refresh-{i}") for i, token in enumerate(TOKENS)
    ]
    assert _read(proxy) == expected
    stored = _stored(proxy)
    assert [user_id for user_id, _, _ in stored] == [0, 1, 2]
    for (_, access, refresh), (_, token, plain_refresh) in zip(stored, expected):
        assert_sealed(access, token)
        if plain_refresh is None:
            assert refresh is None
        else:
            assert_sealed(refresh, plain_refresh)
    # Randomized sealing: each stored value has its own nonce.
    assert len({access for _, access, _ in stored}) == 3


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_values_select_parameters(oauth_proxy: RunningProxy, binary: bool) -> None:
    params: list[object] = []
    for i, token in enumerate(TOKENS):
        params += [i, token, None if i == 1 else f"refresh-{i}"]
    sql = VALUES_SELECT.replace("%s", "%b") if binary else VALUES_SELECT
    with _connect(oauth_proxy) as conn:
        returned = conn.execute(sql, params).fetchall()

    assert [token for _, token in returned] == TOKENS
    _check_rows(oauth_proxy)


def test_values_select_literals_simple_query(oauth_proxy: RunningProxy) -> None:
    rows = ", ".join(
        f"({i}, '{token}', {'NULL' if i == 1 else repr(f'refresh-{i}')})"
        for i, token in enumerate(TOKENS)
    )
    with _connect(oauth_proxy) as conn:
        conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            f"SELECT a, b, c FROM (VALUES {rows}) AS v(a, b, c)",
            prepare=False,
        )

    _check_rows(oauth_proxy)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_unnest_array_parameters(oauth_proxy: RunningProxy, binary: bool) -> None:
    refresh = [None if i == 1 else f"refresh-{i}" for i in range(3)]
    sql = UNNEST_SELECT.replace("%s", "%b") if binary else UNNEST_SELECT
    with _connect(oauth_proxy) as conn:
        returned = conn.execute(sql, ([0, 1, 2], TOKENS, refresh)).fetchall()

    assert [token for (token,) in returned] == TOKENS
    _check_rows(oauth_proxy)


def test_unnest_array_literals_simple_query(oauth_proxy: RunningProxy) -> None:
    with psycopg.ClientCursor(_connect(oauth_proxy)) as cursor:
        cursor.execute(
            UNNEST_SELECT,
            ([0, 1, 2], TOKENS, [None if i == 1 else f"refresh-{i}" for i in range(3)]),
        )
        returned = cursor.fetchall()

    assert [token for (token,) in returned] == TOKENS
    _check_rows(oauth_proxy)


@pytest.mark.parametrize("client_binding", [False, True], ids=["server", "client"])
def test_unnest_quoted_elements(
    oauth_proxy: RunningProxy, client_binding: bool
) -> None:
    # Client-side binding sends the arrays as literals such as E'{...}'.
    awkward = ['with "quotes", commas', "back\\slash", "NULL", "", "it's"]
    with _connect(oauth_proxy) as conn:
        cursor = psycopg.ClientCursor(conn) if client_binding else conn.cursor()
        cursor.execute(
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT * FROM UNNEST(%s::int[], %s::text[])",
            (list(range(5)), awkward),
        )

    assert [access for _, access, _ in _read(oauth_proxy)] == awkward
    for (_, access, _), plain in zip(_stored(oauth_proxy), awkward):
        assert_sealed(access, plain)


# Logical types and bytea storage

RULES = """\
tables:
  - name: public.payments
    columns:
      - {name: amount_cents, type: int4}
      - {name: memo, type: text, storage: bytea}
"""


@pytest.fixture
def payments(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE payments "
            "(id serial PRIMARY KEY, amount_cents text, memo bytea)"
        )
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "payments.yaml").write_text(RULES)
    return start_proxy(fresh_db, rules)


@pytest.mark.parametrize(
    ("binary", "arrays"),
    [(False, "%s::text[], %s::bytea[]"), (True, "%b, %b")],
    ids=["text", "binary"],
)
def test_unnest_logical_types(
    payments: RunningProxy, binary: bool, arrays: str
) -> None:
    # In binary, psycopg declares int2[] and text[] with no cast in the text;
    # the proxy declares the storage arrays text[] and bytea[] instead.
    with _connect(payments) as conn:
        conn.execute(
            f"INSERT INTO payments (amount_cents, memo) SELECT * FROM UNNEST({arrays})",
            ([1999, -5], ["first memo", "second memo"]),
        )
        rows = conn.execute(
            "SELECT amount_cents, memo FROM payments ORDER BY id", binary=binary
        ).fetchall()

    assert rows == [(1999, "first memo"), (-5, "second memo")]
    stored = payments.direct("SELECT amount_cents, memo FROM payments ORDER BY id")
    for (amount, memo), plain in zip(stored, ["first memo", "second memo"]):
        assert amount.startswith("pgs:")
        assert bytes(memo).startswith(b"\xffPS")
        assert plain.encode() not in bytes(memo)


# Near misses: rejected before anything is written

NEAR_MISSES = [
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, upper(b) FROM (VALUES (1, 'plain')) v(a, b)"
        ),
        "may only list the columns",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, b FROM (VALUES (1, lower('PLAIN'))) v(a, b)"
        ),
        "can seal only a parameter or a literal",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, b::varchar(8) FROM (VALUES (1, 'plain')) v(a, b)"
        ),
        "with a length",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, b FROM (VALUES (1, 'plain')) v(a, b) WHERE a > 0"
        ),
        "clauses other than FROM and ORDER BY",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, b FROM (VALUES (1, 'plain')) v(a, b) ORDER BY b"
        ),
        "ORDER BY only source columns",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT * FROM UNNEST('{1}'::int[], ARRAY[upper('plain')])"
        ),
        "can seal only a parameter or a literal array",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT * FROM UNNEST('{1}'::int[], string_to_array('plain', ','))"
        ),
        "can seal only a parameter or a literal array",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT * FROM UNNEST('{1}'::int[], '{plain}'::text[]) WITH ORDINALITY"
        ),
        "other than UNNEST",
    ),
    (
        (
            "INSERT INTO oauth_tokens (user_id, access_token) "
            "SELECT a, b FROM (SELECT 1, provider FROM oauth_tokens) v(a, b)"
        ),
        "plain VALUES list",
    ),
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(
    ("sql", "reason"), NEAR_MISSES, ids=[r[1] for r in NEAR_MISSES]
)
def test_near_miss_rejected(
    oauth_proxy: RunningProxy, sql: str, reason: str, protocol: str
) -> None:
    with _connect(oauth_proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql, prepare=False if protocol == "simple" else None)
        # The connection stays usable after the rejection.
        (count,) = conn.execute("SELECT count(*) FROM oauth_tokens").fetchone() or ()

    assert info.value.sqlstate == "0A000"
    assert reason in info.value.diag.message_primary
    assert "oauth_tokens.access_token" in info.value.diag.message_primary
    assert info.value.diag.message_hint
    assert count == 0
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]
