"""Nothing lost, nothing duplicated: Redis losing data, pausing or dying; stores failing.

Every scenario ends the same way: each touched sync and history timeline holds exactly
1..N, and each message exactly once, in every timeline it was meant for.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from support import put
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.errors import PartialWrite, Unavailable, WriteFailed
from timeline.factory import create_app
from timeline.model import Copies, Entry, Kind, Message, Timeline
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store import Store, WriteResult

USERS = ["u0", "u1", "u2", "u3", "u4"]
GROUPS = {"g1": USERS, "g2": USERS[:3]}


class Chat:
    """Sends messages the way a careful client does: a client_msg_id, retried until stored.

    It counts what the faults did to it (attempts refused with a 503 or naming
    failedMembers, messages stored only by a retry), and a fault waits for the traffic to
    reach a point (`wait_until`): faults strike traffic in progress, never a clock.
    """

    def __init__(self, app: Any, retry_for: float = 10.0) -> None:
        self.app = app
        self.retry_for = retry_for
        self.expected: dict[tuple[Kind, str], set[str]] = defaultdict(set)
        self.progress = threading.Condition()
        self.ids = itertools.count()
        self.stored = 0  # messages stored for every recipient
        self.refused = 0  # attempts answered 503, or 200 naming failedMembers
        self.retried = 0  # messages that needed more than one attempt
        self.finished = False

    def send(self, sender: str, receiver: str) -> Any:
        text = f"{sender}>{receiver}#{next(self.ids)}"
        body = {"from": sender, "to": receiver, "message": {"text": text}, "client_msg_id": text}
        conversation = ":".join(sorted((sender, receiver)))
        recipients = {sender, receiver}
        return self._post("/timeline/send", body, text, conversation, recipients)

    def send_group(self, sender: str, group: str) -> Any:
        text = f"{sender}>{group}#{next(self.ids)}"
        members = GROUPS[group]
        body = {
            "group_name": group,
            "group_members": members,
            "message": {"text": text},
            "clientMsgId": text,
        }
        return self._post("/timeline/sendGroup", body, text, group, set(members))

    def _post(
        self, path: str, body: dict[str, Any], text: str, history: str, recipients: set[str]
    ) -> Any:
        client = self.app.test_client()
        deadline = time.monotonic() + self.retry_for
        attempts = 0
        while True:
            reply = client.post(path, data=json.dumps(body))
            attempts += 1
            done = reply.status_code == 200 and not reply.get_json().get("failedMembers")
            if done:
                break
            assert reply.status_code in (200, 503), reply.get_data(as_text=True)
            with self.progress:
                self.refused += 1
                self.progress.notify_all()
            assert time.monotonic() < deadline, f"{text} never stored: {reply.get_json()}"
            time.sleep(0.02)  # the client's pause before it retries
        with self.progress:
            self.stored += 1
            self.retried += attempts > 1
            self.expected[(Kind.HISTORY, history)].add(text)
            for member in recipients:
                self.expected[(Kind.SYNC, member)].add(text)
            self.progress.notify_all()
        return reply.get_json()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        """Wait until `condition()` holds (checked whenever the traffic moves on); False if
        the traffic ended first. The timeout is a safety net, never the trigger."""
        with self.progress:
            self.progress.wait_for(lambda: self.finished or condition(), timeout)
            return condition()

    def finish(self) -> None:
        with self.progress:
            self.finished = True
            self.progress.notify_all()

    def timelines(self) -> set[Timeline]:
        """The timelines that hold a stored message by now."""
        with self.progress:
            return {Timeline(kind, id_) for kind, id_ in self.expected}

    def verify(self, store: Store) -> None:
        """Every timeline is 1..N and holds each of its messages exactly once."""
        assert self.expected
        for (kind, timeline_id), texts in self.expected.items():
            entries = read_all(store, kind, timeline_id)
            sequences = [e.seq for e in entries]
            assert sequences == list(range(1, len(entries) + 1)), (kind, timeline_id, sequences)
            stored = [json.loads(e.message)["text"] for e in entries]
            assert sorted(stored) == sorted(texts), (kind, timeline_id)


def read_all(store: Store, kind: Kind, timeline_id: str) -> list[Entry]:
    return store.read(kind, timeline_id, 0, 100_000)


#: Messages the traffic sends: 4 workers of 15 rounds.
TRAFFIC = 60


def traffic(chat: Chat, workers: int = 4, rounds: int = TRAFFIC // 4) -> Callable[[], None]:
    def work(worker: int) -> None:
        for i in range(rounds):
            sender = USERS[(worker + i) % len(USERS)]
            if i % 3 == 0:
                chat.send_group(sender, "g1" if i % 2 else "g2")
            else:
                chat.send(sender, USERS[(worker * 7 + i) % len(USERS)])

    def run() -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(workers)))

    return run


def under(chaos: Callable[[], None], chat: Chat) -> None:
    """Run the chat's traffic while `chaos` runs beside it; chaos waits on the traffic's
    progress (chat.wait_until), and what it asserts fails the test."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            chaos()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        traffic(chat)()
    finally:
        chat.finish()
        thread.join()
    if failures:
        raise failures[0]


