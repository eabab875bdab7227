"""The service on each Redis topology it supports: one Redis, Redis Cluster (3 masters, each
with a replica) and Redis Sentinel (a primary, a replica, three sentinels), all real servers
started by the fixtures of tests/conftest.py (tests/topologies.py).

What holds in every mode: the go-timeline seed scenario; concurrent senders whose members
land on every master; and exactly once when Redis forgets: a retry after FLUSHALL (or a
restart without persistence) returns the first answer and stores nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import RedisServer
from test_e2e import Service, bench, clean_env
from timeline.factory import close_app, create_app
from timeline.model import Kind, Timeline
from timeline.settings import Settings
from timeline.store import Store
from topologies import ClusterServers, SentinelServers

SEND, GROUP = "/timeline/send", "/timeline/sendGroup"


@dataclass
class Deployment:
    """A service wired to one topology, and how to make that Redis forget everything."""

    mode: str
    settings: Settings
    forget: Callable[[], None]
    masters: Callable[[], list[str]]


@pytest.fixture(params=["standalone", "cluster", "sentinel"])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> Iterator[Deployment]:
    base = Settings(
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
        # What is under test is the outcome; a loaded CI machine may be slow to answer.
        redis_socket_timeout_ms=5000,
    )
    if request.param == "standalone":
        server = RedisServer(tmp_path / "redis").start()
        yield Deployment(
            "standalone",
            base.replace(redis_url=server.url),
            lambda: server_client(server).flushall(),
            lambda: [f"127.0.0.1:{server.port}"],
        )
        server.stop()
    elif request.param == "cluster":
        cluster: ClusterServers = request.getfixturevalue("redis_cluster")
        yield Deployment(
            "cluster",
            base.replace(redis_mode="cluster", redis_url=cluster.url),
            cluster.flushall,
            lambda: [f"127.0.0.1:{port}" for port in cluster.masters()],
        )
    else:
        sentinel: SentinelServers = request.getfixturevalue("redis_sentinel")
        yield Deployment(
            "sentinel",
            base.replace(
                redis_mode="sentinel",
                redis_sentinels=sentinel.sentinels,
                redis_sentinel_master=sentinel.master_name,
            ),
            lambda: sentinel.client(sentinel.primary_port()).flushall(),
            lambda: [f"127.0.0.1:{sentinel.primary_port()}"],
        )


def server_client(server: RedisServer) -> Any:
    import redis

    return redis.Redis.from_url(server.url)


@pytest.fixture
def app(deployment: Deployment, store: Store) -> Iterator[Any]:
    app = create_app(deployment.settings, store=store)
    yield app
    close_app(app)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def post(client: Any, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


def texts(entries: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(e["sequence"], json.loads(e["message"])["text"]) for e in entries]


def inbox(client: Any, member: str) -> dict[str, Any]:
    reply: dict[str, Any] = client.get(f"/timeline/sync?member={member}&count=1000").get_json()
    return reply


# --- the seed scenario -----------------------------------------------------------------------


def test_seed_scenario(client: Any, deployment: Deployment) -> None:
    def send(sender: str, receiver: str, text: str) -> Any:
        return post(client, SEND, {"from": sender, "to": receiver, "message": {"text": text}})

    assert send("a", "b", "吃了吗？").get_json() == {"sequence": "1"}
    assert send("b", "a", "吃了").get_json() == {"sequence": "2"}
    for text in ("大家好", "报三围", "初次见面，多多指教"):
        body = {
            "group_name": "group_a",
            "group_members": ["a", "c", "d"],
            "message": {"text": text},
        }
        assert post(client, GROUP, body).get_json() == {"failedMembers": []}
    a = inbox(client, "a")
    assert texts(a["entrySet"]) == [
        ("1", "吃了吗？"),
        ("2", "吃了"),
        ("3", "大家好"),
        ("4", "报三围"),
        ("5", "初次见面，多多指教"),
    ]
    assert (a["latestSeq"], a["minSeq"]) == ("5", "1")
    d = inbox(client, "d")
    assert [s for s, _ in texts(d["entrySet"])] == ["1", "2", "3"]
    history = client.get("/timeline/history/group/group_a").get_json()["entrySet"]
    assert [t for _, t in texts(history)] == ["大家好", "报三围", "初次见面，多多指教"]
    assert post(client, "/timeline/ack", {"member": "a", "seq": 3}).status_code == 200
    assert [s for s, _ in texts(inbox(client, "a")["entrySet"])] == ["4", "5"]


# --- many senders, members on every master ---------------------------------------------------


# The allocator is what is under test: mongomock, single-threaded inside, only slows it down.
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_concurrent_senders_keep_every_timeline_contiguous(
    app: Any, deployment: Deployment, store: Store
) -> None:
    members = [f"m{i}" for i in range(60)]
    allocator = app.extensions["timeline"]["service"].allocator
    if deployment.mode == "cluster":
        # The members' buckets cover every master of the cluster.
        buckets = {allocator.bucket(Timeline(Kind.SYNC, m)) for m in members}
        masters = {
            allocator.redis.client.nodes_manager.get_node_from_slot(allocator.redis.slot(b)).name
            for b in buckets
        }
        assert len(masters) == 3
    groups = [members[i::3] for i in range(3)] + [members]

    def sender(worker: int) -> None:
        client = app.test_client()
        for n in range(12):
            group = groups[(worker + n) % len(groups)]
            body = {
                "group_name": f"g{(worker + n) % len(groups)}",
                "group_members": group,
                "message": {"text": f"w{worker}-{n}"},
                "client_msg_id": f"w{worker}-{n}",
            }
            reply = post(client, GROUP, body)
            assert reply.get_json() == {"failedMembers": []}, reply.get_json()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(sender, range(6)))
    client = app.test_client()
    total = 0
    for member in members:
        entries = inbox(client, member)["entrySet"]
        seqs = [int(e["sequence"]) for e in entries]
        assert seqs == list(range(1, len(seqs) + 1)), member
        words = [json.loads(e["message"])["text"] for e in entries]
        assert len(words) == len(set(words)), member  # each message once
        total += len(entries)
    expected = sum(len(groups[(w + n) % len(groups)]) for w in range(6) for n in range(12))
    assert total == expected


# --- exactly once when Redis forgets -----------------------------------------------------------


def test_a_retry_after_redis_forgot_everything_returns_the_first_answer(
    client: Any, deployment: Deployment
) -> None:
    body = {"from": "a", "to": "b", "message": {"text": "hi"}, "client_msg_id": "k-1"}
    assert post(client, SEND, body).get_json() == {"sequence": "1"}
    deployment.forget()
    # The retry finds the store's record: the first answer, nothing stored again.
    assert post(client, SEND, body).get_json() == {"sequence": "1"}
    assert post(client, SEND, body).get_json() == {"sequence": "1"}
    b = inbox(client, "b")
    assert texts(b["entrySet"]) == [("1", "hi")]
    # What the retry allocated before it found the record was given back: no hole.
    assert b["latestSeq"] == "1"
    history = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert texts(history) == [("1", "hi")]
    # The next message goes on where the timeline is.
    other = {"from": "c", "to": "b", "message": {"text": "next"}, "client_msg_id": "k-2"}
    assert post(client, SEND, other).get_json() == {"sequence": "2"}
    # Another message under a used id is still refused, Redis having forgotten or not.
    deployment.forget()
    reused = post(client, SEND, body | {"message": {"text": "another"}})
    assert reused.status_code == 409
    assert reused.get_json()["reason"] == "TIMELINE_CLIENT_MSG_ID_REUSED"
    assert texts(inbox(client, "b")["entrySet"]) == [("1", "hi"), ("2", "next")]


def test_a_group_retry_after_redis_forgot_stores_nothing_twice(
    client: Any, deployment: Deployment
) -> None:
    members = [f"u{i}" for i in range(40)]
    body = {
        "group_name": "g",
        "group_members": members,
        "message": {"text": "once"},
        "client_msg_id": "g-1",
    }
    post(client, SEND, {"from": "u3", "to": "u4", "message": {"text": "before"}})
    assert post(client, GROUP, body).get_json() == {"failedMembers": []}
    deployment.forget()
    retry = body | {"group_members": list(reversed(members))}
    assert post(client, GROUP, retry).get_json() == {"failedMembers": []}
    for member in members:
        got = [t for _, t in texts(inbox(client, member)["entrySet"])]
        assert got.count("once") == 1, member
    history = client.get("/timeline/history/group/g").get_json()["entrySet"]
    assert texts(history) == [("1", "once")]
    # Timelines go on without a hole after the retry.
    again = body | {"client_msg_id": "g-2", "message": {"text": "twice"}}
    assert post(client, GROUP, again).get_json() == {"failedMembers": []}
    seqs = [int(e["sequence"]) for e in inbox(client, "u3")["entrySet"]]
    assert seqs == [1, 2, 3]


def test_a_retry_after_a_restart_without_persistence_stores_nothing_twice(
    tmp_path: Path, key_prefix: str, store: Store
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    settings = Settings(
        redis_url=server.url,
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
    )
    app = create_app(settings, store=store)
    client = app.test_client()
    try:
        body = {
            "from": "a",
            "to": "b",
            "messages": [{"text": "x"}, {"text": "y"}],
            "client_msg_id": "k",
        }
        first = post(client, SEND, body)
        assert first.status_code == 200
        server.stop()
        assert post(client, SEND, body).status_code == 503  # Redis is down: a fast 503
        server.start()  # empty: no persistence
        assert post(client, SEND, body).get_json() == first.get_json()
        assert texts(inbox(client, "b")["entrySet"]) == [("1", "x"), ("2", "y")]
        assert inbox(client, "b")["latestSeq"] == "2"
    finally:
        close_app(app)
        server.stop()


# --- over HTTP: gunicorn in each mode, driven by timeline-bench --verify -----------------------


@pytest.mark.e2e
@pytest.mark.parametrize("scenario", ["send", "sendGroup"])
# One Redis: tests/test_e2e.py runs timeline-bench --verify already.
@pytest.mark.parametrize("deployment", ["cluster", "sentinel"], indirect=True)
def test_timeline_bench_verifies_a_run_in_every_mode(
    deployment: Deployment, tmp_path: Path, key_prefix: str, scenario: str
) -> None:
    settings = deployment.settings
    env = clean_env(
        TIMELINE_REDIS_MODE=settings.redis_mode,
        TIMELINE_REDIS_KEY_PREFIX=key_prefix,
        TIMELINE_SQLITE_PATH=str(tmp_path / "timeline.sqlite3"),
        TIMELINE_DATA_DIR=str(tmp_path / "var"),
        **{
            f"TIMELINE_{name.upper()}": str(getattr(settings, name))
            for name in ("redis_url", "redis_sentinels", "redis_sentinel_master")
            if getattr(settings, name)
        },
    )
    service = Service(env, tmp_path / "gunicorn.log").start()
    try:
        report = tmp_path / "out.json"
        done = bench(
            service,
            *(
                "--scenario",
                scenario,
                "--group-size",
                "12",
                "--concurrency",
                "4",
                "--processes",
                "2",
            ),
            *("--requests", "120", "--verify", "--json", str(report)),
        )
        assert done.returncode == 0, done.stderr + service.log.read_text()[-4000:]
        result = json.loads(report.read_text())
        assert result["errors"] == 0
        assert result["verify"]["ok"], result["verify"]
        assert result["requests"] == 120
        assert f"redis={settings.redis_mode}" in service.log.read_text()
    finally:
        service.stop()


# --- passwords: TIMELINE_REDIS_PASSWORD in every mode -------------------------------------------


@pytest.mark.parametrize("mode", ["standalone", "cluster", "sentinel"])
def test_the_redis_password_setting_works_in_every_mode(
    mode: str,
    redis_cluster_factory: Callable[..., ClusterServers],
    redis_sentinel_factory: Callable[..., SentinelServers],
    tmp_path: Path,
    key_prefix: str,
    sqlite_store: Store,
) -> None:
    base = Settings(
        redis_key_prefix=key_prefix,
        redis_password="s3cret",
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
    )
    if mode == "cluster":
        cluster = redis_cluster_factory(password="s3cret")
        # The node named without its password: the setting supplies it.
        settings = base.replace(redis_mode="cluster", redis_url=cluster.url.replace(":s3cret@", ""))
    elif mode == "sentinel":
        servers = redis_sentinel_factory(password="s3cret")
        settings = base.replace(
            redis_mode="sentinel",
            redis_sentinels=servers.sentinels,
            redis_sentinel_master=servers.master_name,
        )
    else:
        server = RedisServer(tmp_path / "redis").start()
        server_client(server).config_set("requirepass", "s3cret")
        settings = base.replace(redis_url=server.url)
    assert "s3cret" not in (settings.redis_url or "")
    app = create_app(settings, store=sqlite_store)
    try:
        client = app.test_client()
        body = {"from": "a", "to": "b", "message": {"text": "hi"}, "client_msg_id": "p-1"}
        assert post(client, SEND, body).get_json() == {"sequence": "1"}
        assert texts(inbox(client, "b")["entrySet"]) == [("1", "hi")]
        without = create_app(settings.replace(redis_password=None), store=sqlite_store)
        try:
            refused = post(without.test_client(), SEND, body | {"client_msg_id": "p-2"})
            assert refused.status_code == 503  # the password is what let the first one in
        finally:
            close_app(without)
    finally:
        close_app(app)
        if mode == "standalone":
            server.stop()
