"""The allocator on a real Redis Cluster: per-bucket atomicity, and a call is sent again only
when its reply says it did not run.

- A bucket whose call times out has an unknown outcome: without an idempotency record it is
  reported (its members are failedMembers) and never sent again, with a record it is sent
  once more (the second run replays the first); either way its counters advance once.
- MOVED (a stale slot map): the map is read again and the call goes to the right master.
- The buckets of one request on one master go in one pipeline; the masters work at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from timeline.allocator import Allocator, Record, wire
from timeline.allocator.cluster import ClusterRedis
from timeline.factory import close_app, create_app
from timeline.model import Kind, Timeline
from timeline.settings import Settings
from topologies import ClusterServers


def sync(member: str) -> Timeline:
    return Timeline(Kind.SYNC, member)


@pytest.fixture
def settings(redis_cluster: ClusterServers, tmp_path: Path, key_prefix: str) -> Settings:
    return Settings(
        redis_mode="cluster",
        redis_url=redis_cluster.url,
        redis_key_prefix=key_prefix,
        redis_socket_timeout_ms=300,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
    )


@pytest.fixture
def allocator(settings: Settings) -> Iterator[Allocator]:
    allocator = Allocator(
        ClusterRedis(settings.redis_url or "", settings), settings.redis_key_prefix
    )
    yield allocator
    allocator.close()


@pytest.fixture
def view(redis_cluster: ClusterServers) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url)
    yield client
    client.close()


def master_of(allocator: Allocator, timeline: Timeline) -> str:
    redis = allocator.redis
    assert isinstance(redis, ClusterRedis)
    slot = redis.slot(allocator.bucket(timeline))
    return str(redis.client.nodes_manager.get_node_from_slot(slot).name)


def spread(allocator: Allocator, count: int) -> tuple[list[Timeline], list[Timeline]]:
    """Members on the master of the first one (`paused`), and members on other masters."""
    members = [sync(f"u{i}") for i in range(count)]
    target = master_of(allocator, members[0])
    paused = [m for m in members if master_of(allocator, m) == target]
    others = [m for m in members if master_of(allocator, m) != target]
    assert paused
    assert others
    return paused, others


def prepared(allocator: Allocator) -> tuple[list[Timeline], list[Timeline], list[Timeline]]:
    """Members on one master and on the others, counters seeded and advanced once (so that
    every master knows the script: a call sent now runs it)."""
    paused, others = spread(allocator, 40)
    timelines = [Timeline(Kind.HISTORY, "g"), *others, *paused]
    allocator.seed(dict.fromkeys(timelines, 0))
    allocator.allocate(timelines)
    return paused, others, timelines


def pause(cluster: ClusterServers, node: str, ms: int) -> threading.Thread:
    """Keep a master busy for `ms` (a script that loops): commands sent meanwhile wait,
    then run, also when their client gave up waiting (a reply lost, as far as it knows).

    The loop reads os.clock() (the server's CPU time: the loop keeps a core busy, so it
    follows the wall clock) where scripts have it (Redis 7.2 and later), else TIME: from
    7.2 on, TIME inside a script returns the same value every time, and the loop would never
    end; before 7.2 scripts have no `os`."""
    port = int(node.rpartition(":")[2])
    busy = (
        "local ok, clock = pcall(function() return os.clock end); "
        "local function now() if ok and clock then return clock() * 1000 end "
        "local t = redis.call('TIME'); return t[1] * 1000 + t[2] / 1000 end; "
        "local s = now(); repeat until now() - s >= tonumber(ARGV[1])"
    )
    client = redis.Redis.from_url(cluster.node_url(port), socket_timeout=30)
    thread = threading.Thread(target=client.eval, args=(busy, 0, ms))
    thread.start()
    time.sleep(0.05)  # the script has started
    return thread


def test_a_timed_out_bucket_without_a_record_is_reported_and_never_sent_again(
    allocator: Allocator,
    view: RedisCluster,
    redis_cluster: ClusterServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paused, others, timelines = prepared(allocator)
    sent: list[int] = []
    run = allocator._run

    def counted(name: str, calls: Any) -> Any:
        sent.append(len(calls))
        return run(name, calls)

    monkeypatch.setattr(allocator, "_run", counted)
    pause(redis_cluster, master_of(allocator, paused[0]), 1200)
    allocation = allocator.allocate(timelines)
    # One round of calls: what may have run is not sent again (a second send could run too,
    # once the master is free, and allocate twice; whether it reaches the master depends on
    # whether a connection to it is at hand, so the sends are counted here).
    assert len(sent) == 1
    # The buckets of the paused master: outcome unknown, reported; every other allocated.
    positions = {t: p for p, t in enumerate(timelines)}
    assert sorted(allocation.failed) == sorted(positions[m] for m in paused)
    assert set(allocation.lasts) == set(range(len(timelines))) - set(allocation.failed)
    time.sleep(1.5)  # the pause ends: the call queued on the master runs now, once
    assert {int(view.get(allocator.key(m)) or 0) for m in paused} == {2}
    assert {int(view.get(allocator.key(m)) or 0) for m in others} == {2}


def test_a_timed_out_bucket_with_a_record_is_sent_once_more_and_allocates_once(
    allocator: Allocator, view: RedisCluster, redis_cluster: ClusterServers
) -> None:
    paused, _, timelines = prepared(allocator)
    record = Record("g", "m-1", "fp", ttl_ms=60_000)
    pause(redis_cluster, master_of(allocator, paused[0]), 900)
    first = allocator.allocate(timelines, 1, record, now_ms=5)
    positions = {t: p for p, t in enumerate(timelines)}
    if first.failed:  # the second send ran into the pause too
        assert sorted(first.failed) == sorted(positions[m] for m in paused)
    else:  # the second send waited out the pause: it replayed what the first allocated
        replayed = {p for replay in first.replays for p in replay.positions}
        assert replayed == {positions[m] for m in paused}
    time.sleep(1.2)
    # The first send ran after the pause and allocated; the second only replayed it.
    assert {int(view.get(allocator.key(m)) or 0) for m in paused} == {2}
    again = allocator.allocate(timelines, 1, record, now_ms=9)
    assert again.lasts == dict.fromkeys(range(len(timelines)), 2)
    assert not again.failed
    assert {r.allocated_ms for r in again.replays} == {5}


def test_a_stale_slot_map_is_read_again_on_moved(allocator: Allocator, view: RedisCluster) -> None:
    a, b = spread(allocator, 20)
    timelines = [a[0], b[0]]
    allocator.seed(dict.fromkeys(timelines, 0))
    redis = allocator.redis
    assert isinstance(redis, ClusterRedis)
    manager = redis.client.nodes_manager
    slot = redis.slot(allocator.bucket(a[0]))
    wrong = manager.get_node_from_slot(redis.slot(allocator.bucket(b[0])))
    right = manager.get_node_from_slot(slot)
    assert wrong.name != right.name
    manager.slots_cache[slot] = [wrong]  # as if the slot had moved since the map was read
    allocation = allocator.allocate(timelines)
    assert allocation.lasts == {0: 1, 1: 1}
    assert manager.get_node_from_slot(slot).name == right.name
    assert [view.get(allocator.key(t)) for t in timelines] == [b"1", b"1"]


def test_a_group_with_a_master_paused_reports_its_members_and_the_rest_is_stored(
    settings: Settings, redis_cluster: ClusterServers
) -> None:
    app = create_app(settings)
    client = app.test_client()
    allocator = app.extensions["timeline"]["service"].allocator
    try:
        paused, others = spread(allocator, 40)
        history = Timeline(Kind.HISTORY, "grp")
        if master_of(allocator, history) == master_of(allocator, paused[0]):
            pytest.skip("the history bucket landed on the paused master")  # pragma: no cover
        members = [t.id for t in paused + others]
        body = {"group_name": "grp", "group_members": members, "message": {"text": "hi"}}
        post = lambda: client.post(  # noqa: E731
            "/timeline/sendGroup", data=json.dumps(body), content_type="application/json"
        )
        assert post().get_json() == {"failedMembers": []}  # counters seeded everywhere
        pause(redis_cluster, master_of(allocator, paused[0]), 1000)
        reply = post().get_json()
        assert sorted(reply["failedMembers"]) == sorted(t.id for t in paused)
        time.sleep(1.1)
        for member in others:
            got = client.get(f"/timeline/sync?member={member.id}").get_json()
            assert [e["sequence"] for e in got["entrySet"]] == ["1", "2"]
    finally:
        close_app(app)


def test_every_master_gets_its_pipeline_before_any_reply_is_read(
    allocator: Allocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip of wall time: a request's calls go in one pipeline per master, and
    every pipeline is sent before any reply is read, so the masters work at once."""
    members = [sync(f"p{i}") for i in range(200)]
    masters = {master_of(allocator, m) for m in members}
    assert len(masters) == 3
    allocator.seed(dict.fromkeys(members, 0))
    events: list[tuple[str, int]] = []
    real_start, real_finish = wire.Batch.start, wire.Batch.finish

    def start(batch: wire.Batch) -> wire.Batch:
        events.append(("send", len(batch._calls)))
        return real_start(batch)

    def finish(batch: wire.Batch) -> list[Any]:
        events.append(("read", len(batch._calls)))
        return real_finish(batch)

    monkeypatch.setattr(wire.Batch, "start", start)
    monkeypatch.setattr(wire.Batch, "finish", finish)
    allocation = allocator.allocate(members)
    assert sorted(allocation.lasts.values()) == [1] * 200
    kinds = [kind for kind, _ in events]
    assert kinds == ["send"] * 3 + ["read"] * 3  # one pipeline per master, all sent first
    buckets = len({allocator.bucket(m) for m in members})
    assert sum(n for kind, n in events if kind == "send") == buckets  # one call per bucket


