"""The allocation script and its Python side, against a real redis-server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from servers import free_port
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.sequence import SequenceAllocator, connect_redis, load_script
from timeline.settings import Settings


@pytest.fixture
def allocator(redis_url: str, key_prefix: str) -> SequenceAllocator:
    return SequenceAllocator(connect_redis(redis_url, Settings()), key_prefix)


def sync(member: str) -> Timeline:
    return Timeline(Kind.SYNC, member)


def test_each_timeline_gets_its_own_contiguous_sequence(allocator: SequenceAllocator) -> None:
    history = Timeline(Kind.HISTORY, "a:b")
    assert allocator.allocate([history, sync("a"), sync("b")]) == [1, 1, 1]
    assert allocator.allocate([history, sync("a"), sync("b")]) == [2, 2, 2]
    assert allocator.allocate([sync("b")]) == [3]
    assert allocator.latest(sync("b")) == 3
    assert allocator.latest(sync("a")) == 2
    assert allocator.latest(sync("nobody")) == 0


def test_count_gives_each_timeline_a_contiguous_range(allocator: SequenceAllocator) -> None:
    allocator.allocate([sync("a")])
    # Given a at 1 and b new, when a batch of 3 is allocated for both,
    # then a owns 2..4 and b owns 1..3: the reply is the last of each range.
    assert allocator.allocate([sync("a"), sync("b")], count=3) == [4, 3]


def test_sync_and_history_counters_never_collide(allocator: SequenceAllocator) -> None:
    # A group called "a" and a user called "a" are different timelines.
    allocator.allocate([Timeline(Kind.HISTORY, "a")], count=5)
    assert allocator.allocate([sync("a")]) == [1]
    assert allocator.key(sync("a")) != allocator.key(Timeline(Kind.HISTORY, "a"))


def test_twenty_thousand_timelines_in_one_call(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    timelines = [Timeline(Kind.HISTORY, "g")] + [sync(f"m{i}") for i in range(20_000)]
    assert allocator.allocate(timelines) == [1] * 20_001
    assert allocator.allocate(timelines, count=2) == [3] * 20_001
    assert int(redis_client.get(allocator.key(sync("m19999")))) == 3  # type: ignore[arg-type]


def test_script_reloads_after_script_flush(
    allocator: SequenceAllocator, redis_client: redis.Redis
) -> None:
    assert allocator.allocate([sync("a")]) == [1]
    redis_client.script_flush()
    assert redis_client.script_exists(allocator._allocate.sha) == [False]
    assert allocator.allocate([sync("a")]) == [2]
    assert redis_client.script_exists(allocator._allocate.sha) == [True]


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "x"])
def test_script_refuses_a_bad_count_and_changes_nothing(
    redis_client: redis.Redis, key_prefix: str, count: str
) -> None:
    script = redis_client.register_script(load_script("allocate"))
    with pytest.raises(redis.ResponseError, match="positive integer"):
        script(keys=[f"{key_prefix}k"], args=[count])
    assert redis_client.exists(f"{key_prefix}k") == 0


def test_concurrent_allocations_never_share_a_sequence(allocator: SequenceAllocator) -> None:
    def allocate(_: int) -> list[int]:
        return allocator.allocate([sync("hot"), sync(f"cold{_ % 3}")])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(allocate, range(400)))
    assert sorted(r[0] for r in results) == list(range(1, 401))


def test_unreachable_redis_is_unavailable_fast() -> None:
    allocator = SequenceAllocator(
        connect_redis(f"redis://127.0.0.1:{free_port()}/0", Settings()), "t:"
    )
    started = time.monotonic()
    with pytest.raises(Unavailable):
        allocator.allocate([sync("a")])
    with pytest.raises(Unavailable):
        allocator.latest(sync("a"))
    assert time.monotonic() - started < 1.0
