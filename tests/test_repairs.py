"""The service's repair branches, each driven for real: a store or allocator wrapper acts
between two calls of a request, and the test asserts what every timeline holds, what the
caller was told, and the repairs counted.

Where a branch needs a client to retry later than the grace period, the injected clock
moves; nothing here sleeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import redis
from prometheus_client import REGISTRY
from pymongo.errors import AutoReconnect, BulkWriteError, WriteConcernError

from support import put
from test_faults import Allocations, Clock, msg, read_all, service, texts
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.errors import PartialWrite, Unavailable
from timeline.factory import create_app
from timeline.model import Copies, Kind, Timeline
from timeline.service import TimelineService
from timeline.service import writing as service_module
from timeline.settings import Settings
from timeline.store import Store, WriteResult
from timeline.store.mongo import MongoStore

GRACE_PASSED_MS = 31_000  # a little more than the default gap_grace_ms


# --- what the tests measure -------------------------------------------------------------------


class Counted:
    """The repair and failure counters, from the moment this is made."""

    SAMPLES: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        "moved": ("timeline_sequence_repairs_total", {"repair": "moved"}),
        "seeded": ("timeline_sequence_repairs_total", {"repair": "seeded"}),
        "failed_members": ("timeline_failed_members_total", {}),
    }

    def __init__(self) -> None:
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        return {
            name: REGISTRY.get_sample_value(sample, labels) or 0.0
            for name, (sample, labels) in self.SAMPLES.items()
        }

    def __call__(self, name: str) -> int:
        return int(self._now()[name] - self.start[name])


def held(store: Store, kind: Kind, timeline_id: str) -> list[tuple[int, str]]:
    """(seq, text) of every entry a reader can get, placeholders aside."""
    return [(e.seq, texts([e])[0]) for e in read_all(store, kind, timeline_id)]


def counter(redis_url: str, allocator: Allocator, kind: Kind, id_: str) -> int | None:
    value = redis.Redis.from_url(redis_url).get(allocator.key(Timeline(kind, id_)))
    return None if value is None else int(value)


def set_counter(redis_url: str, allocator: Allocator, kind: Kind, id_: str, n: int) -> None:
    """A counter behind the store: a failover to a replica that lagged."""
    redis.Redis.from_url(redis_url).set(allocator.key(Timeline(kind, id_)), n)


# --- store and allocator wrappers -------------------------------------------------------------


class Wrapper:
    def __init__(self, inner: Store) -> None:
        self.inner, self.backend = inner, inner.backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class PartialSync(Wrapper):
    """While broken: stores the history and only the first message of each sync range, then
    fails (as a store failing midway through a bulk write)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.broken, self.injected = True, 0

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        if not self.broken or sync is None:
            return self.inner.write(history, sync, *claim)
        if history is not None:
            self.inner.write(history, None, *claim)
        first = Copies(sync.ids, sync.firsts, sync.messages[:1], sync.created_at_ms, sync.mid)
        self.inner.write(None, first)
        self.injected += 1
        raise PartialWrite("injected: failed midway through the sync copies")


class PartialHistory(Wrapper):
    """While broken: stores only the first history copy of a batch, then fails (as MongoDB's
    ordered insert_many can, midway), never getting to the sync copies."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.broken, self.injected = True, 0

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        if not self.broken or history is None:
            return self.inner.write(history, sync, *claim)
        first = Copies(
            history.ids, history.firsts, history.messages[:1], history.created_at_ms, history.mid
        )
        self.inner.write(first, None, *claim)
        self.injected += 1
        raise Unavailable("injected: failed after the first history copy")


class TakenAfterLookup(Wrapper):
    """Once the service has looked up who holds `key` (owners), another message's copy lands
    there, before the service writes it: a writer with a lagging counter got in between."""

    def __init__(self, inner: Store, kind: Kind, key: tuple[str, int]) -> None:
        super().__init__(inner)
        self.kind, self.key, self.took = kind, key, 0

    def owners(self, kind: Kind, keys: Any) -> dict[tuple[str, int], str]:
        found = self.inner.owners(kind, keys)
        if not self.took and kind is self.kind and self.key in keys:
            self.took += 1
            id_, seq = self.key
            put(self.inner, kind, id_, seq, msg("intruder"), 0, "intruder")
        return found


class TakenEveryTime(Wrapper):
    """Right before each write, another message takes the sequence the timeline's copy is
    about to go to: a counter that keeps lagging behind the store, move after move."""

    def __init__(self, inner: Store, kind: Kind, id_: str) -> None:
        super().__init__(inner)
        self.kind, self.id, self.took = kind, id_, 0

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        copies = history if self.kind is Kind.HISTORY else sync
        if copies is not None and self.id in copies.ids:
            self.took += 1
            assert self.took <= 50, "moves without a limit"  # fails the test, never hangs it
            first = copies.firsts[list(copies.ids).index(self.id)]
            put(self.inner, self.kind, self.id, first, msg("intruder"), 0, f"i{self.took}")
        return self.inner.write(history, sync, *claim)


class SealFails(Wrapper):
    """Placeholders cannot be stored (the store refuses that write), while `failing`."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.failing, self.refused = True, 0

    def seal(self, kind: Kind, keys: Any, created_at_ms: int) -> list[tuple[str, int]]:
        if self.failing:
            self.refused += 1
            raise Unavailable("injected: placeholders not stored")
        return self.inner.seal(kind, keys, created_at_ms)


