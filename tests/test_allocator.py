"""The Lua scripts and their Python side, against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from support import free_port
from timeline.allocator import SCRIPTS, Allocation, Allocator, Record, load_script, wire
from timeline.allocator.cluster import ClusterRedis
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.settings import Settings


@pytest.fixture(params=["standalone", "cluster"])
def topology(
    request: pytest.FixtureRequest, redis_url: str, key_prefix: str
) -> Iterator[tuple[Allocator, Any]]:
    """The allocator on one Redis, and on a 3-master cluster; with a client that reads what
    it wrote (keys are routed by slot on the cluster)."""
    # Outcomes are under test, not speed: a loaded machine may be slow to answer.
    settings = Settings(redis_socket_timeout_ms=10_000)
    if request.param == "standalone":
        client = redis.Redis.from_url(redis_url)
        yield Allocator(StandaloneRedis(connect_redis(redis_url, settings)), key_prefix), client
    else:
        cluster = request.getfixturevalue("redis_cluster")
        settings = settings.replace(redis_mode="cluster", redis_url=cluster.url)
        client = RedisCluster.from_url(cluster.url)
        allocator = Allocator(ClusterRedis(cluster.url, settings), key_prefix)
        yield allocator, client
        allocator.close()
    client.close()


@pytest.fixture
def allocator(topology: tuple[Allocator, Any]) -> Allocator:
    return topology[0]


@pytest.fixture
def view(topology: tuple[Allocator, Any]) -> Any:
    return topology[1]


def sync(member: str) -> Timeline:
    return Timeline(Kind.SYNC, member)


def fresh(allocator: Allocator, timelines: Sequence[Timeline]) -> None:
    """Seed new timelines at 0, as the service does after the store says they are empty."""
    allocator.seed(dict.fromkeys(timelines, 0))


def lasts(allocator: Allocator, timelines: Sequence[Timeline], count: int = 1) -> list[int]:
    allocation = allocator.allocate(timelines, count)
    assert not allocation.pending
    assert not allocation.failed
    return [allocation.lasts[p] for p in range(len(timelines))]


def test_missing_counters_are_reported_and_their_bucket_changes_nothing(
    allocator: Allocator, view: Any
) -> None:
    fresh(allocator, [sync("a")])
    timelines = [sync("a"), sync("b"), sync("c")]
    allocation = allocator.allocate(timelines)
    assert sorted(allocation.missing) == [1, 2]
    # A bucket with a missing counter allocates nothing at all (on one Redis: the request).
    same_bucket = allocator.bucket(sync("a")) in {allocator.bucket(t) for t in timelines[1:]}
    assert (0 in allocation.pending) == same_bucket
    assert sorted(allocation.pending) == sorted(set(range(3)) - set(allocation.lasts))
    expected = b"0" if same_bucket else b"1"
    assert view.get(allocator.key(sync("a"))) == expected
    assert allocator.latest(sync("b")) is None


def test_each_timeline_gets_its_own_contiguous_sequence(allocator: Allocator) -> None:
    history = Timeline(Kind.HISTORY, "a:b")
    fresh(allocator, [history, sync("a"), sync("b")])
    assert lasts(allocator, [history, sync("a"), sync("b")]) == [1, 1, 1]
    assert lasts(allocator, [history, sync("a"), sync("b")]) == [2, 2, 2]
    assert lasts(allocator, [sync("b")]) == [3]
    assert allocator.latest(sync("b")) == 3
    assert allocator.latest(sync("a")) == 2


def test_count_gives_each_timeline_a_contiguous_range(allocator: Allocator) -> None:
    fresh(allocator, [sync("a"), sync("b")])
    lasts(allocator, [sync("a")])
    # Given a at 1 and b at 0, when a batch of 3 is allocated for both,
    # then a owns 2..4 and b owns 1..3: the reply is the last of each range.
    assert lasts(allocator, [sync("a"), sync("b")], count=3) == [4, 3]


def test_sync_and_history_counters_never_collide(allocator: Allocator) -> None:
    # A group called "a" and a user called "a" are different timelines.
    group = Timeline(Kind.HISTORY, "a")
    fresh(allocator, [group, sync("a")])
    lasts(allocator, [group], count=5)
    assert lasts(allocator, [sync("a")]) == [1]
    assert allocator.key(sync("a")) != allocator.key(group)


def test_seed_only_ever_raises_a_counter(allocator: Allocator) -> None:
    allocator.seed({sync("a"): 7})
    allocator.seed({sync("a"): 3})  # a slower worker with an older view
    assert allocator.latest(sync("a")) == 7
    allocator.seed({sync("a"): 9, sync("b"): 2})
    assert lasts(allocator, [sync("a"), sync("b")]) == [10, 3]


def test_twenty_thousand_timelines_in_one_call(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    # What is under test is the outcome, not the speed: a loaded machine may take longer
    # than the default 500 ms reply timeout for 20,001 INCRBYs.
    patient = Settings(redis_socket_timeout_ms=30_000)
    allocator = Allocator(StandaloneRedis(connect_redis(redis_url, patient)), key_prefix)
    timelines = [Timeline(Kind.HISTORY, "g")] + [sync(f"m{i}") for i in range(20_000)]
    assert sorted(allocator.allocate(timelines).missing) == list(range(20_001))
    fresh(allocator, timelines)
    assert lasts(allocator, timelines) == [1] * 20_001
    assert lasts(allocator, timelines, count=2) == [3] * 20_001
    assert redis_client.get(allocator.key(sync("m19999"))) == b"3"


def nodes(view: Any) -> list[redis.Redis]:
    """Every Redis the allocator may run scripts on."""
    if isinstance(view, RedisCluster):
        return [view.get_redis_connection(node) for node in view.get_primaries()]
    return [view]


def test_scripts_reload_after_script_flush(allocator: Allocator, view: Any) -> None:
    fresh(allocator, [sync("a")])
    assert lasts(allocator, [sync("a")]) == [1]
    for node in nodes(view):
        node.script_flush()
    sha = SCRIPTS["allocate"].sha
    assert [node.script_exists(sha) for node in nodes(view)] == [[False]] * len(nodes(view))
    assert lasts(allocator, [sync("a")]) == [2]
    allocator.seed({sync("b"): 4})
    assert allocator.reallocate([sync("b")], [(0, 4, 0)]) == [5]
    assert [True] in [node.script_exists(sha) for node in nodes(view)]


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "x"])
def test_allocate_refuses_a_bad_count_and_changes_nothing(
    redis_client: redis.Redis, key_prefix: str, count: str
) -> None:
    script = redis_client.register_script(load_script("allocate"))
    redis_client.set(f"{key_prefix}k", 0)
    with pytest.raises(redis.ResponseError, match="positive integer"):
        script(keys=[f"{key_prefix}k"], args=[count, 0, 0, ""])
    assert redis_client.get(f"{key_prefix}k") == b"0"


def test_concurrent_allocations_never_share_a_sequence(allocator: Allocator) -> None:
    fresh(allocator, [sync("hot"), sync("cold0"), sync("cold1"), sync("cold2")])

    def allocate(i: int) -> list[int]:
        return lasts(allocator, [sync("hot"), sync(f"cold{i % 3}")])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(allocate, range(400)))
    assert sorted(r[0] for r in results) == list(range(1, 401))


# --- idempotency records --------------------------------------------------------------------


def record(fingerprint: str = "fp1") -> Record:
    return Record("a:b", "m-1", fingerprint, ttl_ms=60_000)


def replayed(allocation: Allocation) -> list[int]:
    return sorted(p for replay in allocation.replays for p in replay.positions)


def test_a_record_makes_the_second_attempt_a_replay(allocator: Allocator, view: Any) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    first = allocator.allocate(timelines, 1, record(), now_ms=1234)
    assert (first.lasts, first.replays) == ({0: 1, 1: 1, 2: 1}, [])

    again = allocator.allocate(timelines, 1, record(), now_ms=9999)
    assert again.lasts == {0: 1, 1: 1, 2: 1}
    assert replayed(again) == [0, 1, 2]
    assert {(r.fingerprint, r.allocated_ms) for r in again.replays} == {("fp1", 1234)}
    assert allocator.latest(sync("b")) == 1  # nothing allocated by the replay
    for bucket, _ in allocator.groups(timelines):
        ttl = view.pttl(allocator.record_key(record(), bucket))
        assert 0 < ttl <= 60_000


def test_racing_attempts_of_one_message_allocate_once(allocator: Allocator) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda _: allocator.allocate(timelines, 1, record()),
                range(16),
            )
        )
    assert [r.lasts for r in results] == [{0: 1, 1: 1, 2: 1}] * 16
    # Each bucket allocated once: every other attempt replayed it.
    buckets = len(allocator.groups(timelines))
    assert sum(len(r.replays) for r in results) == 16 * buckets - buckets
    assert allocator.latest(sync("a")) == 1


def test_reallocate_moves_a_taken_sequence_once_for_racing_attempts(
    allocator: Allocator, view: Any
) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    allocator.allocate(timelines, 1, record(), now_ms=77)
    # Given b's seq 1 turned out to be taken, two attempts move it at once:
    moved = [allocator.reallocate(timelines, [(2, 1, 1)], 1, record()) for _ in range(2)]
    # then both agree on seq 2, the counter moved once, and the record says 2.
    assert moved == [[2], [2]]
    assert allocator.latest(sync("b")) == 2
    bucket, positions = next(g for g in allocator.groups(timelines) if 2 in g[1])
    value = ",".join(["fp1", "77", *("2" if p == 2 else "1" for p in positions)])
    assert view.get(allocator.record_key(record(), bucket)) == value.encode()
    assert allocator.allocate(timelines, 1, record()).lasts == {0: 1, 1: 1, 2: 2}


def test_reallocate_without_a_record_gives_new_ranges(allocator: Allocator) -> None:
    allocator.seed({sync("a"): 5, sync("b"): 1})
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    assert allocator.reallocate(timelines, [(1, 2, 0), (2, 1, 0)], count=2) == [7, 3]


def test_reallocate_starts_above_the_store_floor_even_with_the_counter_gone(
    allocator: Allocator,
) -> None:
    # Given the counter vanished (FLUSHALL) and the store holds up to 9,
    # then the move lands on 10, in the same atomic step: no window to reuse 1..9.
    assert allocator.reallocate([sync("a")], [(0, 3, 9)]) == [10]
    allocator.seed({sync("b"): 20})
    assert allocator.reallocate([sync("b")], [(0, 3, 9)]) == [21]  # never lowered


# --- failures -------------------------------------------------------------------------------


def test_unreachable_redis_is_unavailable_fast() -> None:
    allocator = Allocator(
        StandaloneRedis(connect_redis(f"redis://127.0.0.1:{free_port()}/0", Settings())), "t:"
    )
    started = time.monotonic()
    allocation = allocator.allocate([sync("a")])
    assert (allocation.failed, allocation.lasts) == ([0], {})  # refused: it did not run
    assert isinstance(allocation, Allocation)
    with pytest.raises(Unavailable):
        allocator.seed({sync("a"): 1})
    with pytest.raises(Unavailable):
        allocator.latest(sync("a"))
    # The bound is the behaviour: a refused connection fails at once, never retried with
    # backoff (redis-py's default); 1 s leaves a loaded machine plenty of room.
    assert time.monotonic() - started < 1.0


# --- an error reply changes nothing ------------------------------------------------------------


def test_allocate_checks_everything_before_changing_anything(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    script = redis_client.register_script(load_script("allocate"))
    counter, bad = f"{key_prefix}seq:sync:a", f"{key_prefix}seq:sync:b"
    redis_client.set(counter, 5)
    with pytest.raises(redis.ResponseError, match="TTL"):
        script(keys=[f"{key_prefix}msg:x", counter], args=[1, 1, 0, "fp"])
    redis_client.set(bad, "not a number")
    with pytest.raises(redis.ResponseError, match="integer"):
        script(keys=[counter, bad], args=[1, 0, 0, ""])
    assert redis_client.get(counter) == b"5"


def test_reallocate_checks_its_arguments_before_moving(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    script = redis_client.register_script(load_script("reallocate"))
    a, b = f"{key_prefix}seq:sync:a", f"{key_prefix}seq:sync:b"
    redis_client.set(a, 5)
    redis_client.set(b, 5)
    with pytest.raises(redis.ResponseError, match="three values"):
        script(keys=[a, b], args=[1, 0, 1, 5, 9])  # a triple for a only
    with pytest.raises(redis.ResponseError, match="integers"):
        script(keys=[a], args=[1, 0, "x", 5, 9])
    assert redis_client.get(a) == b"5"


def test_seed_checks_its_arguments_before_raising(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    script = redis_client.register_script(load_script("seed"))
    a, b = f"{key_prefix}seq:sync:a", f"{key_prefix}seq:sync:b"
    with pytest.raises(redis.ResponseError, match="one floor per counter"):
        script(keys=[a, b], args=[3])
    with pytest.raises(redis.ResponseError, match="integers"):
        script(keys=[a, b], args=[3, "x"])
    assert redis_client.exists(a, b) == 0


def test_release_gives_back_only_a_range_nothing_came_after(allocator: Allocator) -> None:
    timelines = [sync("a"), sync("b")]
    fresh(allocator, timelines)
    assert lasts(allocator, timelines, count=2) == [2, 2]
    assert lasts(allocator, [sync("b")]) == [3]  # b: another allocation after the range
    # a's range 1..2 is the newest: given back; b's is not (3 came after): kept, for sealing.
    assert allocator.release(timelines, 2, {0: 2, 1: 2}) == {0}
    assert allocator.latest(sync("a")) == 0
    assert allocator.latest(sync("b")) == 3
    assert lasts(allocator, [sync("a")]) == [1]  # the range is handed out again
    assert allocator.release([sync("c")], 1, {0: 1}) == set()  # no counter: nothing to give
    assert allocator.latest(sync("c")) is None


def in_use(allocator: Allocator) -> int:
    """Connections taken from the pools and not given back."""
    redis_ = allocator.redis
    if isinstance(redis_, ClusterRedis):
        nodes = redis_.client.nodes_manager.nodes_cache.values()
        pools = [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
    else:
        assert isinstance(redis_, StandaloneRedis)
        pools = [redis_.client.connection_pool]
    return sum(len(pool._in_use_connections) for pool in pools)


def test_a_failure_while_loading_a_script_leaves_no_connection_out_of_step(
    allocator: Allocator, view: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = [sync(f"u{i}") for i in range(30)]
    fresh(allocator, members)
    lasts(allocator, members)
    for node in nodes(view):
        node.script_flush()  # every call now answers NOSCRIPT first
    real = wire.Batch._load
    failures = iter([True])

    def load(batch: wire.Batch, scripts: Any) -> None:
        if next(failures, False):
            raise redis.TimeoutError("SCRIPT LOAD timed out")  # its reply may still come
        real(batch, scripts)

    monkeypatch.setattr(wire.Batch, "_load", load)
    allocation = allocator.allocate(members)  # reports, never raises
    assert allocation.failed  # the batch whose load failed: outcome unknown
    assert set(allocation.failed) | set(allocation.lasts) == set(range(30))
    assert in_use(allocator) == 0
    # Every connection is in step: each reply belongs to its own call.
    again = allocator.allocate(members)
    assert not again.failed
    for p, member in enumerate(members):
        assert int(view.get(allocator.key(member))) == again.lasts[p]
    assert allocator.latest(members[0]) == again.lasts[0]
