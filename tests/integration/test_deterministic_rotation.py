"""Deterministic lookups while a rotated key has several live versions.

Rows are written under version 1, the key is rotated with `pgseal keys
rotate`, and more rows are written under version 2. Lookups by parameter,
literal, IN and ANY must then find the rows of both versions, joins and
grouping are rejected, and after reencrypt and retire everything works on
version 2 alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.cli import main
from proxy.crypto.values import dearmour, read_key_ref
from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

EMAIL = "public.customers.email"
REFRESH = 0.2
RULES = """\
tables:
  - name: public.customers
    columns:
      - name: email
        encryption: deterministic
      - name: token
        encryption: deterministic
        storage: bytea
        type: text
      - name: note
  - name: public.orders
    columns:
      - name: email
        encryption: deterministic
        key: shared_email
  - name: public.invoices
    columns:
      - name: email
        encryption: deterministic
        key: shared_email
"""
TABLES = """
CREATE TABLE customers (
    id integer PRIMARY KEY,
    email text UNIQUE,
    token bytea,
    plan text,
    note text
);
CREATE TABLE orders (id integer PRIMARY KEY, email text);
CREATE TABLE invoices (id integer PRIMARY KEY, email text);
"""
OLD = {1: "ada@example.com", 2: "bob@example.com"}
NEW = {3: "cy@example.com", 4: "dee@example.com"}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "customers.yaml").write_text(RULES)
    return folder


@pytest.fixture
def customers(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    rules_dir: Path,
) -> RunningProxy:
    with psycopg.connect(pg_cluster.dsn(fresh_db), autocommit=True) as conn:
        conn.execute(TABLES)
    return start_proxy(fresh_db, rules_dir, key_refresh_seconds=REFRESH)


@pytest.fixture
def rotated(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> Iterator[RunningProxy]:
    """Rows 1-2 under version 1 of the email key, rows 3-4 under version 2."""
    insert_rows(customers, OLD)
    rotate(customers, capsys, "--column", EMAIL)
    insert_rows(customers, NEW)
    yield customers


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def connection(running: RunningProxy) -> list[str]:
    return ["--upstream", running.direct_dsn(), "--keyring", f"sodium:{running.keydir}"]


def live_versions(running: RunningProxy, key_name: str) -> int:
    return len(running.proxy._cache.live_refs(key_name))


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def rotate(
    running: RunningProxy, capsys: pytest.CaptureFixture[str], *target: str
) -> None:
    """Run `pgseal keys rotate` and wait until the proxy loads the new version."""
    key_name = target[-1] if target[0] == "--column" else f"key:{target[-1]}"
    code, _, err = cli(capsys, "keys", "rotate", *connection(running), *target)
    assert code == 0, err
    wait_until(lambda: live_versions(running, key_name) == 2)


def finish_rotation(
    running: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    """Run reencrypt and retire, then wait until the proxy has one live version."""
    code, _, err = cli(
        capsys, "reencrypt", *connection(running), "--rules", str(rules_dir),
        "--table", "public.customers", "--no-progress", "--settle-seconds", "0",
    )
    assert code == 0, err
    code, _, err = cli(
        capsys, "keys", "retire", *connection(running), "--rules", str(rules_dir),
        "--column", EMAIL,
    )
    assert code == 0, err
    wait_until(lambda: live_versions(running, EMAIL) == 1)


def insert_rows(running: RunningProxy, rows: dict[int, str]) -> None:
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        for row_id, email in rows.items():
            conn.execute(
                "INSERT INTO customers (id, email, token, plan) VALUES (%s, %s, %s, 'pro')",
                (row_id, email, "tok-" + email),
            )


def stored_version(running: RunningProxy, row_id: int) -> int:
    """Read row_id's stored email directly, check it is sealed, and return its version."""
    ((value,),) = running.direct("SELECT email FROM customers WHERE id = %s", (row_id,))
    assert_sealed(value, (OLD | NEW)[row_id])
    return read_key_ref(dearmour(value.encode("ascii")))[1]