class Allocations:
    """Watches a service's allocator: the counters each allocation found missing (Redis lost
    them, or the timeline is new), by era (a fault starts a new one), and the replays."""

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        self.lock = threading.Lock()
        self.era = 0
        self.missing: list[tuple[int, str]] = []  # (era, counter key)
        self.replayed = 0
        real = allocator.allocate

        def allocate(timelines: Sequence[Timeline], *args: Any, **kwargs: Any) -> Any:
            allocation = real(timelines, *args, **kwargs)
            with self.lock:
                self.missing += [
                    (self.era, allocator.key(timelines[i])) for i in allocation.missing
                ]
                self.replayed += bool(allocation.replays)
            return allocation

        allocator.allocate = allocate  # type: ignore[method-assign]

    def new_era(self) -> int:
        with self.lock:
            self.era += 1
            return self.era

    def missing_since(self, era: int, timelines: set[Timeline]) -> list[str]:
        """Counters of these timelines found missing from `era` on."""
        keys = {self.allocator.key(t) for t in timelines}
        with self.lock:
            return [key for found, key in self.missing if found >= era and key in keys]


class Serialized:
    """mongomock is not thread-safe (a real server is): under traffic its calls take turns,
    which still lets requests interleave between any two store calls."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.backend = inner, inner.backend
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return method(*args, **kwargs)

        return call


def threadsafe(store: Store) -> Store:
    return Serialized(store) if getattr(store, "simulated", False) else store  # type: ignore[return-value]


@pytest.fixture
def own_redis(redis_factory: Any) -> Any:
    """A redis-server of this test's own: it gets flushed, paused and killed."""
    return redis_factory()


def make_app(own_redis: Any, store: Store, **settings: Any) -> Any:
    return create_app(Settings(redis_url=own_redis.url, **settings), store=threadsafe(store))


def watch(app: Any) -> Allocations:
    return Allocations(app.extensions["timeline"]["service"].allocator)


# --- Redis losing its data -------------------------------------------------------------------


def test_flushall_mid_run_continues_every_timeline_at_max_plus_one(
    own_redis: Any, store: Store
) -> None:
    app = make_app(own_redis, store)
    chat, allocations = Chat(app), watch(app)
    admin = redis.Redis.from_url(own_redis.url)
    repaired: list[list[str]] = []

    def flusher() -> None:
        for stored in (10, 25, 40):  # of TRAFFIC messages: each flush strikes traffic mid-run
            assert chat.wait_until(lambda n=stored: chat.stored >= n), "traffic ended early"
            used = chat.timelines()  # their counters exist: they have allocated
            admin.flushall()
            era = allocations.new_era()
            # The flush hit traffic: timelines in use had their counters seeded again.
            assert chat.wait_until(lambda e=era, u=used: bool(allocations.missing_since(e, u)))
            repaired.append(allocations.missing_since(era, used))

    under(flusher, chat)
    assert len(repaired) == 3, repaired
    assert all(repaired), repaired
    assert chat.stored == TRAFFIC
    chat.verify(store)


def test_one_lost_counter_continues_at_the_stores_max_plus_one(
    own_redis: Any, store: Store
) -> None:
    app = make_app(own_redis, store)
    chat, allocations = Chat(app), watch(app)
    for _ in range(3):
        chat.send("u0", "u1")
    allocator = app.extensions["timeline"]["service"].allocator
    admin = redis.Redis.from_url(own_redis.url)
    admin.delete(allocator.key(Timeline(Kind.SYNC, "u1")))
    era = allocations.new_era()
    assert chat.send("u2", "u1") == {"sequence": "4"}
    # The fault hit: the allocation found u1's counter missing, and no other in use.
    used = {Timeline(Kind.SYNC, "u0"), Timeline(Kind.SYNC, "u1"), Timeline(Kind.HISTORY, "u0:u1")}
    assert allocations.missing_since(era, used) == [allocator.key(Timeline(Kind.SYNC, "u1"))]
    chat.verify(store)


