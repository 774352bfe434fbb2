"""Django ORM and migrations through the proxy.

The proxy checks its rules against existing tables when it starts, so the
first migration runs directly on the server; the second runs through the
proxy, and so do all ORM operations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import NotSupportedError, connections

from tests.fixtures.postgres import PgServer
from tests.fixtures.proxy import RunningProxy
from tests.integration.sealing import assert_sealed

TOKEN = "gho_django_" + "Vb6nM" * 8
PROXY_ALIAS = "default"
DIRECT_ALIAS = "direct"


def _database(**options: Any) -> dict[str, Any]:
    # HOST, PORT, NAME and the login are filled in for each test.
    return {"ENGINE": "django.db.backends.postgresql", "OPTIONS": options}


def _configure_django() -> None:
    if settings.configured:
        return
    settings.configure(
        INSTALLED_APPS=["tests.compat.django_app"],
        DATABASES={
            PROXY_ALIAS: _database(sslmode="disable"),
            DIRECT_ALIAS: _database(sslmode="disable"),
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
    )
    django.setup()


def _point(
    alias: str,
    host: str,
    port: int,
    server: PgServer,
    database: str,
    server_side_binding: bool = False,
) -> None:
    """Point a database alias at a host and port, dropping its old connection."""
    connections[alias].close()
    del connections[alias]
    connections.settings[alias].update(
        HOST=host,
        PORT=str(port),
        NAME=database,
        USER=server.superuser,
        PASSWORD=server.password,
    )
    connections.settings[alias]["OPTIONS"]["server_side_binding"] = server_side_binding


@pytest.fixture
def django_proxy(
    fresh_db: str,
    pg_cluster: PgServer,
    start_proxy: Callable[..., RunningProxy],
    request: pytest.FixtureRequest,
) -> Iterator[RunningProxy]:
    """A proxy over a database migrated to 0001 directly, then to 0002 through it."""
    _configure_django()
    binding = bool(getattr(request, "param", False))
    _point(DIRECT_ALIAS, pg_cluster.host, pg_cluster.port, pg_cluster, fresh_db)
    call_command("migrate", "django_app", "0001", database=DIRECT_ALIAS, verbosity=0)
    connections[DIRECT_ALIAS].close()

    proxy = start_proxy(fresh_db)
    _point(PROXY_ALIAS, "127.0.0.1", proxy.port, pg_cluster, fresh_db, binding)
    call_command("migrate", "django_app", database=PROXY_ALIAS, verbosity=0)
    try:
        yield proxy
    finally:
        for alias in (PROXY_ALIAS, DIRECT_ALIAS):
            connections[alias].close()


def _token(user_id: int) -> str:
    return f"{TOKEN}-{user_id}"


def _assert_stored(proxy: RunningProxy, user_ids: list[int]) -> None:
    stored = proxy.direct(
        "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id"
    )
    assert [user_id for user_id, _ in stored] == user_ids
    for user_id, access in stored:
        assert_sealed(access, _token(user_id))


BINDINGS = pytest.mark.parametrize(
    "django_proxy",
    [False, True],
    ids=["client-binding", "server-binding"],
    indirect=True,
)


@BINDINGS
def test_migrations_applied(django_proxy: RunningProxy) -> None:
    applied = django_proxy.direct(
        "SELECT name FROM django_migrations WHERE app = 'django_app' ORDER BY id"
    )
    columns = django_proxy.direct(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'oauth_tokens' AND column_name = 'scopes'"
    )

    assert applied == [("0001_initial",), ("0002_oauthtoken_scopes",)]
    assert columns == [("scopes",)]


@BINDINGS
def test_create_and_read(django_proxy: RunningProxy) -> None:
    from tests.compat.django_app.models import OAuthToken

    created = OAuthToken.objects.create(
        user_id=1, access_token=_token(1), refresh_token="refresh-1", scopes="repo"
    )
    for user_id in range(2, 6):
        OAuthToken.objects.create(user_id=user_id, access_token=_token(user_id))
    first = OAuthToken.objects.get(pk=created.pk)
    later = list(
        OAuthToken.objects.filter(user_id__gte=3)
        .order_by("user_id")
        .values_list("user_id", "access_token")
    )

    assert created.pk is not None
    assert (first.access_token, first.refresh_token, first.scopes) == (
        _token(1),
        "refresh-1",
        "repo",
    )
    assert first.provider == "github"
    assert later == [(i, _token(i)) for i in range(3, 6)]
    _assert_stored(django_proxy, list(range(1, 6)))
    ((refresh,),) = django_proxy.direct(
        "SELECT refresh_token FROM oauth_tokens WHERE user_id = 1"
    )
    assert_sealed(refresh, "refresh-1")


@BINDINGS
def test_bulk_create_unnest(django_proxy: RunningProxy) -> None:
    from tests.compat.django_app.models import OAuthToken

    created = OAuthToken.objects.bulk_create(
        [OAuthToken(user_id=i, access_token=_token(i)) for i in range(4)]
    )

    assert all(token.pk is not None for token in created)
    read = list(OAuthToken.objects.order_by("user_id").values_list("access_token"))
    assert read == [(_token(i),) for i in range(4)]
    _assert_stored(django_proxy, list(range(4)))


@BINDINGS
def test_bulk_create_one_row_batches(django_proxy: RunningProxy) -> None:
    from tests.compat.django_app.models import OAuthToken

    # With one row per batch Django sends INSERT ... VALUES, which is sealed.
    OAuthToken.objects.bulk_create(
        [OAuthToken(user_id=i, access_token=_token(i)) for i in range(4)],
        batch_size=1,
    )

    read = list(OAuthToken.objects.order_by("user_id").values_list("access_token"))
    assert read == [(_token(i),) for i in range(4)]
    _assert_stored(django_proxy, list(range(4)))


@BINDINGS
def test_update_and_save(django_proxy: RunningProxy) -> None:
    from tests.compat.django_app.models import OAuthToken

    OAuthToken.objects.create(user_id=1, access_token="old-token")
    OAuthToken.objects.filter(user_id=1).update(access_token=_token(1))
    token = OAuthToken.objects.get(user_id=1)
    token.refresh_token = "refresh-saved"
    token.save()

    again = OAuthToken.objects.get(user_id=1)
    assert (again.access_token, again.refresh_token) == (_token(1), "refresh-saved")
    _assert_stored(django_proxy, [1])


@BINDINGS
def test_filter_on_encrypted_column_rejected(django_proxy: RunningProxy) -> None:
    from tests.compat.django_app.models import OAuthToken

    OAuthToken.objects.create(user_id=1, access_token=_token(1))

    # Equality on a randomized column cannot work on ciphertext.
    with pytest.raises(NotSupportedError) as rejected:
        OAuthToken.objects.filter(access_token=_token(1)).count()

    assert "access_token" in str(rejected.value)
    assert OAuthToken.objects.filter(user_id=1).count() == 1