class WriteLog(Wrapper):
    """Records, for every write, the (kind, id, first sequence) of each timeline's copies."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.writes: list[list[tuple[Kind, str, int]]] = []

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        attempt = []
        for kind, copies in ((Kind.HISTORY, history), (Kind.SYNC, sync)):
            if copies is not None:
                firsts = zip(copies.ids, copies.firsts, strict=True)
                attempt += [(kind, id_, first) for id_, first in firsts]
        self.writes.append(attempt)
        return self.inner.write(history, sync, *claim)


class LostReplies:
    """The allocator's moves run in Redis, but their replies are lost while `losing`."""

    def __init__(self, allocator: Allocator) -> None:
        self.losing, self.moves = True, 0
        real = allocator.reallocate

        def reallocate(*args: Any, **kwargs: Any) -> list[int]:
            lasts = real(*args, **kwargs)
            if not self.losing:
                return lasts
            self.moves += 1
            raise Unavailable("injected: the reply of the move was lost")

        allocator.reallocate = reallocate  # type: ignore[method-assign]


# --- a. a pinned copy refused where it belongs ------------------------------------------------


def test_a_pinned_copy_refused_where_it_belongs_is_reported_never_moved(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, clock = PartialSync(store), Clock()
    svc = service(redis_url, key_prefix, partial, clock, retry_backoff_ms=0)
    batch = [msg("1"), msg("2"), msg("3")]
    # Given a batch of which only b's first message was stored (b reported; client retries),
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]
    assert partial.injected == Settings().store_write_attempts
    partial.broken = False
    device = svc.sync("b", 0, 10).entries
    assert texts(device) == ["1"]  # b's device has message 1
    # and another message to b since, then a reader passing the old hole after the grace
    # period, sealing 2..3 with placeholders,
    svc.send("c", "b", [msg("other")])  # b: 4
    clock.ms += GRACE_PASSED_MS
    device += svc.sync("b", device[-1].seq, 10).entries
    assert texts(device) == ["1", "other"]
    assert store.gap(Kind.SYNC, "b", 2, 4, 0) == (2, 2)
    # when the client's retry comes,
    counted = Counted()
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]
    # then the rest of b's batch is refused where it belongs and b is reported: moving the
    # batch above would deliver message 1 a second time.
    assert counted("moved") == 0
    assert counted("failed_members") == 1
    assert held(store, Kind.SYNC, "b") == [(1, "1"), (4, "other")]
    assert svc.sync("b", device[-1].seq, 10).entries == []
    assert held(store, Kind.HISTORY, "g") == [(1, "1"), (2, "2"), (3, "3")]


class ReadThenTakenBeforeRetry(Wrapper):
    """Before the request's second write: b's device reads what the first (failed) write
    stored, and another message (a lagging counter's) takes b's sequence 2."""

    def __init__(self, inner: Store, reader: list[Any]) -> None:
        super().__init__(inner)
        self.reader, self.writes, self.device = reader, 0, []

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        self.writes += 1
        if self.writes == 2:
            self.device += self.reader[0].sync("b", 0, 10).entries
            put(self.inner, Kind.SYNC, "b", 2, msg("other"), 0, "other")
        return self.inner.write(history, sync, *claim)