def test_redis_killed_and_restarted_empty_mid_run(own_redis: Any, store: Store) -> None:
    app = make_app(own_redis, store)
    chat, allocations = Chat(app), watch(app)
    outages: list[tuple[int, int]] = []  # (requests refused, counters seeded again) per kill

    def chaos() -> None:
        for stored in (10, 35):  # of TRAFFIC messages: each kill strikes traffic mid-run
            assert chat.wait_until(lambda n=stored: chat.stored >= n), "traffic ended early"
            refused, used = chat.refused, chat.timelines()
            own_redis.stop()
            era = allocations.new_era()
            # Redis stays down until the traffic has been refused a few times,
            assert chat.wait_until(lambda r=refused: chat.refused >= r + 3), "nothing refused"
            own_redis.start()  # same port, and empty: every counter is gone
            # and once it is back, the traffic has to seed the counters it had been using.
            assert chat.wait_until(lambda e=era, u=used: bool(allocations.missing_since(e, u)))
            outages.append((chat.refused - refused, len(allocations.missing_since(era, used))))

    under(chaos, chat)
    assert len(outages) == 2, outages
    assert all(refused >= 3 for refused, _ in outages), outages
    assert all(seeded > 0 for _, seeded in outages), outages
    assert chat.retried > 0
    assert chat.stored == TRAFFIC
    chat.verify(store)


# --- Redis paused or slow --------------------------------------------------------------------


def test_client_pause_longer_than_the_timeout_is_a_fast_503_and_then_recovers(
    own_redis: Any, store: Store
) -> None:
    app = make_app(own_redis, store, redis_socket_timeout_ms=300)
    chat = Chat(app)
    chat.send("u0", "u1")
    admin = redis.Redis.from_url(own_redis.url)
    client = app.test_client()

    # WRITE: scripts wait, and the admin connection can still unpause (ALL would hold it too).
    admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        started = time.monotonic()
        body = {"from": "u0", "to": "u1", "message": {"text": "paused"}, "client_msg_id": "paused"}
        reply = client.post("/timeline/send", data=json.dumps(body))
        elapsed = time.monotonic() - started
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "TIMELINE_UNAVAILABLE"
    # The bound is the behaviour: the 300 ms socket timeout, not the 10 s pause (generous
    # margin for a loaded machine).
    assert elapsed < 2.0

    # The paused allocation may still run once Redis resumes; the retry then replays it.
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.get_json() == {"sequence": "2"}
    chat.expected[(Kind.SYNC, "u1")].add("paused")
    chat.expected[(Kind.SYNC, "u0")].add("paused")
    chat.expected[(Kind.HISTORY, "u0:u1")].add("paused")
    chat.send("u1", "u0")
    chat.verify(store)


def test_pauses_mid_run_leave_every_timeline_contiguous(own_redis: Any, store: Store) -> None:
    chat = Chat(make_app(own_redis, store, redis_socket_timeout_ms=200))
    admin = redis.Redis.from_url(own_redis.url)
    refusals: list[int] = []

    def pauses() -> None:
        for stored in (10, 30, 45):  # of TRAFFIC messages: each pause strikes traffic mid-run
            assert chat.wait_until(lambda n=stored: chat.stored >= n), "traffic ended early"
            refused = chat.refused
            admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:  # paused until the traffic has been refused (timed out) a few times
                assert chat.wait_until(lambda r=refused: chat.refused >= r + 2), "nothing refused"
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
            refusals.append(chat.refused - refused)

    under(pauses, chat)
    assert len(refusals) == 3, refusals
    assert all(r >= 2 for r in refusals), refusals
    assert chat.retried > 0
    assert chat.stored == TRAFFIC
    chat.verify(store)


# --- idempotent retries ----------------------------------------------------------------------


