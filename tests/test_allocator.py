"""The Lua scripts and their Python side, against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from support import free_port
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.sequence import Record, SequenceAllocator, connect_redis, load_script
from timeline.settings import Settings


@pytest.fixture
def allocator(redis_url: str, key_prefix: str) -> SequenceAllocator:
    return SequenceAllocator(connect_redis(redis_url, Settings()), key_prefix)


def sync(member: str) -> Timeline:
    return Timeline(Kind.SYNC, member)


def fresh(allocator: SequenceAllocator, timelines: Sequence[Timeline]) -> None:
    """Seed new timelines at 0, as the service does after the store says they are empty."""
    allocator.seed(dict.fromkeys(timelines, 0))


def keys(allocator: SequenceAllocator, timelines: Sequence[Timeline]) -> list[str]:
    return [allocator.key(t) for t in timelines]


def lasts(allocator: SequenceAllocator, timelines: Sequence[Timeline], count: int = 1) -> list[int]:
    allocation = allocator.allocate(keys(allocator, timelines), count)
    assert not allocation.missing
    return allocation.lasts


def test_missing_counters_are_reported_and_nothing_changes(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    fresh(allocator, [sync("a")])
    allocation = allocator.allocate(keys(allocator, [sync("a"), sync("b"), sync("c")]))
    assert allocation.missing == [1, 2]
    assert allocation.lasts == []
    assert redis_client.get(allocator.key(sync("a"))) == b"0"  # a was not advanced either
    assert allocator.latest(sync("b")) is None


def test_each_timeline_gets_its_own_contiguous_sequence(allocator: SequenceAllocator) -> None:
    history = Timeline(Kind.HISTORY, "a:b")
    fresh(allocator, [history, sync("a"), sync("b")])
    assert lasts(allocator, [history, sync("a"), sync("b")]) == [1, 1, 1]
    assert lasts(allocator, [history, sync("a"), sync("b")]) == [2, 2, 2]
    assert lasts(allocator, [sync("b")]) == [3]
    assert allocator.latest(sync("b")) == 3
    assert allocator.latest(sync("a")) == 2


def test_count_gives_each_timeline_a_contiguous_range(allocator: SequenceAllocator) -> None:
    fresh(allocator, [sync("a"), sync("b")])
    lasts(allocator, [sync("a")])
    # Given a at 1 and b at 0, when a batch of 3 is allocated for both,
    # then a owns 2..4 and b owns 1..3: the reply is the last of each range.
    assert lasts(allocator, [sync("a"), sync("b")], count=3) == [4, 3]


def test_sync_and_history_counters_never_collide(allocator: SequenceAllocator) -> None:
    # A group called "a" and a user called "a" are different timelines.
    group = Timeline(Kind.HISTORY, "a")
    fresh(allocator, [group, sync("a")])
    lasts(allocator, [group], count=5)
    assert lasts(allocator, [sync("a")]) == [1]
    assert allocator.key(sync("a")) != allocator.key(group)


def test_seed_only_ever_raises_a_counter(allocator: SequenceAllocator) -> None:
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
    allocator = SequenceAllocator(connect_redis(redis_url, patient), key_prefix)
    timelines = [Timeline(Kind.HISTORY, "g")] + [sync(f"m{i}") for i in range(20_000)]
    assert allocator.allocate(keys(allocator, timelines)).missing == list(range(20_001))
    fresh(allocator, timelines)
    assert lasts(allocator, timelines) == [1] * 20_001
    assert lasts(allocator, timelines, count=2) == [3] * 20_001
    assert redis_client.get(allocator.key(sync("m19999"))) == b"3"


def test_scripts_reload_after_script_flush(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    fresh(allocator, [sync("a")])
    assert lasts(allocator, [sync("a")]) == [1]
    redis_client.script_flush()
    assert redis_client.script_exists(allocator._allocate.sha) == [False]
    assert lasts(allocator, [sync("a")]) == [2]
    allocator.seed({sync("b"): 4})
    assert allocator.reallocate([(sync("b"), 1, 4, 0)]) == [5]
    assert redis_client.script_exists(allocator._allocate.sha) == [True]


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "x"])
def test_allocate_refuses_a_bad_count_and_changes_nothing(
    redis_client: redis.Redis, key_prefix: str, count: str
) -> None:
    script = redis_client.register_script(load_script("allocate"))
    redis_client.set(f"{key_prefix}k", 0)
    with pytest.raises(redis.ResponseError, match="positive integer"):
        script(keys=[f"{key_prefix}k"], args=[count, 0, 0, ""])
    assert redis_client.get(f"{key_prefix}k") == b"0"


def test_concurrent_allocations_never_share_a_sequence(allocator: SequenceAllocator) -> None:
    fresh(allocator, [sync("hot"), sync("cold0"), sync("cold1"), sync("cold2")])

    def allocate(i: int) -> list[int]:
        return lasts(allocator, [sync("hot"), sync(f"cold{i % 3}")])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(allocate, range(400)))
    assert sorted(r[0] for r in results) == list(range(1, 401))


# --- idempotency records --------------------------------------------------------------------


def record(allocator: SequenceAllocator, fingerprint: str = "fp1") -> Record:
    return Record(allocator.record_key("a:b", "m-1"), fingerprint, ttl_ms=60_000)


def test_a_record_makes_the_second_attempt_a_replay(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    first = allocator.allocate(keys(allocator, timelines), 1, record(allocator), now_ms=1234)
    assert (first.lasts, first.replayed) == ([1, 1, 1], False)

    again = allocator.allocate(keys(allocator, timelines), 1, record(allocator), now_ms=9999)
    assert (again.lasts, again.replayed, again.fingerprint) == ([1, 1, 1], True, "fp1")
    assert again.allocated_ms == 1234  # when the first attempt allocated
    assert allocator.latest(sync("b")) == 1  # nothing allocated by the replay
    ttl = redis_client.pttl(record(allocator).key)
    assert 0 < ttl <= 60_000


def test_racing_attempts_of_one_message_allocate_once(allocator: SequenceAllocator) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda _: allocator.allocate(keys(allocator, timelines), 1, record(allocator)),
                range(16),
            )
        )
    assert {tuple(r.lasts) for r in results} == {(1, 1, 1)}
    assert sum(not r.replayed for r in results) == 1
    assert allocator.latest(sync("a")) == 1


def test_reallocate_moves_a_taken_sequence_once_for_racing_attempts(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    timelines = [Timeline(Kind.HISTORY, "a:b"), sync("a"), sync("b")]
    fresh(allocator, timelines)
    allocator.allocate(keys(allocator, timelines), 1, record(allocator), now_ms=77)
    # Given b's seq 1 turned out to be taken, two attempts move it at once:
    moved = [allocator.reallocate([(sync("b"), 2, 1, 1)], 1, record(allocator)) for _ in range(2)]
    # then both agree on seq 2, the counter moved once, and the record says 2.
    assert moved == [[2], [2]]
    assert allocator.latest(sync("b")) == 2
    assert redis_client.get(record(allocator).key) == b"fp1,77,1,1,2"
    assert allocator.allocate(keys(allocator, timelines), 1, record(allocator)).lasts == [1, 1, 2]


def test_reallocate_without_a_record_gives_new_ranges(allocator: SequenceAllocator) -> None:
    allocator.seed({sync("a"): 5, sync("b"): 1})
    moves = [(sync("a"), 1, 2, 0), (sync("b"), 2, 1, 0)]
    assert allocator.reallocate(moves, count=2) == [7, 3]


def test_reallocate_starts_above_the_store_floor_even_with_the_counter_gone(
    allocator: SequenceAllocator,
) -> None:
    # Given the counter vanished (FLUSHALL) and the store holds up to 9,
    # then the move lands on 10, in the same atomic step: no window to reuse 1..9.
    assert allocator.reallocate([(sync("a"), 1, 3, 9)]) == [10]
    allocator.seed({sync("b"): 20})
    assert allocator.reallocate([(sync("b"), 1, 3, 9)]) == [21]  # never lowered


# --- failures -------------------------------------------------------------------------------


def test_unreachable_redis_is_unavailable_fast() -> None:
    allocator = SequenceAllocator(
        connect_redis(f"redis://127.0.0.1:{free_port()}/0", Settings()), "t:"
    )
    started = time.monotonic()
    with pytest.raises(Unavailable):
        allocator.allocate(keys(allocator, [sync("a")]))
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
