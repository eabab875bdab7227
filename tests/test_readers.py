"""Readers, floors and late writes: what a reader has passed is never written behind it, and
what it has read is never delivered again."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from test_faults import Clock, FlakyStore, msg, read_all, service, texts

from support import put
from timeline.errors import PartialWrite, Unavailable
from timeline.model import Copies, Kind, Timeline
from timeline.store import Store, WriteResult


def test_a_long_sealed_run_does_not_end_history_early(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    svc = service(redis_url, key_prefix, store, clock)
    old = clock.ms - 60_000
    put(store, Kind.HISTORY, "g", 1, msg("one"), old, "m1")
    put(store, Kind.HISTORY, "g", 2000, msg("two"), old, "m2")  # 2..1999 never stored
    assert texts(svc.history("g", 0, 10)) == ["one", "two"]  # the first reader seals 2..1999
    # Every later reader (a web client from last_read=1, or the first one retrying):
    assert texts(svc.history("g", 1, 10)) == ["two"]  # placeholders never end a page early


def test_a_lagging_counter_cannot_write_below_a_reader_that_jumped(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky, clock = FlakyStore(store), Clock()
    svc = service(redis_url, key_prefix, flaky, clock, retry_backoff_ms=0)
    flaky.fail_writes = 4
    with pytest.raises(Unavailable):  # u1: 1 allocated, never stored; the caller is told
        svc.send("u0", "u1", [msg("b")])
    svc.send("u2", "u1", [msg("c")])  # u1: 2
    clock.ms += 31_000
    assert texts(svc.sync("u1", 0, 10).entries) == ["c"]  # the reader is now at 2
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "u1")), 0)
    seq = svc.send("u3", "u1", [msg("d")])
    assert texts(svc.sync("u1", 2, 10).entries) == ["d"], seq  # moved above the floor


def test_a_lagging_counter_cannot_write_into_the_acked_range(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    for i in range(5):
        svc.send("a", "b", [msg(f"m{i}")])
    svc.ack("b", 5)
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "b")), 2)
    seq = svc.send("c", "b", [msg("late")])
    assert texts(svc.sync("b", 5, 10).entries) == ["late"], seq  # not in the acked range


def test_min_seq_does_not_claim_missed_entries_while_a_write_is_in_flight(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    svc = service(redis_url, key_prefix, store, clock)
    for i in range(3):
        svc.send("a", "b", [msg(f"m{i}")])
    svc.ack("b", 3)  # floor 3; the device has read 3
    # seq 4 allocated (in flight), seq 5 stored just now
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "b")), 5)
    put(store, Kind.SYNC, "b", 5, msg("five"), clock.ms, "m5")
    page = svc.sync("b", 3, 10)
    assert page.entries == []  # held at the fresh hole: right
    assert page.min_seq <= 3 + 1, page.min_seq  # an up-to-date client is not told it missed
    put(store, Kind.SYNC, "b", 4, msg("four"), clock.ms, "m4")  # the write lands
    assert texts(svc.sync("b", 3, 10).entries) == ["four", "five"]


class FirstOfBatch:
    """Stores the history and only the first message of each sync range, then fails."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.backend, self.broken = inner, inner.backend, True

    def write(self, history: Copies | None, sync: Copies | None) -> WriteResult:
        if not self.broken or sync is None:
            return self.inner.write(history, sync)
        if history is not None:
            self.inner.write(history, None)
        first = Copies(sync.ids, sync.firsts, sync.messages[:1], sync.created_at_ms, sync.mid)
        self.inner.write(None, first)
        raise PartialWrite("injected: failed midway through the sync copies")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_late_retry_of_a_partly_stored_batch_delivers_nothing_twice(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, clock = FirstOfBatch(store), Clock()
    svc = service(redis_url, key_prefix, partial, clock, retry_backoff_ms=0)
    batch = [msg("1"), msg("2"), msg("3")]
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]  # reported; client retries
    got = svc.sync("b", 0, 10).entries
    assert texts(got) == ["1"]  # the device has message 1
    clock.ms += 31_000
    partial.broken = False
    assert svc.send_group("g", ["b"], batch, "batch-1") == []
    later = svc.sync("b", got[-1].seq, 10).entries
    assert texts(got + later) == ["1", "2", "3"]


def test_verify_checks_what_a_partly_failed_send_group_did_store(monkeypatch: Any) -> None:
    from timeline.bench import harness

    class Fake:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
            if method == "POST":
                return 200, {"failedMembers": [body["group_members"][1]]}
            return 200, {"entrySet": [], "latestSeq": "1", "entrySetLastSeq": "0"}  # all lost

        def close(self) -> None:
            pass

    monkeypatch.setattr(harness, "Client", Fake)
    scenario = harness.Scenario("sendGroup", group_size=2)
    harness.run("http://x", scenario, concurrency=1, requests=1)
    assert harness.verify("http://x", scenario)["ok"] is False


def test_sqlite_purge_removes_only_expired_rows(sqlite_store: Any) -> None:
    now = 1_700_000_000_000
    put(sqlite_store, Kind.SYNC, "a", 1, msg("old"), now - 10_000, "m1")
    put(sqlite_store, Kind.SYNC, "b", 1, msg("young"), now, "m2")
    put(sqlite_store, Kind.SYNC, "c", 1, msg("retried"), now - 2_000, "m3")
    put(sqlite_store, Kind.SYNC, "d", 1, msg("retried"), now - 2_000, "m4")
    sqlite_store.purge(Kind.SYNC, now - 1_000)
    assert texts(read_all(sqlite_store, Kind.SYNC, "b")) == ["young"]