class Gate:
    """Holds the first `parties` writes until all of them have arrived: that many attempts of
    one message are between their allocation and their write at once, and race each other
    from there. Store calls take turns (mongomock is not thread-safe)."""

    def __init__(self, inner: Store, parties: int = 0) -> None:
        self.inner, self.backend = inner, inner.backend
        self.parties = parties
        self.arrived = 0
        self.all_in = threading.Event()
        self.lock = threading.Lock()
        self.turns = threading.Lock()

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        with self.lock:
            self.arrived += 1
            held = self.arrived <= self.parties
            if self.arrived == self.parties:
                self.all_in.set()
        if held:
            self.all_in.wait(10)  # the test asserts all_in: it fails, rather than hang, if not
        with self.turns:
            return self.inner.write(history, sync, *claim)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.turns:
                return method(*args, **kwargs)

        return call


def test_racing_retries_of_one_send_store_it_once(own_redis: Any, store: Store) -> None:
    gate = Gate(store)
    app = create_app(Settings(redis_url=own_redis.url), store=gate)  # type: ignore[arg-type]
    allocations = watch(app)
    Chat(app).send("u0", "u1")
    gate.arrived, gate.parties = 0, 12
    body = json.dumps({"from": "u0", "to": "u1", "message": "{}", "client_msg_id": "same"})

    def attempt(_: int) -> Any:
        reply = app.test_client().post("/timeline/send", data=body)
        return reply.status_code, reply.get_json()

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(attempt, range(24)))
    # The race happened: 12 attempts were between allocation and write at once, and all but
    # the first allocation replayed its record.
    assert gate.all_in.is_set()
    assert allocations.replayed == 23
    assert set(map(json.dumps, replies)) == {json.dumps([200, {"sequence": "2"}])}
    assert [e.seq for e in read_all(store, Kind.SYNC, "u1")] == [1, 2]
    assert [e.seq for e in read_all(store, Kind.HISTORY, "u0:u1")] == [1, 2]


def test_racing_retries_of_one_group_message_store_it_once(own_redis: Any, store: Store) -> None:
    gate = Gate(store, parties=8)
    app = create_app(Settings(redis_url=own_redis.url), store=gate)  # type: ignore[arg-type]
    allocations = watch(app)
    members = [f"m{i}" for i in range(50)]
    body = json.dumps(
        {"group_name": "g", "group_members": members, "message": "{}", "clientMsgId": "x"}
    )
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda _: app.test_client().post("/timeline/sendGroup", data=body), range(16))
        )
    assert gate.all_in.is_set()  # 8 attempts raced from allocation to write
    assert allocations.replayed == 15
    assert {r.status_code for r in replies} == {200}
    assert {json.dumps(r.get_json()) for r in replies} == {'{"failedMembers": []}'}
    for member in members:
        assert [e.seq for e in read_all(store, Kind.SYNC, member)] == [1]
    assert [e.seq for e in read_all(store, Kind.HISTORY, "g")] == [1]


def test_a_retry_with_another_message_under_the_same_id_is_a_409(
    own_redis: Any, store: Store
) -> None:
    client = make_app(own_redis, store).test_client()
    body = {"from": "a", "to": "b", "message": {"text": "one"}, "client_msg_id": "id-1"}
    assert client.post("/timeline/send", data=json.dumps(body)).status_code == 200
    body["message"] = {"text": "two"}
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.status_code == 409
    assert reply.get_json()["reason"] == "TIMELINE_CLIENT_MSG_ID_REUSED"
    # The id is scoped to the conversation: another one may use it.
    body |= {"to": "c"}
    assert client.post("/timeline/send", data=json.dumps(body)).status_code == 200
    assert len(read_all(store, Kind.SYNC, "b")) == 1


# --- the store failing -----------------------------------------------------------------------


