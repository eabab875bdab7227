"""Exactly once when Redis and the store's record of a message disagree: which sequences a
retry keeps, and what it gives back. Each case drives the service through the interleaving
that once stored a message twice or gave back a sequence in use (found in review).

Copies are only ever written where the store's record of the message says, the one
authority; Redis's record is a hint checked against it. A range an attempt only replayed is
never given back by it. Concurrent retries: tests/test_one_authority.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from test_faults import Clock, FlakyStore, msg, read_all, service, texts
from timeline.allocator import Allocator, NotRun
from timeline.allocator.cluster import ClusterRedis
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store import Store
from topologies import ClusterServers


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, tuple[Any, int]]:
    return {k: (client.dump(k), client.pttl(k)) for k in client.scan_iter(match=prefix + "*")}


def restore(client: redis.Redis, prefix: str, saved: dict[bytes, tuple[Any, int]]) -> None:
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    for key, (value, ttl) in saved.items():
        client.restore(key, max(ttl, 0), value, replace=True)


def test_redis_back_from_an_older_snapshot_does_not_store_a_message_twice(
    redis_url: str, key_prefix: str, sqlite_store: Store
) -> None:
    client = redis.Redis.from_url(redis_url)
    flaky, clock = FlakyStore(sqlite_store), Clock()
    svc = service(redis_url, key_prefix, flaky, clock, retry_backoff_ms=0)
    flaky.fail_writes = 4
    with pytest.raises(Unavailable):
        svc.send("u0", "u1", [msg("b")], "b")  # allocated and recorded; nothing stored
    saved = snapshot(client, key_prefix)  # what a snapshot (or a lagging replica) holds
    clock.ms += 31_000
    first = svc.send("u0", "u1", [msg("b")], "b")  # a stale replay: moves, and stores
    restore(client, key_prefix, saved)  # Redis comes back from the snapshot
    clock.ms += 1_000
    assert svc.send("u0", "u1", [msg("b")], "b") == first  # its reply was lost: a retry
    for kind, id_ in ((Kind.SYNC, "u1"), (Kind.SYNC, "u0"), (Kind.HISTORY, "u0:u1")):
        assert texts(read_all(sqlite_store, kind, id_)) == ["b"], (kind, id_)


def test_a_retry_never_gives_back_a_sequence_it_only_replayed(
    redis_url: str, key_prefix: str, sqlite_store: Store
) -> None:
    client = redis.Redis.from_url(redis_url)
    clock = Clock()
    svc = service(redis_url, key_prefix, sqlite_store, clock, retry_backoff_ms=0)
    assert svc.send("u0", "u1", [msg("b")], "b") == [1]
    for key in client.scan_iter(match=key_prefix + "*"):
        client.delete(key)  # Redis forgets everything
    clock.ms += 100
    # Redis's record now says 2 (the retry's fresh allocation), the store's 1: the store's
    # decides, and Redis's is left as it is, a hint every replay checks against the store.
    assert svc.send("u0", "u1", [msg("b")], "b") == [1]  # allocates 2, gives it back
    assert svc.send("u2", "u1", [msg("x")]) == [2]  # another message takes 2
    clock.ms += 100
    assert svc.send("u0", "u1", [msg("b")], "b") == [1]  # replays the record that says 2
    counter = client.get(svc.allocator.key(Timeline(Kind.SYNC, "u1")))
    assert int(counter or 0) == 2  # 2 is written: never given back
    assert svc.send("u3", "u1", [msg("y")]) == [3]
    assert texts(read_all(sqlite_store, Kind.SYNC, "u1")) == ["b", "x", "y"]


class ReclaimFails:
    """A store whose reclaim() fails while `failing` > 0."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.backend, self.failing = inner, inner.backend, 0

    def reclaim(self, expected: Any, lasts: Any) -> Any:
        if self.failing:
            self.failing -= 1
            raise Unavailable("injected: reclaim failed")
        return self.inner.reclaim(expected, lasts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_buckets_allocated_by_different_attempts_store_a_message_once(
    redis_cluster: ClusterServers, key_prefix: str, sqlite_store: Store, tmp_path: Any
) -> None:
    settings = Settings(
        redis_mode="cluster",
        redis_url=redis_cluster.url,
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "x.db"),
        data_dir=str(tmp_path / "var"),
    )
    allocator = Allocator(ClusterRedis(redis_cluster.url, settings), key_prefix)
    store, clock = ReclaimFails(sqlite_store), Clock()
    svc = TimelineService(
        allocator, store, Policy(retry_backoff_ms=0), clock_ms=clock, sleep=lambda _: None
    )
    group = allocator.bucket(Timeline(Kind.HISTORY, "g"))
    buckets = {f"u{i}": allocator.bucket(Timeline(Kind.SYNC, f"u{i}")) for i in range(100)}
    u = next(m for m, b in buckets.items() if b != group)
    v = next(m for m, b in buckets.items() if b not in (group, buckets[u]))
    for i in range(3):
        svc.send("x", u, [msg(f"old{i}")])
    view = RedisCluster.from_url(redis_cluster.url)
    view.set(allocator.key(Timeline(Kind.SYNC, u)), 1)  # u's counter lags the store
    real_run = allocator.redis.run
    refusing = [True]

    def run(calls: Any) -> list[Any]:
        refused = [refusing[0] and c.bucket == buckets[u] for c in calls]
        replies = iter(real_run([c for c, r in zip(calls, refused, strict=True) if not r]))
        return [NotRun("injected: refused") if r else next(replies) for r in refused]

    allocator.redis.run = run  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        svc.send_group("g", [u, v], [msg("m")], "m1")  # u's bucket refused: a 503
    refusing[0] = False
    clock.ms += 1000
    store.failing = 1
    # The retry: u's bucket allocated now (its record's time differs), u's copy moves.
    assert svc.send_group("g", [u, v], [msg("m")], "m1") == []
    svc.send("x", u, [msg("later")])
    clock.ms += 1000
    assert svc.send_group("g", [u, v], [msg("m")], "m1") == []  # its reply was lost
    assert texts(read_all(sqlite_store, Kind.SYNC, u)).count("m") == 1
    assert texts(read_all(sqlite_store, Kind.SYNC, v)) == ["m"]
    assert texts(read_all(sqlite_store, Kind.HISTORY, "g")) == ["m"]