def test_a_client_retry_never_moves_the_part_an_earlier_attempt_stored(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial = PartialSync(store)
    svc = service(redis_url, key_prefix, partial, Clock(), retry_backoff_ms=0)
    batch = [msg("1"), msg("2"), msg("3")]
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]  # b holds message 1 only
    partial.broken = False
    device = svc.sync("b", 0, 10).entries
    assert texts(device) == ["1"]
    put(store, Kind.SYNC, "b", 2, msg("other"), 0, "other")  # a lagging counter's message
    # The client retries at once (no grace period passed): 1 must stay where the device
    # read it; what cannot go where it belongs is reported.
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]
    device += svc.sync("b", device[-1].seq, 10).entries
    assert texts(device)[:2] == ["1", "other"]
    assert len(set(texts(device))) == len(device)  # nothing twice


def test_a_write_retried_after_failing_partway_never_moves_the_part_it_stored(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, reader = PartialSync(store), []
    racing = ReadThenTakenBeforeRetry(partial, reader)
    svc = service(redis_url, key_prefix, racing, Clock(), retry_backoff_ms=0)
    reader.append(svc)
    real = partial.write

    def fails_once(history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        partial.broken = partial.injected == 0
        return real(history, sync, *claim)

    partial.write = fails_once  # type: ignore[method-assign]
    assert svc.send_group("g", ["b"], [msg("1"), msg("2"), msg("3")], "batch-1") == ["b"]
    assert texts(racing.device) == ["1"]  # read between the two writes of the request
    device = racing.device + svc.sync("b", racing.device[-1].seq, 10).entries
    assert texts(device)[:2] == ["1", "other"]
    assert len(set(texts(device))) == len(device)  # nothing twice


# --- b. the limit on repeated moves -----------------------------------------------------------

# One write attempt: only the limit on moves can end these requests (a store failure would
# be retried write_attempts times, and each retry moves once more).


def test_a_history_copy_whose_sequences_keep_being_taken_gives_up_with_a_503(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    taken = TakenEveryTime(store, Kind.HISTORY, "g")
    svc = service(redis_url, key_prefix, taken, Clock(), write_attempts=1)
    counted = Counted()
    with pytest.raises(Unavailable, match="keep being taken by other messages"):
        svc.send_group("g", ["a"], [msg("m")])
    limit = service_module._MOVE_ROUNDS
    # Each write found its sequence taken and moved: a first time, and _MOVE_ROUNDS more.
    assert taken.took == limit + 1
    assert counted("moved") == limit + 1
    assert "m" not in texts(read_all(store, Kind.HISTORY, "g"))
    assert read_all(store, Kind.SYNC, "a") == []  # no sync copy without the history copy


def test_a_sync_copy_whose_sequences_keep_being_taken_is_reported(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    taken = TakenEveryTime(store, Kind.SYNC, "b")
    svc = service(redis_url, key_prefix, taken, Clock(), write_attempts=1)
    counted = Counted()
    assert svc.send_group("g", ["a", "b"], [msg("m")]) == ["b"]
    assert counted("moved") == service_module._MOVE_ROUNDS + 1
    assert counted("failed_members") == 1
    assert held(store, Kind.HISTORY, "g") == [(1, "m")]
    assert held(store, Kind.SYNC, "a") == [(1, "m")]
    assert "m" not in texts(read_all(store, Kind.SYNC, "b"))


# --- c. a move without a record that fails ----------------------------------------------------


def test_a_history_copy_that_cannot_be_moved_fails_the_request_storing_nothing(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    for i in range(3):
        svc.send("u0", "u1", [msg(f"m{i}")])
    set_counter(redis_url, svc.allocator, Kind.HISTORY, "u0:u1", 1)
    lost = LostReplies(svc.allocator)
    # The move's reply is lost: a second move could skip the sequence the first one took,
    # and no record tells which it was. The caller is told instead, and nothing is stored.
    with pytest.raises(Unavailable, match="history sequence could not be moved"):
        svc.send("u0", "u1", [msg("x")])  # no client_msg_id: no record
    assert lost.moves == 1
    before = [(1, "m0"), (2, "m1"), (3, "m2")]
    assert held(store, Kind.HISTORY, "u0:u1") == before
    assert held(store, Kind.SYNC, "u0") == before
    assert held(store, Kind.SYNC, "u1") == before
    # The lost move did take 4: the next message continues above it, never below.
    assert counter(redis_url, svc.allocator, Kind.HISTORY, "u0:u1") == 4
    lost.losing = False
    # The sync sequences x was given (4) were never written to (its history copy came
    # first): given back before it answered, so y takes them, and no sync timeline keeps a
    # hole.
    assert svc.send("u0", "u1", [msg("y")]) == [4]
    assert held(store, Kind.HISTORY, "u0:u1") == [*before, (5, "y")]
    assert held(store, Kind.SYNC, "u1") == [*before, (4, "y")]


def test_sync_copies_that_cannot_be_moved_are_reported(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    for i in range(3):
        svc.send_group("g", ["a", "b"], [msg(f"m{i}")])
    set_counter(redis_url, svc.allocator, Kind.SYNC, "b", 1)
    lost = LostReplies(svc.allocator)
    counted = Counted()
    assert svc.send_group("g", ["a", "b"], [msg("x")]) == ["b"]
    assert lost.moves == 1  # one move, its reply lost; never a second one
    assert counted("failed_members") == 1
    before = [(1, "m0"), (2, "m1"), (3, "m2")]
    assert held(store, Kind.HISTORY, "g") == [*before, (4, "x")]
    assert held(store, Kind.SYNC, "a") == [*before, (4, "x")]
    assert held(store, Kind.SYNC, "b") == before


# --- d. a move with a record that fails -------------------------------------------------------


@pytest.fixture
def fast_retries(settings: Settings) -> Settings:
    return dataclasses.replace(settings, store_retry_backoff_ms=1)


def test_a_failed_move_with_a_record_is_a_503_and_the_retry_finishes_it_once(
    fast_retries: Settings, store: Store, redis_url: str
) -> None:
    app = create_app(fast_retries, store=store)
    svc = app.extensions["timeline"]["service"]
    client = app.test_client()
    for i in range(3):
        body = {"from": "u0", "to": "u1", "message": {"text": f"m{i}"}}
        reply = client.post("/timeline/send", json=body)
        assert reply.get_json() == {"sequence": str(i + 1)}
    set_counter(redis_url, svc.allocator, Kind.HISTORY, "u0:u1", 1)
    lost = LostReplies(svc.allocator)
    body = {"from": "u0", "to": "u1", "message": {"text": "x"}, "client_msg_id": "x-1"}
    # Every attempt finds the history sequence taken and moves it; every reply is lost.
    reply = client.post("/timeline/send", json=body)
    assert reply.status_code == 503
    assert reply.headers["Retry-After"] == "1"
    assert reply.get_json()["reason"] == "TIMELINE_UNAVAILABLE"
    assert lost.moves == fast_retries.store_write_attempts
    assert len(read_all(store, Kind.HISTORY, "u0:u1")) == 3  # nothing of x stored
    # The client's retry finds the record the first move kept: x lands once, at 4.
    lost.losing = False
    assert client.post("/timeline/send", json=body).get_json() == {"sequence": "4"}
    assert client.post("/timeline/send", json=body).get_json() == {"sequence": "4"}
    history = read_all(store, Kind.HISTORY, "u0:u1")
    assert [e.seq for e in history] == [1, 2, 3, 4]
    assert texts(history[3:]) == ["x"]
    for member in ("u0", "u1"):
        assert [e.seq for e in read_all(store, Kind.SYNC, member)] == [1, 2, 3, 4]
    # Later moves of the same message agreed on that one sequence: nothing skipped.
    client.post("/timeline/send", json={"from": "u1", "to": "u0", "message": {"text": "next"}})
    assert [e.seq for e in read_all(store, Kind.HISTORY, "u0:u1")] == [1, 2, 3, 4, 5]


def test_a_failed_move_of_a_sync_copy_with_a_record_is_reported_then_finished_once(
    fast_retries: Settings, store: Store, redis_url: str
) -> None:
    app = create_app(fast_retries, store=store)
    svc = app.extensions["timeline"]["service"]
    client = app.test_client()
    group = {"group_name": "g", "group_members": ["a", "b"]}
    for i in range(3):
        reply = client.post("/timeline/sendGroup", json=group | {"message": {"text": f"m{i}"}})
        assert reply.get_json() == {"failedMembers": []}
    set_counter(redis_url, svc.allocator, Kind.SYNC, "b", 1)
    lost = LostReplies(svc.allocator)
    body = group | {"message": {"text": "x"}, "client_msg_id": "x-1"}
    assert client.post("/timeline/sendGroup", json=body).get_json() == {"failedMembers": ["b"]}
    assert lost.moves == fast_retries.store_write_attempts  # every attempt, every reply lost
    lost.losing = False
    assert client.post("/timeline/sendGroup", json=body).get_json() == {"failedMembers": []}
    assert [e.seq for e in read_all(store, Kind.SYNC, "b")] == [1, 2, 3, 4]
    assert texts(read_all(store, Kind.SYNC, "b")) == ["m0", "m1", "m2", "x"]
    assert texts(read_all(store, Kind.SYNC, "a")) == ["m0", "m1", "m2", "x"]
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["m0", "m1", "m2", "x"]


# --- e. a fill whose slot another message took ------------------------------------------------


def test_a_fill_whose_sequence_another_message_took_is_given_up_and_reported(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, clock = PartialSync(store), Clock()
    svc = service(redis_url, key_prefix, partial, clock, retry_backoff_ms=0)
    batch = [msg("1"), msg("2"), msg("3")]
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]  # b holds message 1 only
    partial.broken = False
    clock.ms += GRACE_PASSED_MS  # a late retry: what is stored stays, the rest goes after it
    racing = TakenAfterLookup(partial, Kind.SYNC, ("b", 2))
    svc = service(redis_url, key_prefix, racing, clock, retry_backoff_ms=0)
    counted = Counted()
    assert svc.send_group("g", ["b"], batch, "batch-1") == ["b"]
    assert racing.took == 1  # b's 2 was taken between the lookup and the fill
    assert counted("moved") == 0  # given up where it belongs, never moved
    assert counted("failed_members") == 1
    assert held(store, Kind.SYNC, "b") == [(1, "1"), (2, "intruder")]
    assert held(store, Kind.HISTORY, "g") == [(1, "1"), (2, "2"), (3, "3")]


def test_a_history_fill_another_message_took_is_a_503_and_delivers_nothing_twice(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    partial, clock = PartialHistory(store), Clock()
    svc = service(redis_url, key_prefix, partial, clock, retry_backoff_ms=0)
    batch = [msg("1"), msg("2"), msg("3")]
    with pytest.raises(Unavailable):  # only the history's first copy got stored
        svc.send_group("g", ["b"], batch, "batch-1")
    assert partial.injected == Settings().store_write_attempts
    partial.broken = False
    clock.ms += GRACE_PASSED_MS
    racing = TakenAfterLookup(partial, Kind.HISTORY, ("g", 2))
    svc = service(redis_url, key_prefix, racing, clock, retry_backoff_ms=0)
    with pytest.raises(Unavailable, match="history copies could not all be stored"):
        svc.send_group("g", ["b"], batch, "batch-1")
    assert racing.took == 1
    assert held(store, Kind.HISTORY, "g") == [(1, "1"), (2, "intruder")]
    # b's copies, none stored before, moved above the range its first attempt left, once:
    delivered = [(4, "1"), (5, "2"), (6, "3")]
    assert held(store, Kind.SYNC, "b") == delivered
    # A further retry is told the same and stores nothing twice.
    with pytest.raises(Unavailable, match="history copies could not all be stored"):
        svc.send_group("g", ["b"], batch, "batch-1")
    assert held(store, Kind.SYNC, "b") == delivered
    assert held(store, Kind.HISTORY, "g") == [(1, "1"), (2, "intruder")]


# --- f. sealing that fails --------------------------------------------------------------------


def test_a_seal_failing_after_a_move_is_suppressed_and_readers_seal_later(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    sealing, clock = SealFails(store), Clock()
    backoffs: list[float] = []
    allocator = Allocator(StandaloneRedis(connect_redis(redis_url, Settings())), key_prefix)
    svc = TimelineService(allocator, sealing, clock_ms=clock, sleep=backoffs.append)  # type: ignore[arg-type]
    svc.send_group("g", ["a", "b"], [msg("x"), msg("y")])  # a, b: 1..2
    set_counter(redis_url, svc.allocator, Kind.SYNC, "b", 1)
    # b's batch of 3 gets 2..4, of which 2 is taken: it moves to 5..7; sealing 3..4 fails,
    assert svc.send_group("g", ["a", "b"], [msg("1"), msg("2"), msg("3")]) == []
    assert sealing.refused == 1
    assert backoffs == []  # not taken for a failed write: nothing retried, nothing reported
    assert store.gap(Kind.SYNC, "b", 3, 5, 0) == (0, 0)  # left unsealed
    assert [e.seq for e in read_all(store, Kind.SYNC, "b")] == [1, 2, 5, 6, 7]
    # so readers wait at the hole for the grace period, as for a write in flight,
    assert texts(svc.sync("b", 0, 10).entries) == ["x", "y"]
    # and then seal it themselves and step over.
    sealing.failing = False
    clock.ms += GRACE_PASSED_MS
    assert texts(svc.sync("b", 2, 10).entries) == ["1", "2", "3"]
    assert store.gap(Kind.SYNC, "b", 3, 5, 0) == (2, 2)


def test_a_reader_that_cannot_seal_a_hole_never_steps_over_it(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    sealing, clock = SealFails(store), Clock()
    svc = service(redis_url, key_prefix, sealing, clock)
    old = clock.ms - 60_000
    put(store, Kind.SYNC, "b", 1, msg("one"), old, "m1")
    put(store, Kind.SYNC, "b", 3, msg("three"), old, "m3")  # 2: allocated, never written
    # The hole is older than the grace period, but it cannot be sealed: the reader hands
    # out what comes before it, and stops there.
    page = svc.sync("b", 0, 10)
    assert texts(page.entries) == ["one"]
    assert sealing.refused == 1
    assert store.gap(Kind.SYNC, "b", 2, 3, 0) == (0, 0)
    assert svc.sync("b", 1, 10).entries == []  # nor does the next read step over it
    assert sealing.refused == 2
    # A write that arrives even later lands in the hole, and the reader gets it.
    put(store, Kind.SYNC, "b", 2, msg("two"), clock.ms, "m2")
    assert texts(svc.sync("b", 1, 10).entries) == ["two", "three"]


# --- g. a counter behind the store, and latestSeq ---------------------------------------------


def test_latest_seq_is_never_below_the_last_entry_returned(
    client: Any, app: Any, redis_url: str
) -> None:
    for i in range(3):
        body = {"from": "a", "to": "b", "message": {"text": f"m{i}"}}
        assert client.post("/timeline/send", json=body).get_json() == {"sequence": str(i + 1)}
    allocator = app.extensions["timeline"]["service"].allocator
    # Given b's counter went back to 1 (a failover to a replica that lagged),
    set_counter(redis_url, allocator, Kind.SYNC, "b", 1)
    sync = client.get("/timeline/sync?member=b").get_json()
    # then latestSeq is the last entry's sequence, not the counter's.
    assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2", "3"]
    assert (sync["latestSeq"], sync["entrySetLastSeq"]) == ("3", "3")
    # A short page says how far the store goes, so that a client keeps paging.
    sync = client.get("/timeline/sync?member=b&count=2").get_json()
    assert (sync["latestSeq"], sync["entrySetLastSeq"]) == ("3", "2")
    # Given the counter gone altogether (Redis lost it), the store tells.
    redis.Redis.from_url(redis_url).delete(allocator.key(Timeline(Kind.SYNC, "b")))
    sync = client.get("/timeline/sync?member=b&last_read=3").get_json()
    assert (sync["entrySet"], sync["latestSeq"]) == ([], "3")


# --- 3. the allocator never allocates on a missing counter ------------------------------------


def test_a_lost_counter_is_seeded_before_allocating_so_the_first_write_lands_above(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    log = WriteLog(store)
    svc = service(redis_url, key_prefix, log, Clock())
    for i in range(3):
        svc.send("u0", "u1", [msg(f"m{i}")])
    # Given u1's counter lost (the store holds 1..3),
    redis.Redis.from_url(redis_url).delete(svc.allocator.key(Timeline(Kind.SYNC, "u1")))
    allocations = Allocations(svc.allocator)
    log.writes.clear()
    counted = Counted()
    assert svc.send("u0", "u1", [msg("x")]) == [4]
    # the allocation reported it missing instead of allocating from 0,
    assert allocations.missing == [(0, svc.allocator.key(Timeline(Kind.SYNC, "u1")))]
    assert counted("seeded") == 1
    # so the first write went straight to 4 (allocated from 0, it would have gone to 1,
    # found it taken and moved).
    assert log.writes == [[(Kind.HISTORY, "u0:u1", 4), (Kind.SYNC, "u0", 4), (Kind.SYNC, "u1", 4)]]
    assert counted("moved") == 0
    assert counter(redis_url, svc.allocator, Kind.SYNC, "u1") == 4
    assert held(store, Kind.SYNC, "u1") == [(1, "m0"), (2, "m1"), (3, "m2"), (4, "x")]


# --- i, j. MongoDB's driver errors ------------------------------------------------------------

_CONCERN_FAILED: dict[str, Any] = {
    "code": 64,
    "codeName": "WriteConcernFailed",
    "errmsg": "waiting for replication timed out",
    "errInfo": {"wtimeout": True},
}


class SyncInserts:
    """The mongo store's sync collection, its next `failing` insert_many calls failing as the
    driver reports them: with `lose` set, the document at that position is not stored and
    comes back as a non-duplicate write error (the others are, as an unordered insert does);
    otherwise every document is stored and a write concern error comes back."""

    def __init__(self, store: MongoStore, failing: int, lose: int | None = None) -> None:
        self.inner = store._collections[Kind.SYNC]
        self.failing, self.lose, self.injected, self.calls = failing, lose, 0, 0
        store._collections[Kind.SYNC] = self  # type: ignore[assignment]

    def insert_many(self, documents: Any, ordered: bool = True, **kwargs: Any) -> Any:
        self.calls += 1
        if not self.failing:
            return self.inner.insert_many(documents, ordered=ordered, **kwargs)
        self.failing -= 1
        self.injected += 1
        documents = list(documents)
        kept = [i for i in range(len(documents)) if i != self.lose]
        errors: list[dict[str, Any]] = []
        try:
            self.inner.insert_many([documents[i] for i in kept], ordered=False, **kwargs)
        except BulkWriteError as exc:  # duplicates: what an earlier attempt stored
            errors = [e | {"index": kept[e["index"]]} for e in exc.details["writeErrors"]]
        concern: list[dict[str, Any]] = []
        if self.lose is None:
            concern = [_CONCERN_FAILED]
        else:
            errors.append({"index": self.lose, "code": 91, "errmsg": "injected: shutting down"})
        raise BulkWriteError(
            {
                "writeErrors": sorted(errors, key=lambda e: e["index"]),
                "writeConcernErrors": concern,
                "nInserted": len(kept) - len(errors) + (self.lose is not None),
            }
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HistoryInserts:
    """The mongo store's history collection: its first insert_one stores the document and
    reports a write concern error; the `down` next ones fail as a lost connection does."""

    def __init__(self, store: MongoStore, down: int = 0) -> None:
        self.inner = store._collections[Kind.HISTORY]
        self.concern, self.down, self.injected, self.calls = True, down, 0, 0
        store._collections[Kind.HISTORY] = self  # type: ignore[assignment]

    def insert_one(self, document: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.concern:
            self.concern = False
            self.injected += 1
            self.inner.insert_one(document, **kwargs)
            raise WriteConcernError(_CONCERN_FAILED["errmsg"], 64, _CONCERN_FAILED)
        if self.down:
            self.down -= 1
            self.injected += 1
            raise AutoReconnect("injected: connection reset")
        return self.inner.insert_one(document, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_mongo_failing_after_the_history_copy_is_retried_and_finished(
    redis_url: str, key_prefix: str, mongo_store: MongoStore
) -> None:
    inserts = SyncInserts(mongo_store, failing=1, lose=1)  # b's copy not stored
    # No time budget: the request goes on only because the store said the history copy is
    # stored (PartialWrite); before that, it would give up at once.
    svc = service(redis_url, key_prefix, mongo_store, Clock(), retry_budget_ms=0)
    counted = Counted()
    assert svc.send_group("g", ["a", "b", "c"], [msg("hi")]) == []
    assert (inserts.injected, inserts.calls) == (1, 2)  # failed once, then retried
    assert counted("moved") == 0  # a's and c's copies were found stored, as its own
    for member in ("a", "b", "c"):
        assert held(mongo_store, Kind.SYNC, member) == [(1, "hi")]
    assert held(mongo_store, Kind.HISTORY, "g") == [(1, "hi")]


def test_mongo_failing_after_the_history_copy_on_every_attempt_is_reported(
    redis_url: str, key_prefix: str, mongo_store: MongoStore
) -> None:
    inserts = SyncInserts(mongo_store, failing=Settings().store_write_attempts, lose=1)
    svc = service(redis_url, key_prefix, mongo_store, Clock(), retry_budget_ms=0)
    failed = svc.send_group("g", ["a", "b", "c"], [msg("hi")], "hi-1")
    assert inserts.injected == Settings().store_write_attempts
    # The driver cannot say which copies of the failed bulk insert went in: b, which did
    # not, is reported (those that may have are too: the retry sorts them out).
    assert "b" in failed
    assert set(failed) <= {"a", "b", "c"}
    assert held(mongo_store, Kind.SYNC, "b") == []
    assert svc.send_group("g", ["a", "b", "c"], [msg("hi")], "hi-1") == []
    for member in ("a", "b", "c"):
        assert held(mongo_store, Kind.SYNC, member) == [(1, "hi")]
    assert held(mongo_store, Kind.HISTORY, "g") == [(1, "hi")]


def test_a_mongo_write_concern_error_on_the_sync_copies_is_retried_and_delivered_once(
    redis_url: str, key_prefix: str, mongo_store: MongoStore
) -> None:
    inserts = SyncInserts(mongo_store, failing=1)  # all stored, the majority not confirmed
    svc = service(redis_url, key_prefix, mongo_store, Clock(), retry_budget_ms=0)
    counted = Counted()
    assert svc.send_group("g", ["a", "b"], [msg("hi")]) == []
    # An unconfirmed write may be rolled back: it is written again, not taken as done.
    assert (inserts.injected, inserts.calls) == (1, 2)
    # The retry found every copy stored, by this message (its mid): nothing moved, once each.
    assert counted("moved") == 0
    for member in ("a", "b"):
        assert held(mongo_store, Kind.SYNC, member) == [(1, "hi")]
    assert held(mongo_store, Kind.HISTORY, "g") == [(1, "hi")]


def test_a_mongo_write_concern_error_on_the_history_copy_is_retried_and_delivered_once(
    redis_url: str, key_prefix: str, mongo_store: MongoStore
) -> None:
    inserts = HistoryInserts(mongo_store)
    svc = service(redis_url, key_prefix, mongo_store, Clock(), retry_backoff_ms=0)
    counted = Counted()
    assert svc.send("u0", "u1", [msg("hi")]) == [1]
    assert (inserts.injected, inserts.calls) == (1, 2)  # unconfirmed, so written again
    assert counted("moved") == 0
    assert held(mongo_store, Kind.HISTORY, "u0:u1") == [(1, "hi")]
    for member in ("u0", "u1"):
        assert held(mongo_store, Kind.SYNC, member) == [(1, "hi")]


def test_a_history_copy_stored_under_a_write_concern_error_is_the_client_retrys_own(
    redis_url: str, key_prefix: str, mongo_store: MongoStore
) -> None:
    attempts = Settings().store_write_attempts
    inserts = HistoryInserts(mongo_store, down=attempts - 1)
    svc = service(redis_url, key_prefix, mongo_store, Clock(), retry_backoff_ms=0)
    with pytest.raises(Unavailable):  # stored, unconfirmed, then the connection is lost
        svc.send("u0", "u1", [msg("hi")], "hi-1")
    assert inserts.injected == attempts
    assert held(mongo_store, Kind.HISTORY, "u0:u1") == [(1, "hi")]
    assert held(mongo_store, Kind.SYNC, "u1") == []
    # The client's retry finds the history copy stored under the same mid: its own.
    counted = Counted()
    assert svc.send("u0", "u1", [msg("hi")], "hi-1") == [1]
    assert counted("moved") == 0
    assert held(mongo_store, Kind.HISTORY, "u0:u1") == [(1, "hi")]
    for member in ("u0", "u1"):
        assert held(mongo_store, Kind.SYNC, member) == [(1, "hi")]