class FlakyStore:
    """A real store behind a switch that fails writes, whole or halfway (as MongoDB can)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.fail_writes = 0  # how many next writes fail
        self.halfway = False  # fail after storing the history and half of the sync copies
        self.sync_only = False  # the history goes through, every sync copy fails
        self.writes = 0
        self.injected = 0  # writes failed on purpose: the proof that the fault hit

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        self.writes += 1
        if self.sync_only and sync is not None:
            if history is not None and self.inner.write(history, None, *claim).history_taken:
                return WriteResult(history_taken=True)  # as MongoDB's insert_one reports it
            self.injected += 1
            raise Unavailable("injected: sync copies not stored")
        if self.fail_writes > 0:
            self.fail_writes -= 1
            self.injected += 1
            if self.halfway:
                half = None
                if sync is not None:
                    keep = len(sync.ids) // 2
                    half = dataclasses.replace(sync, ids=sync.ids[:keep], firsts=sync.firsts[:keep])
                result = self.inner.write(history, half, *claim)
                if history is not None and not result.history_taken:
                    raise PartialWrite("injected: failed after the history copy")
            raise Unavailable("injected: store write failed")
        return self.inner.write(history, sync, *claim)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def flaky(store: Store) -> FlakyStore:
    return FlakyStore(store)


def test_a_failed_first_write_is_retried_and_stored_once(own_redis: Any, flaky: FlakyStore) -> None:
    chat = Chat(make_app(own_redis, flaky))  # type: ignore[arg-type]
    flaky.fail_writes = 1
    assert chat.send_group("u0", "g1") == {"failedMembers": []}
    assert (flaky.injected, flaky.writes) == (1, 2)  # failed once, stored by the retry
    chat.verify(flaky)  # type: ignore[arg-type]


def test_a_write_failing_halfway_is_finished_by_the_retry(
    own_redis: Any, flaky: FlakyStore
) -> None:
    chat = Chat(make_app(own_redis, flaky))  # type: ignore[arg-type]
    flaky.fail_writes, flaky.halfway = 2, True
    assert chat.send_group("u1", "g1") == {"failedMembers": []}
    assert flaky.injected == 2  # both failures hit the message, halfway through its copies
    assert [e.seq for e in read_all(flaky, Kind.HISTORY, "g1")] == [1]  # type: ignore[arg-type]
    chat.send("u1", "u2")
    chat.verify(flaky)  # type: ignore[arg-type]


def test_a_store_down_for_every_attempt_is_a_503_and_the_client_retry_fills_in(
    own_redis: Any, flaky: FlakyStore
) -> None:
    app = make_app(own_redis, flaky, store_retry_backoff_ms=1, store_write_attempts=3)
    client = app.test_client()
    chat = Chat(app)
    chat.send("u0", "u1")
    flaky.fail_writes = 3
    body = {"from": "u0", "to": "u1", "message": {"text": "late"}, "client_msg_id": "late"}
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.status_code == 503
    assert reply.headers["Retry-After"] == "1"
    assert flaky.injected == 3  # every attempt of the request failed
    # The retry reuses the sequences recorded by the first attempt: no hole, no copy twice.
    assert client.post("/timeline/send", data=json.dumps(body)).get_json() == {"sequence": "2"}
    for key in ((Kind.SYNC, "u0"), (Kind.SYNC, "u1"), (Kind.HISTORY, "u0:u1")):
        chat.expected[key].add("late")
    chat.send("u1", "u0")
    chat.verify(flaky)  # type: ignore[arg-type]


def test_sync_copies_that_keep_failing_are_reported_then_filled_by_the_retry(
    own_redis: Any, flaky: FlakyStore
) -> None:
    app = make_app(own_redis, flaky, store_retry_backoff_ms=1)
    client = app.test_client()
    flaky.sync_only = True
    body = {"group_name": "g2", "group_members": GROUPS["g2"], "message": {"text": "g"}}
    body["client_msg_id"] = "g"
    reply = client.post("/timeline/sendGroup", data=json.dumps(body))
    assert reply.get_json() == {"failedMembers": GROUPS["g2"]}
    assert flaky.injected == Settings().store_write_attempts  # every attempt hit the fault
    assert [e.seq for e in read_all(flaky, Kind.HISTORY, "g2")] == [1]  # type: ignore[arg-type]

    flaky.sync_only = False
    reply = client.post("/timeline/sendGroup", data=json.dumps(body))
    assert reply.get_json() == {"failedMembers": []}
    for member in GROUPS["g2"]:
        entries = read_all(flaky, Kind.SYNC, member)  # type: ignore[arg-type]
        assert [(e.seq, json.loads(e.message)) for e in entries] == [(1, {"text": "g"})]
    assert [e.seq for e in read_all(flaky, Kind.HISTORY, "g2")] == [1]  # type: ignore[arg-type]


def test_the_store_down_at_start_does_not_stop_the_service(tmp_path: Path, own_redis: Any) -> None:
    settings = Settings(
        redis_url=own_redis.url, mongo_uri="mongodb://127.0.0.1:1/", mongo_timeout_ms=200
    )
    client = create_app(settings).test_client()
    reply = client.get("/timeline/sync?member=a")
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "TIMELINE_UNAVAILABLE"


# --- late writes, lost replies and partial writes, at the service ------------------------------


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


def msg(text: str) -> Message:
    return Message({"text": text}, json.dumps({"text": text}, separators=(",", ":")))


def service(
    redis_url: str, prefix: str, store: Any, clock: Clock, **policy: Any
) -> TimelineService:
    allocator = Allocator(StandaloneRedis(connect_redis(redis_url, Settings())), prefix)
    return TimelineService(allocator, store, Policy(**policy), clock_ms=clock, sleep=lambda _: None)


def texts(entries: Sequence[Entry]) -> list[str]:
    return [json.loads(e.message)["text"] for e in entries]


def test_a_retry_after_readers_passed_its_hole_lands_where_they_will_see_it(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky, clock = FlakyStore(store), Clock()
    svc = service(redis_url, key_prefix, flaky, clock, retry_backoff_ms=0)
    svc.send("u0", "u1", [msg("a")], "a")  # u1: 1
    flaky.fail_writes = 4
    with pytest.raises(Unavailable):  # 503: the client will retry "b" later
        svc.send("u0", "u1", [msg("b")], "b")  # u1: 2 allocated, not stored
    assert flaky.injected == 4  # every attempt failed
    svc.send("u2", "u1", [msg("c")], "c")  # u1: 3
    clock.ms += 31_000  # the client is offline for a while
    page = svc.sync("u1", 1, 10)
    assert texts(page.entries) == ["c"]  # the reader passes the hole at 2, sealing it

    assert svc.send("u0", "u1", [msg("b")], "b") == [4]  # the retry moves above the seal
    assert texts(svc.sync("u1", page.entries[-1].seq, 10).entries) == ["b"]
    assert svc.send("u0", "u1", [msg("b")], "b") == [4]  # and a further retry agrees
    assert texts(svc.sync("u1", 0, 10).entries) == ["a", "c", "b"]


def test_a_lagging_counter_cannot_write_behind_a_reader(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky, clock = FlakyStore(store), Clock()
    svc = service(redis_url, key_prefix, flaky, clock, retry_backoff_ms=0)
    svc.send("u0", "u1", [msg("a")])
    flaky.fail_writes = 4
    with pytest.raises(Unavailable):
        svc.send("u0", "u1", [msg("b")])  # u1: 2 allocated, never stored; the caller was told
    assert flaky.injected == 4
    svc.send("u2", "u1", [msg("c")])  # u1: 3
    clock.ms += 31_000
    assert [e.seq for e in svc.sync("u1", 1, 10).entries] == [3]
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "u1")), 1)
    assert svc.send("u3", "u1", [msg("d")]) == [4]  # 2 is sealed: moved above the store
    assert texts(svc.sync("u1", 3, 10).entries) == ["d"]


def test_a_lost_move_reply_without_a_record_is_reported_not_skipped(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    for i in range(3):
        svc.send("u0", "u1", [msg(f"m{i}")])
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "u1")), 1)
    real = svc.allocator.reallocate
    moves: list[Any] = []

    def lossy(*args: Any, **kwargs: Any) -> list[int]:
        moves.append(real(*args, **kwargs))  # the script ran in Redis, but its reply was lost
        raise Unavailable("reply lost")

    svc.allocator.reallocate = lossy  # type: ignore[method-assign]
    # A second move would skip the sequence the first gave: the caller is told instead.
    with pytest.raises(WriteFailed):
        svc.send("u2", "u1", [msg("x")])
    assert moves == [[4]]  # one move, whose reply was lost; never a second one
    assert [e.seq for e in read_all(store, Kind.SYNC, "u1")] == [1, 2, 3]


def test_a_write_failing_after_the_history_copy_finishes_with_every_attempt(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky = FlakyStore(store)
    svc = service(redis_url, key_prefix, flaky, Clock(), retry_budget_ms=0)
    flaky.fail_writes, flaky.halfway = 2, True
    members = ["m0", "m1", "m2", "m3"]
    # No time budget left, yet the history copy is stored: the request must not give up.
    assert svc.send_group("g", members, [msg("hello")]) == []
    assert flaky.injected == 2
    for member in members:
        assert texts(read_all(store, Kind.SYNC, member)) == ["hello"]
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["hello"]


def test_a_retry_may_list_members_and_keys_in_another_order(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    first = Message({"a": 1, "b": 2}, '{"a":1,"b":2}')
    again = Message({"b": 2, "a": 1}, '{"b":2,"a":1}')
    assert svc.send_group("g", ["x", "y", "z"], [first], "m-1") == []
    assert svc.send_group("g", ["z", "x", "y"], [again], "m-1") == []
    for member in ("x", "y", "z"):
        assert [e.seq for e in read_all(store, Kind.SYNC, member)] == [1]


def test_readers_skip_placeholders_and_keep_paging(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    clock = Clock()
    svc = service(redis_url, key_prefix, store, clock)
    old = clock.ms - 60_000
    put(store, Kind.SYNC, "r", 1, msg("one"), old, "m1")
    put(store, Kind.SYNC, "r", 9, msg("nine"), old, "m9")
    # Seven sealed sequences between 1 and 9 do not end a page of two early.
    assert texts(svc.sync("r", 0, 2).entries) == ["one", "nine"]
    assert texts(svc.sync("r", 1, 1).entries) == ["nine"]
    assert store.gap(Kind.SYNC, "r", 1, 10, 0) == (9, 7)  # 2..8 hold placeholders now


def test_a_late_retry_never_fills_its_old_holes_even_unread(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky, clock = FlakyStore(store), Clock()
    svc = service(redis_url, key_prefix, flaky, clock, retry_backoff_ms=0)
    svc.send("u0", "u1", [msg("a")], "a")
    flaky.fail_writes = 4
    with pytest.raises(Unavailable):
        svc.send("u0", "u1", [msg("b")], "b")  # u1: 2 allocated, not stored
    assert flaky.injected == 4
    svc.send("u2", "u1", [msg("c")], "c")  # u1: 3
    clock.ms += 31_000  # nobody read in between, yet a reader may have passed 2 by now
    assert svc.send("u0", "u1", [msg("b")], "b") == [4]
    assert [e.seq for e in read_all(store, Kind.SYNC, "u1")] == [1, 3, 4]
    assert store.gap(Kind.SYNC, "u1", 2, 3, 0) == (1, 1)  # the old seq 2 is sealed
    history = read_all(store, Kind.HISTORY, "u0:u1")
    assert ([e.seq for e in history], texts(history)) == ([1, 3], ["a", "b"])
    assert texts(svc.sync("u1", 0, 10).entries) == ["a", "c", "b"]  # at once: 2 is sealed


def test_a_batch_whose_range_is_taken_moves_whole_and_in_order(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    svc = service(redis_url, key_prefix, store, Clock())
    svc.send_group("g", ["a", "b"], [msg("x"), msg("y")])  # a, b: 1..2
    # Given b's counter went back to 1 (a failover to a lagging replica),
    redis.Redis.from_url(redis_url).set(svc.allocator.key(Timeline(Kind.SYNC, "b")), 1)
    # when a batch of 3 gets b's range 2..4 of which 2 is taken,
    assert svc.send_group("g", ["a", "b"], [msg("1"), msg("2"), msg("3")]) == []
    # then b's three copies all move above the store, together and in order, and the
    # range left behind is sealed: a reader gets all of them at once, without waiting.
    entries = svc.sync("b", 0, 100).entries
    assert texts(entries) == ["x", "y", "1", "2", "3"]
    assert [e.seq for e in entries] == [1, 2, 5, 6, 7]
    assert texts(svc.sync("a", 0, 100).entries) == ["x", "y", "1", "2", "3"]


def test_a_batch_failing_halfway_is_finished_in_order(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    flaky = FlakyStore(store)
    svc = service(redis_url, key_prefix, flaky, Clock())
    flaky.fail_writes, flaky.halfway = 1, True
    batch = [msg("1"), msg("2"), msg("3")]
    assert svc.send_group("g", ["a", "b", "c"], batch, "batch-1") == []
    assert flaky.injected == 1  # half the members got the batch, then the write failed
    for member in ("a", "b", "c"):
        entries = read_all(store, Kind.SYNC, member)
        assert ([e.seq for e in entries], texts(entries)) == ([1, 2, 3], ["1", "2", "3"])
