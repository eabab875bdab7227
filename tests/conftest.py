"""Fixtures: a real redis-server on a free port, both stores, and apps wired to them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from support import RedisServer, release
from timeline.embedded import redis_server_binary
from timeline.factory import create_app
from timeline.settings import Settings
from timeline.store import Store
from timeline.store.mongo import MongoStore
from timeline.store.sqlite import SQLiteStore


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Redis: TIMELINE_TEST_REDIS_URL, else a redis-server started here."""
    external = os.environ.get("TIMELINE_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra redis-servers a test may kill and restart."""
    servers: list[RedisServer] = []

    def make(port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", port).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A key namespace of the test's own, so tests share a Redis without seeing each other."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --- MongoDB: real when given, testcontainers when Docker answers, else mongomock ---------

_mongo: dict[str, Any] = {}


def _mongomock_takes_pymongo_s_bulk_updates() -> None:
    """pymongo 4.11 added `sort` to UpdateOne, and passes it to the bulk builder of the
    collection it runs on; mongomock 4.3's builder predates it (TypeError). The store's
    purge raises floors with one bulk_write of UpdateOne: on mongomock, without a sort (the
    store never gives one), the builder is called as it expects."""
    import mongomock.collection

    builder = mongomock.collection.BulkOperationBuilder
    add_update = builder.add_update
    if "sort" in add_update.__code__.co_varnames:
        return

    def without_sort(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        assert sort is None, "mongomock cannot sort a bulk update"
        return add_update(self, *args, **kwargs)

    builder.add_update = without_sort


_mongomock_takes_pymongo_s_bulk_updates()


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def mongo_mode() -> str:
    """Which MongoDB the suite uses; decided once per session."""
    if "mode" not in _mongo:
        if os.environ.get("TIMELINE_TEST_MONGO_URI"):
            _mongo["mode"] = "real"
        elif _docker_answers():
            _mongo["mode"] = "testcontainers"
        else:
            _mongo["mode"] = "mongomock"
    return str(_mongo["mode"])


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = mongo_mode()
    detail = {
        "real": "a real server from TIMELINE_TEST_MONGO_URI",
        "testcontainers": "a testcontainers mongo:7 container",
        "mongomock": "mongomock (no TIMELINE_TEST_MONGO_URI and no Docker engine)",
    }[mode]
    redis_source = os.environ.get("TIMELINE_TEST_REDIS_URL") or f"{redis_server_binary()} (own)"
    return [f"timeline: MongoDB tests use {detail}", f"timeline: Redis is {redis_source}"]


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str | None]:
    """A MongoDB URI for real servers; None when the suite runs on mongomock."""
    mode = mongo_mode()
    if mode == "real":
        yield os.environ["TIMELINE_TEST_MONGO_URI"]
    elif mode == "testcontainers":
        from testcontainers.mongodb import MongoDbContainer

        with MongoDbContainer("mongo:7") as container:
            yield container.get_connection_url()
    else:
        yield None


@pytest.fixture
def mongo_store(mongo_uri: str | None) -> Iterator[MongoStore]:
    database_name = f"timeline_test_{uuid.uuid4().hex[:12]}"
    if mongo_uri is None:
        import mongomock

        client: Any = mongomock.MongoClient(tz_aware=True)
    else:
        import pymongo

        client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    store = MongoStore(client[database_name], client=client)
    store.prepare()  # as the service does at start-up, in a thread of its own
    store.simulated = mongo_uri is None  # type: ignore[attr-defined]
    yield store
    client.drop_database(database_name)
    store.close()


@pytest.fixture
def database(mongo_uri: str | None) -> Iterator[Any]:
    """An empty database of the test's own, on the suite's MongoDB (real or mongomock)."""
    if mongo_uri is None:
        import mongomock

        client: Any = mongomock.MongoClient(tz_aware=True)
    else:
        import pymongo

        client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    name = f"timeline_test_{uuid.uuid4().hex[:12]}"
    yield client[name]
    client.drop_database(name)
    client.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "timeline.sqlite3")
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "mongo"])
def store(request: pytest.FixtureRequest) -> Store:
    """Every store backend, one after the other: the contract is the same."""
    fixture: Store = request.getfixturevalue(f"{request.param}_store")
    return fixture


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, key_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
    ).validate()


@pytest.fixture
def app(settings: Settings, store: Store) -> Iterator[Any]:
    made = create_app(settings, store=store)
    yield made
    release(made)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


# --- Redis Cluster and Redis Sentinel: real servers of our own (tests/topologies.py) --------
#
# `redis_cluster` / `redis_sentinel`: one of each for the whole session (started on first use,
# about 2.5 s each), for tests that kill nothing. Tests that kill or restart nodes take the
# factories: every call starts fresh servers, and all of them are killed at the test's end.

# (Imported here, not at the top, so that this block is an addition of its own.)
from collections.abc import Callable  # noqa: E402

from topologies import ClusterServers, SentinelServers  # noqa: E402


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """A shared Redis Cluster: 3 masters, each with a replica. Kill nothing in it."""
    cluster = ClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    """A shared primary, replica and 3 sentinels. Kill nothing in it."""
    servers = SentinelServers(tmp_path_factory.mktemp("sentinel"))
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture
def redis_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., ClusterServers]]:
    """`make(**options)`: a fresh, started ClusterServers (options: password=,
    node_timeout_ms=, masters=, replicas=); every one is killed at the test's end."""
    clusters: list[ClusterServers] = []

    def make(**options: Any) -> ClusterServers:
        cluster = ClusterServers(tmp_path / f"cluster-{len(clusters)}", **options)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def redis_sentinel_factory(tmp_path: Path) -> Iterator[Callable[..., SentinelServers]]:
    """`make(**options)`: fresh, started SentinelServers (options: password=, master_name=,
    down_after_ms=, failover_timeout_ms=, ...); every one is killed at the test's end."""
    created: list[SentinelServers] = []

    def make(**options: Any) -> SentinelServers:
        servers = SentinelServers(tmp_path / f"sentinel-{len(created)}", **options)
        created.append(servers)
        return servers.start()

    yield make
    for servers in created:
        servers.stop()
