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
from timeline.errors import PartialWrite, Unavailable, WriteFailed
from timeline.factory import create_app
from timeline.model import Copies, Entry, Kind, Message, Timeline
from timeline.sequence import SequenceAllocator, connect_redis
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store import Store, WriteResult

USERS = ["u0", "u1", "u2", "u3", "u4"]
GROUPS = {"g1": USERS, "g2": USERS[:3]}


class Chat:
    """Sends messages the way a careful client does: a client_msg_id, retried until stored."""

    def __init__(self, app: Any, retry_for: float = 10.0) -> None:
        self.app = app
        self.retry_for = retry_for
        self.expected: dict[tuple[Kind, str], set[str]] = defaultdict(set)
        self.lock = threading.Lock()
        self.ids = itertools.count()

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
        while True:
            reply = client.post(path, data=json.dumps(body))
            done = reply.status_code == 200 and not reply.get_json().get("failedMembers")
            if done:
                break
            assert reply.status_code in (200, 503), reply.get_data(as_text=True)
            assert time.monotonic() < deadline, f"{text} never stored: {reply.get_json()}"
            time.sleep(0.05)
        with self.lock:
            self.expected[(Kind.HISTORY, history)].add(text)
            for member in recipients:
                self.expected[(Kind.SYNC, member)].add(text)
        return reply.get_json()

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


def traffic(chat: Chat, workers: int = 4, rounds: int = 15) -> Callable[[], None]:
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


def under(chaos: Callable[[threading.Event], None], chat: Chat) -> None:
    """Run the chat's traffic while `chaos` runs beside it (told to stop when it is done)."""
    stop = threading.Event()
    thread = threading.Thread(target=chaos, args=(stop,))
    thread.start()
    try:
        traffic(chat)()
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def own_redis(redis_factory: Any) -> Any:
    """A redis-server of this test's own: it gets flushed, paused and killed."""
    return redis_factory()


def make_app(own_redis: Any, store: Store, **settings: Any) -> Any:
    return create_app(Settings(redis_url=own_redis.url, **settings), store=store)


# --- Redis losing its data -------------------------------------------------------------------


def test_flushall_mid_run_continues_every_timeline_at_max_plus_one(
    own_redis: Any, store: Store
) -> None:
    chat = Chat(make_app(own_redis, store))
    admin = redis.Redis.from_url(own_redis.url)

    def flusher(stop: threading.Event) -> None:
        while not stop.wait(0.03):
            admin.flushall()

    under(flusher, chat)
    chat.verify(store)


def test_one_lost_counter_continues_at_the_stores_max_plus_one(
    own_redis: Any, store: Store
) -> None:
    app = make_app(own_redis, store)
    chat = Chat(app)
    for _ in range(3):
        chat.send("u0", "u1")
    allocator = app.extensions["timeline"]["service"].allocator
    admin = redis.Redis.from_url(own_redis.url)
    from timeline.model import Timeline

    admin.delete(allocator.key(Timeline(Kind.SYNC, "u1")))
    assert chat.send("u2", "u1") == {"sequence": "4"}
    chat.verify(store)


def test_redis_killed_and_restarted_empty_mid_run(own_redis: Any, store: Store) -> None:
    chat = Chat(make_app(own_redis, store))

    def chaos(stop: threading.Event) -> None:
        for _ in range(2):
            time.sleep(0.15)
            own_redis.stop()
            time.sleep(0.2)
            own_redis.start()

    under(chaos, chat)
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

    admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    started = time.monotonic()
    body = {"from": "u0", "to": "u1", "message": {"text": "paused"}, "client_msg_id": "paused"}
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "TIMELINE_UNAVAILABLE"
    assert time.monotonic() - started < 1.0

    # The allocation may still run once Redis resumes; the retry then replays it.
    time.sleep(1.6)
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

    def pauses(stop: threading.Event) -> None:
        for _ in range(3):
            time.sleep(0.1)
            admin.execute_command("CLIENT", "PAUSE", 400, "ALL")

    under(pauses, chat)
    chat.verify(store)


