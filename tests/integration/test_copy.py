"""COPY through the proxy, in text, csv and binary, both directions."""

from __future__ import annotations

import csv
import io

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKENS = [
    "gho_copy_token_one_Zq8xLm3Kp9",
    "tab\tand\nnewline\\backslash",
    'comma, "quotes" and ünïcødé',
    "",
]


def _escape_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _connect(proxy: RunningProxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True)


def _check_stored(proxy: RunningProxy) -> None:
    stored = proxy.direct("SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id")
    assert len(stored) == len(TOKENS)
    for (access, refresh), token in zip(stored, TOKENS):
        assert_sealed(access, token)
        assert refresh is None


def _read_back(proxy: RunningProxy) -> list[tuple[str, ...]]:
    with _connect(proxy) as conn:
        rows = conn.execute(
            "SELECT access_token, refresh_token FROM oauth_tokens ORDER BY user_id"
        ).fetchall()
    return rows


def test_copy_in_text_rows(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY oauth_tokens (user_id, access_token, refresh_token) FROM STDIN"
        ) as copy:
            for user_id, token in enumerate(TOKENS):
                copy.write_row((user_id, token, None))
    assert _read_back(oauth_proxy) == [(token, None) for token in TOKENS]
    _check_stored(oauth_proxy)


def test_copy_in_text_split_chunks(oauth_proxy: RunningProxy) -> None:
    data = "".join(
        f"{i}\t{_escape_text(token)}\t\\N\n" for i, token in enumerate(TOKENS)
    ).encode()
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY oauth_tokens (user_id, access_token, refresh_token) FROM STDIN"
        ) as copy:
            for start in range(0, len(data), 7):
                copy.write(data[start : start + 7])
    assert _read_back(oauth_proxy) == [(token, None) for token in TOKENS]
    _check_stored(oauth_proxy)


def test_copy_in_csv_with_header(oauth_proxy: RunningProxy) -> None:
    lines = ["user_id,access_token,refresh_token"]
    for i, token in enumerate(TOKENS):
        quoted = '"' + token.replace('"', '""') + '"'
        lines.append(f"{i},{quoted},")
    data = ("\n".join(lines) + "\n").encode()
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY oauth_tokens (user_id, access_token, refresh_token) "
            "FROM STDIN WITH (FORMAT csv, HEADER true)"
        ) as copy:
            for start in range(0, len(data), 5):
                copy.write(data[start : start + 5])
    assert _read_back(oauth_proxy) == [(token, None) for token in TOKENS]
    _check_stored(oauth_proxy)


def test_copy_in_binary(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY oauth_tokens (user_id, access_token, refresh_token) "
            "FROM STDIN WITH (FORMAT binary)"
        ) as copy:
            copy.set_types(["int4", "text", "text"])
            for user_id, token in enumerate(TOKENS):
                copy.write_row((user_id, token, None))
    assert _read_back(oauth_proxy) == [(token, None) for token in TOKENS]
    _check_stored(oauth_proxy)


def _insert_tokens(proxy: RunningProxy) -> None:
    with _connect(proxy) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO oauth_tokens (user_id, access_token) VALUES (%s, %s)",
                list(enumerate(TOKENS)),
            )


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_out_table(oauth_proxy: RunningProxy, fmt: str) -> None:
    _insert_tokens(oauth_proxy)
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY oauth_tokens (user_id, access_token, refresh_token) "
            f"TO STDOUT WITH (FORMAT {fmt})"
        ) as copy:
            if fmt == "csv":
                # psycopg parses only text and binary COPY, so csv is read raw.
                text = b"".join(bytes(chunk) for chunk in copy).decode()
                rows = sorted(
                    (int(user), access, refresh or None)
                    for user, access, refresh in csv.reader(io.StringIO(text))
                )
            else:
                copy.set_types(["int4", "text", "text"])
                rows = sorted(copy.rows())
    assert rows == [(i, token, None) for i, token in enumerate(TOKENS)]
    _check_stored(oauth_proxy)


def test_copy_out_query(oauth_proxy: RunningProxy) -> None:
    _insert_tokens(oauth_proxy)
    with _connect(oauth_proxy) as conn:
        with conn.cursor().copy(
            "COPY (SELECT access_token, user_id FROM oauth_tokens ORDER BY user_id) "
            "TO STDOUT"
        ) as copy:
            copy.set_types(["text", "int4"])
            rows = list(copy.rows())
    assert rows == [(token, i) for i, token in enumerate(TOKENS)]


def test_copy_from_server_file_rejected(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("COPY oauth_tokens FROM '/tmp/tokens.csv'")
    assert "STDIN" in (info.value.diag.message_hint or "")
    assert oauth_proxy.direct("SELECT count(*) FROM oauth_tokens") == [(0,)]


def test_copy_in_bad_binary_fails_cleanly(oauth_proxy: RunningProxy) -> None:
    with _connect(oauth_proxy) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            with conn.cursor().copy(
                "COPY oauth_tokens (user_id, access_token) FROM STDIN WITH (FORMAT binary)"
            ) as copy:
                copy.write(b"NOTPGCOPY-header-bytes-here")
        assert "pgseal could not seal" in str(info.value)
        (count,) = conn.execute("SELECT count(*) FROM oauth_tokens").fetchone() or ()
    assert count == 0