def ids(rows: list[tuple[object, ...]]) -> list[object]:
    return sorted(row[0] for row in rows)  # type: ignore[type-var]


def test_rows_sealed_under_both_versions(rotated: RunningProxy) -> None:
    assert [stored_version(rotated, row_id) for row_id in (1, 2, 3, 4)] == [1, 1, 2, 2]


@pytest.mark.parametrize("placeholder", ["%s", "%b"], ids=["text", "binary"])
def test_parameter_finds_every_version(rotated: RunningProxy, placeholder: str) -> None:
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        found = {
            email: conn.execute(
                f"SELECT id, email FROM customers WHERE email = {placeholder}", (email,)
            ).fetchall()
            for email in (OLD | NEW).values()
        }
        others = conn.execute(
            f"SELECT id FROM customers WHERE email <> {placeholder}", (OLD[1],)
        ).fetchall()
        cast = conn.execute(
            f"SELECT id FROM customers WHERE email = {placeholder}::varchar", (OLD[2],)
        ).fetchall()
    for row_id, email in (OLD | NEW).items():
        assert found[email] == [(row_id, email)]
    assert ids(others) == [2, 3, 4]
    assert cast == [(2,)]
    assert stored_version(rotated, 1) == 1
    assert stored_version(rotated, 3) == 2


def test_literal_and_in_find_every_version(rotated: RunningProxy) -> None:
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        old = conn.execute(
            "SELECT id FROM customers WHERE email = 'ada@example.com'"
        ).fetchall()
        new = conn.execute(
            "SELECT id FROM customers WHERE email = 'cy@example.com'::text"
        ).fetchall()
        listed = conn.execute(
            "SELECT id FROM customers WHERE email IN ('ada@example.com', %s)",
            ("dee@example.com",),
        ).fetchall()
        not_listed = conn.execute(
            "SELECT id FROM customers WHERE email NOT IN ('bob@example.com', %s)",
            ("cy@example.com",),
        ).fetchall()
        not_equal = conn.execute(
            "SELECT id FROM customers WHERE email <> 'dee@example.com'"
        ).fetchall()
        reversed_literal = conn.execute(
            "SELECT id FROM customers WHERE 'ada@example.com' = customers.email"
        ).fetchall()
        reversed_parameter = conn.execute(
            "SELECT id FROM customers WHERE %s = email", (NEW[4],)
        ).fetchall()
    assert old == [(1,)]
    assert new == [(3,)]
    assert ids(listed) == [1, 4]
    assert ids(not_listed) == [1, 4]
    assert ids(not_equal) == [1, 2, 3]
    assert reversed_literal == [(1,)]
    assert reversed_parameter == [(4,)]
    assert stored_version(rotated, 4) == 2


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_any_array_finds_every_version(rotated: RunningProxy, binary: bool) -> None:
    emails = [OLD[1], NEW[3], "nobody@example.com"]
    placeholder = "%b" if binary else "%s"
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        found = conn.execute(
            f"SELECT id FROM customers WHERE email = ANY({placeholder})", (emails,)
        ).fetchall()
        others = conn.execute(
            f"SELECT id FROM customers WHERE email <> ALL({placeholder}::text[])",
            (emails,),
        ).fetchall()
    assert ids(found) == [1, 3]
    assert ids(others) == [2, 4]
    assert stored_version(rotated, 1) == 1
    assert stored_version(rotated, 3) == 2


def test_simple_protocol_finds_every_version(rotated: RunningProxy) -> None:
    async def run() -> tuple[str, str]:
        conn = await asyncpg.connect(rotated.dsn(), ssl=False)
        try:
            # execute() without arguments sends a simple Query message.
            old = await conn.execute(
                "UPDATE customers SET plan = 'team' WHERE email = 'bob@example.com'"
            )
            new = await conn.execute(
                "UPDATE customers SET plan = 'team' "
                "WHERE email IN ('dee@example.com', 'nobody@example.com')"
            )
            return old, new
        finally:
            await conn.close()

    assert rotated.run(run()) == ("UPDATE 1", "UPDATE 1")
    plans = rotated.direct("SELECT id, plan FROM customers ORDER BY id")
    assert plans == [(1, "pro"), (2, "team"), (3, "pro"), (4, "team")]
    assert stored_version(rotated, 2) == 1
    assert stored_version(rotated, 4) == 2


