"""One Bind with 65,535 parameters, the protocol's maximum, through the proxy.

Bind and Parse count their parameters in an unsigned 16-bit integer, and
libpq sends at most 65,535. Two of every three parameters here go to
encrypted columns, so the proxy seals 43,690 values in one message.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

MAX_PARAMETERS = 65535
COLUMNS = 3
ROWS = MAX_PARAMETERS // COLUMNS


def token(kind: str, row: int) -> str:
    return f"gho_{kind}_{row:05d}_" + "Kq7" * 8


@pytest.mark.slow
def test_insert_max_parameters(oauth_proxy: RunningProxy) -> None:
    values = ", ".join(["(%s, %s, %s)"] * ROWS)
    params: list[object] = []
    for row in range(ROWS):
        params.extend((row, token("access", row), token("refresh", row)))
    with psycopg.connect(oauth_proxy.dsn(), autocommit=True) as conn:
        cursor = conn.execute(
            "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) "
            f"VALUES {values}",
            params,
        )
        inserted = cursor.rowcount
        read = conn.execute(
            "SELECT user_id, access_token, refresh_token FROM oauth_tokens "
            "ORDER BY user_id"
        ).fetchall()
    assert len(params) == MAX_PARAMETERS
    assert inserted == ROWS
    assert read == [
        (row, token("access", row), token("refresh", row)) for row in range(ROWS)
    ]

    stored = oauth_proxy.direct(
        "SELECT user_id, access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
    )
    assert len(stored) == ROWS
    for user_id, access, refresh in stored:
        assert_sealed(access, token("access", user_id))
        assert_sealed(refresh, token("refresh", user_id))
