"""SQLAlchemy 2 core and ORM through the proxy, with psycopg and asyncpg."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, String, create_engine, insert, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_sqlalchemy_" + "Pk2mN" * 8


class Base(DeclarativeBase):
    pass


class OAuthToken(Base):
    __tablename__ = "oauth_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int]
    provider: Mapped[str] = mapped_column(String, server_default="github")
    access_token: Mapped[str | None]
    refresh_token: Mapped[str | None]


def _token(user_id: int) -> str:
    return f"{TOKEN}-{user_id}"


def _url(proxy: RunningProxy, driver: str) -> str:
    return proxy.dsn().replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture
def engine(oauth_proxy: RunningProxy) -> Iterator[Engine]:
    engine = create_engine(_url(oauth_proxy, "psycopg"))
    yield engine
    engine.dispose()


def _assert_stored(proxy: RunningProxy, user_ids: list[int]) -> None:
    stored = proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _ in stored] == user_ids
    for user_id, access in stored:
        assert_sealed(access, _token(user_id))


def test_core_insert_and_select(oauth_proxy: RunningProxy, engine: Engine) -> None:
    table = Base.metadata.tables["oauth_tokens"]
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [{"user_id": i, "access_token": _token(i)} for i in range(5)],
        )
        returned = conn.execute(
            insert(table)
            .values(user_id=5, access_token=_token(5))
            .returning(table.c.access_token)
        ).scalar_one()
        conn.execute(
            update(table).where(table.c.user_id == 0).values(refresh_token="refresh-0")
        )
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                table.c.user_id, table.c.access_token, table.c.refresh_token
            ).order_by(table.c.user_id)
        ).all()
        raw = conn.execute(
            text("SELECT access_token FROM oauth_tokens WHERE user_id = :id"), {"id": 3}
        ).scalar_one()

    assert returned == _token(5)
    assert [tuple(row) for row in rows] == [
        (i, _token(i), "refresh-0" if i == 0 else None) for i in range(6)
    ]
    assert raw == _token(3)
    _assert_stored(oauth_proxy, list(range(6)))


def test_orm_add_commit_query(oauth_proxy: RunningProxy, engine: Engine) -> None:
    with Session(engine) as session:
        session.add(OAuthToken(user_id=1, access_token=_token(1)))
        session.commit()
        # The session reads the generated id and the server default back.
        first = session.scalars(select(OAuthToken)).one()
        assert first.provider == "github"

    with Session(engine) as session:
        found = session.scalars(select(OAuthToken).filter_by(user_id=1)).one()
        found.refresh_token = "refresh-1"
        session.commit()

    with Session(engine) as session:
        again = session.get(OAuthToken, first.id)
    assert again is not None
    assert again.access_token == _token(1)
    assert again.refresh_token == "refresh-1"
    _assert_stored(oauth_proxy, [1])
    ((refresh,),) = oauth_proxy.direct("SELECT refresh_token FROM oauth_tokens")
    assert_sealed(refresh, "refresh-1")


def _add_all_and_query(proxy: RunningProxy, engine: Engine) -> None:
    with Session(engine) as session:
        tokens = [OAuthToken(user_id=i, access_token=_token(i)) for i in range(10)]
        session.add_all(tokens)
        session.commit()
        ids = [token.id for token in tokens]

    with Session(engine) as session:
        found = session.scalars(
            select(OAuthToken).where(OAuthToken.user_id >= 5).order_by(OAuthToken.id)
        ).all()
    assert len(set(ids)) == 10
    assert [(token.user_id, token.access_token) for token in found] == [
        (i, _token(i)) for i in range(5, 10)
    ]
    _assert_stored(proxy, list(range(10)))


def test_orm_add_all_insertmanyvalues(
    oauth_proxy: RunningProxy, engine: Engine
) -> None:
    _add_all_and_query(oauth_proxy, engine)


def test_orm_add_all_row_by_row(oauth_proxy: RunningProxy) -> None:
    # Without insertmanyvalues SQLAlchemy sends one INSERT ... VALUES per
    # object, which the proxy seals.
    engine = create_engine(_url(oauth_proxy, "psycopg"), use_insertmanyvalues=False)
    try:
        _add_all_and_query(oauth_proxy, engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("batched", [False, True], ids=["row-by-row", "insertmanyvalues"])
async def test_orm_asyncpg(oauth_proxy: RunningProxy, batched: bool) -> None:
    engine = create_async_engine(
        _url(oauth_proxy, "asyncpg"),
        connect_args={"ssl": False},
        use_insertmanyvalues=batched,
    )
    sessions = async_sessionmaker(engine)
    try:
        async with sessions() as session:
            session.add(OAuthToken(user_id=1, access_token=_token(1)))
            session.add(OAuthToken(user_id=2, access_token=_token(2)))
            await session.commit()
        async with sessions() as session:
            result = await session.scalars(select(OAuthToken).filter_by(user_id=2))
            found = result.one()
    finally:
        await engine.dispose()

    assert found.access_token == _token(2)
    assert found.provider == "github"
    _assert_stored(oauth_proxy, [1, 2])
