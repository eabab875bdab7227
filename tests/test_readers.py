"""Readers, floors and late writes: what a reader has passed is never written behind it, and
what it has read is never delivered again."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from support import put
from test_faults import Clock, FlakyStore, msg, read_all, service, texts, threadsafe
from test_repairs import PartialSync
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.store import Store


@pytest.mark.slow
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


def test_a_late_retry_of_a_partly_stored_batch_delivers_nothing_twice(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, clock = PartialSync(store), Clock()
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
    # Given rows out of creation order in rowid order: a young row (b) stored between
    # expired ones, and two retried writes (c, d) landing after it though created before,
    put(sqlite_store, Kind.SYNC, "a", 1, msg("old"), now - 10_000, "m1")
    put(sqlite_store, Kind.SYNC, "b", 1, msg("young"), now, "m2")
    put(sqlite_store, Kind.SYNC, "c", 1, msg("retried"), now - 2_000, "m3")
    put(sqlite_store, Kind.SYNC, "d", 1, msg("retried"), now - 2_000, "m4")
    put(sqlite_store, Kind.SYNC, "e", 1, msg("just young"), now - 1_000, "m5")
    # when the purge removes what was created before now - 1 s,
    removed = sqlite_store.purge(Kind.SYNC, now - 1_000)
    # then it removed and counted exactly the three expired rows,
    assert removed == 3
    for member in ("a", "c", "d"):
        assert read_all(sqlite_store, Kind.SYNC, member) == [], member
    # kept the young ones, the one created exactly at the cutoff included,
    assert texts(read_all(sqlite_store, Kind.SYNC, "b")) == ["young"]
    assert texts(read_all(sqlite_store, Kind.SYNC, "e")) == ["just young"]
    # and raised the floors of the timelines it emptied: their seq 1 is never reused.
    assert sqlite_store.max_seqs(Kind.SYNC, ["a", "c", "d"]) == {"a": 1, "c": 1, "d": 1}
    assert sqlite_store.purge(Kind.SYNC, now - 1_000) == 0  # nothing left to remove


class WritesAfterPage:
    """A real store that stores one more copy right after the n-th page is read: the write
    of a sequence the reader is about to look at lands between its page and its gap check."""

    def __init__(self, inner: Store, copy: tuple[str, int, str], after_pages: int = 1) -> None:
        self.inner, self.backend = inner, inner.backend
        self.copy, self.pages_left = copy, after_pages

    def page(self, *args: Any) -> Any:
        page = self.inner.page(*args)
        self.pages_left -= 1
        if self.pages_left == 0:
            member, seq, text = self.copy
            put(self.inner, Kind.SYNC, member, seq, msg(text), page_clock.ms, f"m-{text}")
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


page_clock = Clock()


def test_a_write_landing_between_the_page_and_the_gap_check_is_not_stepped_over(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    # Given b's 1 and 3 stored, and 2 in flight (allocated, being written),
    put(store, Kind.SYNC, "b", 1, msg("one"), page_clock.ms, "m1")
    put(store, Kind.SYNC, "b", 3, msg("three"), page_clock.ms, "m3")
    redis.Redis.from_url(redis_url).set(f"{key_prefix}seq:sync:b", 3)
    racing = WritesAfterPage(store, ("b", 2, "two"))
    svc = service(redis_url, key_prefix, racing, page_clock)
    # when 2 lands right after the reader's page (which shows 1 and 3) was read,
    page = svc.sync("b", 0, 10)
    # then the reader reads again rather than step over 2 for good.
    assert texts(page.entries) == ["one", "two", "three"]


def test_min_seq_never_passes_a_write_landing_after_the_page(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    # Given b acked through 2 (floor 2), 4 stored and 3 in flight,
    put(store, Kind.SYNC, "b", 1, msg("one"), page_clock.ms, "m1")
    put(store, Kind.SYNC, "b", 2, msg("two"), page_clock.ms, "m2")
    put(store, Kind.SYNC, "b", 4, msg("four"), page_clock.ms, "m4")
    redis.Redis.from_url(redis_url).set(f"{key_prefix}seq:sync:b", 4)
    racing = WritesAfterPage(store, ("b", 3, "three"))
    svc = service(redis_url, key_prefix, racing, page_clock)
    # when 3 lands right after the ack's page was read,
    min_seq = svc.ack("b", 2)
    # then minSeq does not tell the device that 3 is gone: it is there to be read.
    assert min_seq == 3
    assert texts(svc.sync("b", 2, 10).entries) == ["three", "four"]


def test_a_history_write_at_or_below_the_history_floor_counts_as_taken(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    # History floors come from the purge (a history retention): 1..3 expired and removed.
    svc = service(redis_url, key_prefix, store, page_clock)
    old = page_clock.ms - 10_000
    for seq in (1, 2, 3):
        put(store, Kind.HISTORY, "g", seq, msg(f"old{seq}"), old, f"o{seq}")
    assert store.purge(Kind.HISTORY, page_clock.ms - 5_000) == 3
    # A lagging counter (Redis lost, and its replica behind) hands out 2 again:
    redis.Redis.from_url(redis_url).set(f"{key_prefix}seq:history:g", 1)
    assert svc.send_group("g", ["a"], [msg("late")]) == []
    # the history copy moves above the floor, where readers look.
    assert [(e.seq, texts([e])) for e in svc.history("g", 0, 10)] == [(4, ["late"])]


def test_every_device_receives_every_message_once_and_in_order(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    """Writers send to one member from several threads through two workers (two services
    on one Redis and one store) while devices follow last_read page by page."""
    real_clock = _RealClock()
    store = threadsafe(store)  # mongomock is not thread-safe; a real server is
    workers = [service(redis_url, key_prefix, store, real_clock) for _ in range(2)]
    senders, per_sender, devices = 4, 25, 3
    total = senders * per_sender
    done = threading.Event()

    def write(sender: int) -> None:
        svc = workers[sender % 2]
        for i in range(per_sender):
            svc.send(f"s{sender}", "inbox", [msg(f"s{sender}#{i}")])

    received: list[list[tuple[int, str]]] = [[] for _ in range(devices)]

    def read(device: int) -> None:
        svc = workers[device % 2]
        last_read = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = svc.sync("inbox", last_read, 7).entries  # small pages: many boundaries
            received[device].extend((e.seq, texts([e])[0]) for e in page)
            if page:
                last_read = page[-1].seq
            elif done.is_set() and last_read == total:
                return

    readers = [threading.Thread(target=read, args=(d,)) for d in range(devices)]
    for thread in readers:
        thread.start()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(write, range(senders)))
    done.set()
    for thread in readers:
        thread.join()
    sent = {f"s{s}#{i}" for s in range(senders) for i in range(per_sender)}
    for got in received:
        assert [seq for seq, _ in got] == list(range(1, total + 1))
        assert {text for _, text in got} == sent


class _RealClock:
    """Wall-clock milliseconds: writes in flight are fresh, as in production."""

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000