def test_asyncpg_finds_every_version(rotated: RunningProxy) -> None:
    async def run() -> tuple[list[int], list[int], list[int]]:
        conn = await asyncpg.connect(rotated.dsn(), ssl=False)
        try:
            single = [
                row["id"]
                for email in (OLD[1], NEW[4])
                for row in await conn.fetch(
                    "SELECT id FROM customers WHERE email = $1", email
                )
            ]
            many = await conn.fetch(
                "SELECT id FROM customers WHERE email = ANY($1)", [OLD[2], NEW[3]]
            )
            listed = await conn.fetch(
                "SELECT id FROM customers WHERE email IN ($1, $2)", OLD[1], NEW[3]
            )
            return single, [row["id"] for row in many], [row["id"] for row in listed]
        finally:
            await conn.close()

    single, many, listed = rotated.run(run())
    assert single == [1, 4]
    assert sorted(many) == [2, 3]
    assert sorted(listed) == [1, 3]
    assert [stored_version(rotated, row_id) for row_id in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_prepared_before_rotation_sees_new_version(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert_rows(customers, OLD)
    query = "SELECT id FROM customers WHERE email = %s"
    literal = "SELECT id FROM customers WHERE email IN ('dee@example.com', %s)"
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        # prepare=True makes psycopg send a named Parse once and reuse it.
        assert conn.execute(query, (OLD[1],), prepare=True).fetchall() == [(1,)]
        assert conn.execute(literal, (OLD[2],), prepare=True).fetchall() == [(2,)]

        rotate(customers, capsys, "--column", EMAIL)
        insert_rows(customers, NEW)
        during = [
            conn.execute(query, (email,), prepare=True).fetchall()
            for email in (OLD[1], NEW[3])
        ]
        during_literal = conn.execute(literal, (OLD[2],), prepare=True).fetchall()

        finish_rotation(customers, capsys, rules_dir)
        after = [
            conn.execute(query, (email,), prepare=True).fetchall()
            for email in (OLD[1], NEW[3])
        ]
        after_literal = conn.execute(literal, (OLD[2],), prepare=True).fetchall()
    assert during == [[(1,)], [(3,)]]
    assert ids(during_literal) == [2, 4]
    assert after == [[(1,)], [(3,)]]
    assert ids(after_literal) == [2, 4]
    assert [stored_version(customers, row_id) for row_id in (1, 2, 3, 4)] == [2, 2, 2, 2]


def test_asyncpg_prepared_across_rotation(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert_rows(customers, OLD)
    conn = customers.run(asyncpg.connect(customers.dsn(), ssl=False))
    try:
        statement = customers.run(
            conn.prepare("SELECT id FROM customers WHERE email = $1")
        )
        before = customers.run(statement.fetchval(OLD[1]))
        rotate(customers, capsys, "--column", EMAIL)
        insert_rows(customers, NEW)
        during = [customers.run(statement.fetchval(e)) for e in (OLD[2], NEW[4])]
        finish_rotation(customers, capsys, rules_dir)
        after = [customers.run(statement.fetchval(e)) for e in (OLD[2], NEW[4])]
    finally:
        customers.run(conn.close())
    assert before == 1
    assert during == [2, 4]
    assert after == [2, 4]
    assert [stored_version(customers, row_id) for row_id in (2, 4)] == [2, 2]


def test_hidden_literal_beside_lookup(rotated: RunningProxy) -> None:
    # The randomized literal becomes a hidden parameter whose text is shorter
    # than the literal, so the lookup rewritten after it must be moved too.
    statements = [
        ("UPDATE customers SET note = 'vip customer' WHERE email = %s", (OLD[1],)),
        (
            (
                "UPDATE customers SET note = 'gold customer' "
                "WHERE email IN ('bob@example.com', %s)"
            ),
            (NEW[4],),
        ),
        ("UPDATE customers SET note = 'new customer' WHERE 'cy@example.com' = email", ()),
    ]
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        counts = [
            conn.execute(sql, params or None, prepare=True).rowcount
            for sql, params in statements
        ]
        notes = conn.execute("SELECT id, note FROM customers ORDER BY id").fetchall()
    assert counts == [1, 2, 1]
    assert notes == [
        (1, "vip customer"),
        (2, "gold customer"),
        (3, "new customer"),
        (4, "gold customer"),
    ]
    stored = rotated.direct("SELECT id, note FROM customers ORDER BY id")
    for (_, value), (_, plaintext) in zip(stored, notes):
        assert_sealed(value, plaintext)
    assert [stored_version(rotated, row_id) for row_id in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_prepared_hidden_literal_across_rotation(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    # Parsed again after the rotation, the statement keeps its hidden
    # parameter for the randomized literal.
    insert_rows(customers, OLD)
    update = "UPDATE customers SET note = 'seen by support' WHERE email = %s"
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        before = conn.execute(update, (OLD[1],), prepare=True).rowcount
        rotate(customers, capsys, "--column", EMAIL)
        insert_rows(customers, NEW)
        during = [
            conn.execute(update, (email,), prepare=True).rowcount
            for email in (OLD[2], NEW[3])
        ]
        notes = conn.execute("SELECT id, note FROM customers ORDER BY id").fetchall()
    assert before == 1
    assert during == [1, 1]
    assert notes == [
        (1, "seen by support"),
        (2, "seen by support"),
        (3, "seen by support"),
        (4, None),
    ]
    stored = customers.direct("SELECT note FROM customers WHERE id <= 3 ORDER BY id")
    for (value,) in stored:
        assert_sealed(value, "seen by support")
    assert len({value for (value,) in stored}) == 3


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_batch_insert_keeps_one_row_each(rotated: RunningProxy, binary: bool) -> None:
    # An array stored by a batch INSERT keeps one sealed element per row,
    # unlike an array compared with ANY.
    placeholder = "%b" if binary else "%s"
    batch = {5: "eve@example.com", 6: "fay@example.com"}
    literal = {7: "gus@example.com", 8: "hal@example.com"}
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, email) "
            f"SELECT * FROM UNNEST({placeholder}::int[], {placeholder}::text[])",
            (list(batch), list(batch.values())),
        )
        conn.execute(
            "INSERT INTO customers (id, email) SELECT * FROM "
            "UNNEST('{7,8}'::int[], '{gus@example.com,hal@example.com}'::text[])"
        )
        found = conn.execute(
            "SELECT id FROM customers WHERE email = ANY(%s)",
            ([*batch.values(), *literal.values(), OLD[1]],),
        ).fetchall()
    assert ids(found) == [1, 5, 6, 7, 8]
    stored = rotated.direct("SELECT id, email FROM customers WHERE id >= 5 ORDER BY id")
    assert [row[0] for row in stored] == [5, 6, 7, 8]
    for row_id, value in stored:
        assert_sealed(value, (batch | literal)[row_id])
        assert read_key_ref(dearmour(value.encode("ascii")))[1] == 2


def test_writes_seal_under_newest_version(rotated: RunningProxy) -> None:
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE customers SET email = %s WHERE id = 1", ("ann@example.com",))
        conn.execute("UPDATE customers SET email = 'bea@example.com' WHERE id = 2")
    stored = rotated.direct("SELECT id, email FROM customers WHERE id <= 2 ORDER BY id")
    for (_, value), plaintext in zip(stored, ["ann@example.com", "bea@example.com"]):
        assert_sealed(value, plaintext)
        assert read_key_ref(dearmour(value.encode("ascii")))[1] == 2


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email, count(*) FROM customers GROUP BY email",
        "SELECT DISTINCT email FROM customers",
        "SELECT count(DISTINCT email) FROM customers",
        "SELECT a.id FROM customers a JOIN customers b ON a.email = b.email",
        (
            "UPDATE customers SET plan = 'x' WHERE id IN "
            "(SELECT min(id) FROM customers GROUP BY email)"
        ),
    ],
    ids=["group-by", "distinct", "count-distinct", "self-join", "update"],
)
def test_window_rejects_version_sensitive(rotated: RunningProxy, sql: str) -> None:
    before = rotated.direct("SELECT id, email, plan FROM customers ORDER BY id")
    with (
        psycopg.connect(rotated.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.FeatureNotSupported) as info,
    ):
        conn.execute(sql)
    assert EMAIL in str(info.value)
    assert "2 data key versions" in str(info.value)
    assert "pgseal reencrypt" in (info.value.diag.message_hint or "")
    assert rotated.direct("SELECT id, email, plan FROM customers ORDER BY id") == before


def test_window_rejects_parameter_stored_and_compared(rotated: RunningProxy) -> None:
    before = rotated.direct("SELECT id, email FROM customers ORDER BY id")

    async def run() -> None:
        conn = await asyncpg.connect(rotated.dsn(), ssl=False)
        try:
            await conn.execute("UPDATE customers SET email = $1 WHERE email = $1", OLD[1])
        finally:
            await conn.close()

    with pytest.raises(asyncpg.FeatureNotSupportedError) as info:
        rotated.run(run())
    assert "parameter $1" in str(info.value)
    assert rotated.direct("SELECT id, email FROM customers ORDER BY id") == before


def test_shared_key_join_rejected(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    join = "SELECT o.id, i.id FROM orders o JOIN invoices i ON o.email = i.email"
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO orders VALUES (1, %s)", (OLD[1],))
        rotate(customers, capsys, "--key", "shared_email")
        conn.execute("INSERT INTO invoices VALUES (7, %s)", (OLD[1],))
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(join)
        using = "SELECT id FROM orders JOIN invoices USING (email)"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(using)
        lookups = [
            conn.execute(f"SELECT id FROM {table} WHERE email = %s", (OLD[1],)).fetchall()
            for table in ("orders", "invoices")
        ]
    assert "public.orders.email" in str(info.value)
    assert lookups == [[(1,)], [(7,)]]
    ((order,), (invoice,)) = customers.direct(
        "SELECT email FROM orders UNION ALL SELECT email FROM invoices"
    )
    assert_sealed(order, OLD[1])
    assert_sealed(invoice, OLD[1])
    assert read_key_ref(dearmour(order.encode("ascii")))[1] == 1
    assert read_key_ref(dearmour(invoice.encode("ascii")))[1] == 2


def test_bytea_column_finds_every_version(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "public.customers.token"
    insert_rows(customers, OLD)
    rotate(customers, capsys, "--column", token)
    insert_rows(customers, NEW)
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        found = [
            conn.execute(
                f"SELECT id FROM customers WHERE token = {placeholder}", ("tok-" + email,)
            ).fetchall()
            for placeholder in ("%s", "%b")
            for email in (OLD[1], NEW[3])
        ]
        literal = conn.execute(
            "SELECT id FROM customers WHERE token IN ('tok-bob@example.com', "
            "'tok-dee@example.com')"
        ).fetchall()
    assert found == [[(1,)], [(3,)], [(1,)], [(3,)]]
    assert ids(literal) == [2, 4]
    stored = customers.direct("SELECT id, token FROM customers ORDER BY id")
    versions = [read_key_ref(bytes(value))[1] for _, value in stored]
    assert versions == [1, 1, 2, 2]
    assert all(b"tok-" not in bytes(value) for _, value in stored)


def test_unique_holds_per_version_only(rotated: RunningProxy) -> None:
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        # ada@example.com is stored under version 1, so the unique index
        # does not see the same address sealed under version 2.
        conn.execute("INSERT INTO customers (id, email) VALUES (5, %s)", (OLD[1],))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO customers (id, email) VALUES (6, %s)", (NEW[3],))
        both = conn.execute(
            "SELECT id FROM customers WHERE email = %s", (OLD[1],)
        ).fetchall()
        # ON CONFLICT (email) does not see bob's version-1 row, so it inserts.
        conn.execute(
            "INSERT INTO customers (id, email, plan) VALUES (7, %s, 'team') "
            "ON CONFLICT (email) DO UPDATE SET plan = EXCLUDED.plan",
            (OLD[2],),
        )
    assert ids(both) == [1, 5]
    assert rotated.direct("SELECT count(*) FROM customers WHERE id = 6") == [(0,)]
    assert rotated.direct("SELECT id, plan FROM customers WHERE id IN (2, 7)") == [
        (2, "pro"),
        (7, "team"),
    ]


def test_sql_prepare_rejected_in_window(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert_rows(customers, OLD)
    with psycopg.connect(customers.dsn(), autocommit=True) as conn:
        conn.execute("PREPARE before AS SELECT id FROM customers WHERE email = $1")
        conn.execute("PREPARE fixed AS SELECT id FROM customers WHERE email = 'ada@example.com'")
        rotate(customers, capsys, "--column", EMAIL)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as window:
            conn.execute("PREPARE during AS SELECT id FROM customers WHERE email = $1")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as execute:
            conn.execute("EXECUTE before('bob@example.com')")
        finish_rotation(customers, capsys, rules_dir)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as stale:
            conn.execute("EXECUTE fixed")
        conn.execute("DEALLOCATE fixed")
        conn.execute("PREPARE fixed AS SELECT id FROM customers WHERE email = 'ada@example.com'")
        again = conn.execute("EXECUTE fixed").fetchall()
        during = conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name = 'during'"
        ).fetchall()
    assert "2 data key versions" in str(window.value)
    assert "2 data key versions" in str(execute.value)
    assert "DEALLOCATE fixed" in (stale.value.diag.message_hint or "")
    assert again == [(1,)]
    assert during == []
    assert stored_version(customers, 1) == 2


def test_lookups_after_reencrypt_and_retire(
    rotated: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    finish_rotation(rotated, capsys, rules_dir)
    with psycopg.connect(rotated.dsn(), autocommit=True) as conn:
        found = [
            conn.execute("SELECT id FROM customers WHERE email = %s", (email,)).fetchall()
            for email in (OLD[1], NEW[4])
        ]
        literal = conn.execute(
            "SELECT id FROM customers WHERE email IN ('bob@example.com', 'cy@example.com')"
        ).fetchall()
        groups = conn.execute(
            "SELECT email, count(*) FROM customers GROUP BY email"
        ).fetchall()
    assert found == [[(1,)], [(4,)]]
    assert ids(literal) == [2, 3]
    assert sorted(groups) == sorted((email, 1) for email in (OLD | NEW).values())
    assert [stored_version(rotated, row_id) for row_id in (1, 2, 3, 4)] == [2, 2, 2, 2]


def test_reencrypt_waits_for_new_version(
    rotated: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    # Proxies that have not loaded the new version yet would miss the rows
    # moved to it, so reencrypt waits until the version is old enough.
    started = time.monotonic()
    code, _, err = cli(
        capsys, "reencrypt", *connection(rotated), "--rules", str(rules_dir),
        "--table", "public.customers", "--no-progress", "--settle-seconds", "3",
    )
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert "waiting" in err
    assert "--settle-seconds" in err
    assert EMAIL in err
    assert elapsed >= 2.0
    assert [stored_version(rotated, row_id) for row_id in (1, 2, 3, 4)] == [2, 2, 2, 2]


def test_reencrypt_without_rotation_does_not_wait(
    customers: RunningProxy, capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    insert_rows(customers, OLD)
    code, _, err = cli(
        capsys, "reencrypt", *connection(customers), "--rules", str(rules_dir),
        "--table", "public.customers", "--no-progress", "--settle-seconds", "600",
    )
    assert code == 0, err
    assert "waiting" not in err