# --- idempotent retries ----------------------------------------------------------------------


def test_racing_retries_of_one_send_store_it_once(own_redis: Any, store: Store) -> None:
    app = make_app(own_redis, store)
    Chat(app).send("u0", "u1")
    body = json.dumps({"from": "u0", "to": "u1", "message": "{}", "client_msg_id": "same"})

    def attempt(_: int) -> Any:
        reply = app.test_client().post("/timeline/send", data=body)
        return reply.status_code, reply.get_json()

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(attempt, range(24)))
    assert set(map(json.dumps, replies)) == {json.dumps([200, {"sequence": "2"}])}
    assert [e.seq for e in read_all(store, Kind.SYNC, "u1")] == [1, 2]
    assert [e.seq for e in read_all(store, Kind.HISTORY, "u0:u1")] == [1, 2]


def test_racing_retries_of_one_group_message_store_it_once(own_redis: Any, store: Store) -> None:
    app = make_app(own_redis, store)
    members = [f"m{i}" for i in range(50)]
    body = json.dumps(
        {"group_name": "g", "group_members": members, "message": "{}", "clientMsgId": "x"}
    )
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda _: app.test_client().post("/timeline/sendGroup", data=body), range(16))
        )
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

    def write(self, history: Copies | None, sync: Copies | None) -> WriteResult:
        self.writes += 1
        if self.sync_only and sync is not None:
            if history is not None and self.inner.write(history, None).history_taken:
                return WriteResult(history_taken=True)  # as MongoDB's insert_one reports it
            raise Unavailable("injected: sync copies not stored")
        if self.fail_writes > 0:
            self.fail_writes -= 1
            if self.halfway:
                half = None
                if sync is not None:
                    keep = len(sync.ids) // 2
                    half = dataclasses.replace(sync, ids=sync.ids[:keep], firsts=sync.firsts[:keep])
                result = self.inner.write(history, half)
                if history is not None and not result.history_taken:
                    raise PartialWrite("injected: failed after the history copy")
            raise Unavailable("injected: store write failed")
        return self.inner.write(history, sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def flaky(store: Store) -> FlakyStore:
    return FlakyStore(store)


def test_a_failed_first_write_is_retried_and_stored_once(own_redis: Any, flaky: FlakyStore) -> None:
    chat = Chat(make_app(own_redis, flaky))  # type: ignore[arg-type]
    flaky.fail_writes = 1
    assert chat.send_group("u0", "g1") == {"failedMembers": []}
    assert flaky.writes == 2
    chat.verify(flaky)  # type: ignore[arg-type]


def test_a_write_failing_halfway_is_finished_by_the_retry(
    own_redis: Any, flaky: FlakyStore
) -> None:
    chat = Chat(make_app(own_redis, flaky))  # type: ignore[arg-type]
    flaky.fail_writes, flaky.halfway = 2, True
    assert chat.send_group("u1", "g1") == {"failedMembers": []}
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
    assert client.get("/timeline/sync?member=a").status_code == 503


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
    allocator = SequenceAllocator(connect_redis(redis_url, Settings()), prefix)
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

    def lossy(*args: Any, **kwargs: Any) -> list[int]:
        real(*args, **kwargs)  # the script ran in Redis, but its reply was lost
        raise Unavailable("reply lost")

    svc.allocator.reallocate = lossy  # type: ignore[method-assign]
    # A second move would skip the sequence the first gave: the caller is told instead.
    with pytest.raises(WriteFailed):
        svc.send("u2", "u1", [msg("x")])
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
    for member in ("a", "b", "c"):
        entries = read_all(store, Kind.SYNC, member)
        assert ([e.seq for e in entries], texts(entries)) == ([1, 2, 3], ["1", "2", "3"])