@pytest.mark.slow
def test_a_hung_master_fails_its_buckets_within_the_request_deadline(
    redis_cluster_factory: Any, key_prefix: str
) -> None:
    """A master that accepts connections but never answers (SIGSTOP), before the cluster
    fails it over: its buckets are reported, the others allocated, and the call returns well
    inside the request's deadline (3 s), with a record (sent twice) or without, on pooled or
    new connections. The bound is the behaviour: no request may outwait its deadline here."""
    cluster = redis_cluster_factory(node_timeout_ms=60_000)  # no failover during the test
    settings = Settings(redis_mode="cluster", redis_url=cluster.url, redis_key_prefix=key_prefix)
    pooled = Allocator(ClusterRedis(cluster.url, settings), key_prefix)
    paused, others = spread(pooled, 30)
    timelines = [*others, *paused]
    pooled.seed(dict.fromkeys(timelines, 0))
    pooled.allocate(timelines)  # connections open to every master
    fresh = Allocator(ClusterRedis(cluster.url, settings), key_prefix)
    assert fresh.redis.client  # the slot map read while every master answers
    process = cluster.nodes[int(master_of(pooled, paused[0]).rpartition(":")[2])].process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        for allocator, record in (
            (pooled, None),
            (pooled, Record("c", "x", "f", 60_000)),
            (fresh, None),
        ):
            started = time.monotonic()
            allocation = allocator.allocate(timelines, 1, record, 1)
            took = time.monotonic() - started
            assert sorted(allocation.failed) == list(range(len(others), len(timelines)))
            assert sorted(allocation.lasts) == list(range(len(others)))
            assert took < 2.5, took
    finally:
        os.kill(process.pid, signal.SIGCONT)
        pooled.close()
        fresh.close()
