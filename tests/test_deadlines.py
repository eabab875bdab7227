"""Requests end by their deadline, so that readers wait out only so long for a hole."""

from __future__ import annotations

from typing import Any

import pytest

from support import put
from test_faults import Clock, msg, read_all, service, texts
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.errors import PartialWrite, Unavailable
from timeline.model import Copies, Kind
from timeline.service import Policy, TimelineService
from timeline.service import writing as service_module
from timeline.settings import Settings, SettingsError
from timeline.store import Store, WriteResult


class SlowWrites:
    """A real store whose every write takes `ms` of the injected clock."""

    def __init__(self, inner: Store, clock: Clock, ms: int) -> None:
        self.inner, self.backend, self.clock, self.ms = inner, inner.backend, clock, ms
        self.writes: list[int] = []  # sync copies each write carried

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        self.clock.ms += self.ms
        self.writes.append(len(sync) if sync is not None else 0)
        return self.inner.write(history, sync, *claim)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_fan_out_past_its_deadline_reports_the_members_it_did_not_write(
    redis_url: str, key_prefix: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "_WRITE_ROWS", 2)  # two members per write
    clock = Clock()
    slow = SlowWrites(store, clock, 1_000)
    svc = service(redis_url, key_prefix, slow, clock, request_deadline_ms=3_000)
    members = [f"m{i}" for i in range(8)]
    # Given writes of 1 s each and a deadline of 3 s, three writes start, then none:
    failed = svc.send_group("g", members, [msg("hi")], "hi-1")
    assert slow.writes == [2, 2, 2]
    assert failed == ["m6", "m7"]  # reported: the client retries them
    assert [texts(read_all(store, Kind.SYNC, m)) for m in members[:6]] == [["hi"]] * 6
    # The retry (same client_msg_id) writes what is missing, where it belongs, once.
    slow.ms = 0
    assert svc.send_group("g", members, [msg("hi")], "hi-1") == []
    for member in members:
        assert [(e.seq, texts([e])) for e in read_all(store, Kind.SYNC, member)] == [(1, ["hi"])]
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["hi"]


def test_a_request_out_of_time_before_its_history_copy_is_a_503(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    svc = service(redis_url, key_prefix, store, clock, request_deadline_ms=3_000)

    class LateAllocation:
        """The allocation's reply arrives after the whole deadline (a Redis stall)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def allocate(self, *args: Any, **kwargs: Any) -> Any:
            clock.ms += 3_000
            return self.inner.allocate(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    svc = TimelineService(LateAllocation(svc.allocator), store, svc.policy, clock)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="ran out of time"):
        svc.send("a", "b", [msg("late")])
    assert read_all(store, Kind.HISTORY, "a:b") == []
    assert read_all(store, Kind.SYNC, "b") == []


class FailingSync:
    """Stores the history copy, then fails every sync write (as a store going down)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.backend = inner, inner.backend

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        if history is not None:
            self.inner.write(history, None, *claim)
        raise PartialWrite("injected: the sync copies failed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_backoff_never_sleeps_past_the_deadline(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.ms += int(seconds * 1000)

    allocator = Allocator(StandaloneRedis(connect_redis(redis_url, Settings())), key_prefix)
    policy = Policy(request_deadline_ms=3_000, write_attempts=10, retry_backoff_ms=1_000)
    svc = TimelineService(allocator, FailingSync(store), policy, clock_ms=clock, sleep=sleep)
    assert svc.send_group("g", ["a"], [msg("m")]) == ["a"]
    # 1 s, then 2 s would end past the 3 s deadline: the request stops and reports instead.
    assert slept == [1.0]
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["m"]


def test_the_gap_grace_must_cover_the_deadline_and_the_longest_write() -> None:
    Settings(request_deadline_ms=3_000, gap_grace_ms=6_000).validate()
    with pytest.raises(SettingsError, match="gap_grace_ms must be at least 6000"):
        Settings(request_deadline_ms=3_000, gap_grace_ms=5_999).validate()
    with pytest.raises(SettingsError, match="at least 9000"):
        Settings(mongo_operation_timeout_ms=5_000, gap_grace_ms=8_000).validate()


def test_a_hole_left_by_a_writer_that_died_blocks_readers_only_for_the_grace(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    svc = service(redis_url, key_prefix, store, clock)
    grace = svc.policy.gap_grace_ms
    put(store, Kind.SYNC, "b", 1, msg("one"), clock.ms, "m1")
    # 2 was allocated to a writer killed before it stored it; 3 came after.
    put(store, Kind.SYNC, "b", 3, msg("three"), clock.ms, "m3")
    clock.ms += grace - 1
    assert texts(svc.sync("b", 1, 10).entries) == []  # 2 may still be in flight
    clock.ms += 1
    assert texts(svc.sync("b", 1, 10).entries) == ["three"]  # sealed and stepped over
    assert grace == Settings().gap_grace_ms == 6_000
