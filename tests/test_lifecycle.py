"""The timeline lifecycle, on both stores: ack, minSeq, retention, backward history, batches
and timestamps. A go-timeline client never uses these and sees the old behaviour."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from support import put
from timeline.factory import create_app
from timeline.model import Entry, Kind, Message
from timeline.settings import Settings
from timeline.store import Purger, Store
from timeline.store.mongo import PURGE_INDEX_NAME, TTL_INDEX_NAME, MongoStore
from timeline.store.sqlite import SQLiteStore


def post(client: Any, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body))


def send(client: Any, sender: str, receiver: str, text: str) -> Any:
    return post(client, "/timeline/send", {"from": sender, "to": receiver, "message": {"t": text}})


def sync(client: Any, member: str, last_read: int = 0, count: int = 100) -> Any:
    reply = client.get(f"/timeline/sync?member={member}&last_read={last_read}&count={count}")
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply.get_json()


def seqs(entries: list[dict[str, str]]) -> list[int]:
    return [int(e["sequence"]) for e in entries]


def texts(entries: list[dict[str, str]]) -> list[str]:
    return [json.loads(e["message"])["t"] for e in entries]


def ack(client: Any, member: str, seq: Any) -> Any:
    return post(client, "/timeline/ack", {"member": member, "seq": seq})


# --- ack and minSeq --------------------------------------------------------------------------


def test_ack_removes_exactly_the_acked_sync_entries(client: Any, store: Store) -> None:
    for i in range(5):
        send(client, "a", "b", f"m{i}")
    reply = ack(client, "b", "3")
    assert reply.status_code == 200
    assert reply.get_json() == {"minSeq": "4"}

    body = sync(client, "b")
    assert seqs(body["entrySet"]) == [4, 5]
    assert body["minSeq"] == "4"
    assert body["latestSeq"] == "5"  # ack never changes it
    assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 100)] == [4, 5]
    # The sender's timeline and the conversation's history are untouched.
    assert seqs(sync(client, "a")["entrySet"]) == [1, 2, 3, 4, 5]
    history = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert seqs(history) == [1, 2, 3, 4, 5]


def test_ack_is_idempotent_and_takes_seq_as_number_or_string(client: Any) -> None:
    for i in range(4):
        send(client, "a", "b", f"m{i}")
    assert ack(client, "b", 2).get_json() == {"minSeq": "3"}
    assert ack(client, "b", "2").get_json() == {"minSeq": "3"}
    assert ack(client, "b", 1).get_json() == {"minSeq": "3"}  # an older ack changes nothing
    assert seqs(sync(client, "b")["entrySet"]) == [3, 4]


def test_an_ack_beyond_the_latest_acks_everything(client: Any) -> None:
    for i in range(3):
        send(client, "a", "b", f"m{i}")
    assert ack(client, "b", 99).get_json() == {"minSeq": "4"}
    body = sync(client, "b")
    assert body["entrySet"] == []
    assert (body["latestSeq"], body["minSeq"]) == ("3", "4")
    # New messages continue the sequence, and a device that had read to 3 gets them at once.
    send(client, "a", "b", "after")
    body = sync(client, "b", last_read=0)
    assert seqs(body["entrySet"]) == [4]
    assert body["minSeq"] == "4"


def test_a_new_member_has_min_seq_1(client: Any) -> None:
    assert sync(client, "nobody")["minSeq"] == "1"
    assert ack(client, "nobody", 5).get_json() == {"minSeq": "1"}


def test_a_client_behind_min_seq_can_tell_it_missed_entries(client: Any) -> None:
    for i in range(6):
        send(client, "a", "b", f"m{i}")
    ack(client, "b", 4)  # another device of b acked up to 4
    body = sync(client, "b", last_read=2)
    assert int(body["minSeq"]) > 2 + 1  # the README's rule: fall back to history
    assert seqs(body["entrySet"]) == [5, 6]


def test_acked_counters_survive_redis_losing_everything(
    client: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    for i in range(3):
        send(client, "a", "b", f"m{i}")
    ack(client, "b", 3)  # b's sync timeline holds nothing now
    redis_client.delete(*redis_client.keys(f"{key_prefix}*"))
    # The floor ack kept says where b was: no sequence is reused.
    assert send(client, "c", "b", "next").get_json() == {"sequence": "4"}


@pytest.mark.parametrize(
    "body",
    [
        {"seq": 1},
        {"member": "b"},
        {"member": "b", "seq": -1},
        {"member": "b", "seq": "x"},
        {"member": "a:b", "seq": 1},
        {"member": {"$gt": ""}, "seq": 1},
    ],
)
def test_bad_acks_are_a_400(client: Any, body: dict[str, Any]) -> None:
    send(client, "a", "b", "kept")
    reply = post(client, "/timeline/ack", body)
    assert reply.status_code == 400
    assert reply.get_json()["reason"] == "TIMELINE_INVALID_PARAM"
    assert seqs(sync(client, "b")["entrySet"]) == [1]


# --- retention -------------------------------------------------------------------------------


class Clock:
    """The service's and the purger's clock, moved by the test: no waiting on the wall clock.
    It starts at the real time, so a real MongoDB's TTL backstop (a day) never acts."""

    def __init__(self) -> None:
        self.ms = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def retained(settings: Settings, store: Store) -> Any:
    """An app whose sync entries live 2 seconds, its history forever, on a clock of the
    test's own."""
    settings = settings.replace(sync_retention_seconds=2)
    if isinstance(store, SQLiteStore):
        store = SQLiteStore(store.path, retention_ms={Kind.SYNC: 2000})
    else:
        assert isinstance(store, MongoStore)
        store = MongoStore(store._database, retention_ms={Kind.SYNC: 2000})
        store.prepare()  # no write waits for the start-up thread
    app = create_app(settings, store=store)
    clock = Clock()
    service = app.extensions["timeline"]["service"]  # made anew on the test's clock, in place:
    service.__init__(service.allocator, service.store, service.policy, clock)  # the app holds it
    app.extensions["timeline"]["purger"]._clock_ms = clock
    return app, store, clock


def test_an_expired_entry_vanishes_from_sync_at_once_and_history_keeps_it(retained: Any) -> None:
    app, _, clock = retained
    client = app.test_client()
    # Given "old" sent at t and "new" at t + 1.2 s, with a retention of 2 s,
    sent = clock.ms
    send(client, "a", "b", "old")
    clock.ms += 1_200
    send(client, "a", "b", "new")
    assert texts(sync(client, "b")["entrySet"]) == ["old", "new"]
    # then "old" is returned up to the end of its 2 s,
    clock.ms = sent + 2_000
    assert texts(sync(client, "b")["entrySet"]) == ["old", "new"]

    # and not a millisecond longer; "new" is, and the history keeps both.
    clock.ms = sent + 2_001
    body = sync(client, "b")
    assert texts(body["entrySet"]) == ["new"]
    assert (body["minSeq"], body["latestSeq"], body["entrySetLastSeq"]) == ("2", "2", "2")
    history = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert texts(history) == ["old", "new"]

    # When both have expired, nothing is returnable and minSeq is past the latest.
    clock.ms = sent + 3_201
    body = sync(client, "b")
    assert body["entrySet"] == []
    assert (body["minSeq"], body["latestSeq"]) == ("3", "2")


def test_expired_entries_leave_the_store_soon_after(retained: Any) -> None:
    app, store, clock = retained
    client = app.test_client()
    # Given a message whose sync copies (a's and b's) expired 0.1 s ago,
    send(client, "a", "b", "old")
    clock.ms += 2_100
    # when the purge runs, then it removes both copies, once per period across workers,
    purger = app.extensions["timeline"]["purger"]
    assert purger.run_once() == 2  # a's and b's copies
    assert purger.run_once() == 0  # one claim per period: the other workers skip
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert store.read(Kind.SYNC, "b", 0, 10) == []
    assert texts_of(store.read(Kind.HISTORY, "a:b", 0, 10)) == ["old"]  # history keeps it
    # and what it removed still counts when Redis loses its counters.
    assert store.max_seqs(Kind.SYNC, ["a", "b"]) == {"a": 1, "b": 1}

    # A new message after the purge is readable at once: the floor says 1 is gone, not late.
    send(client, "a", "b", "new")
    body = sync(client, "b")
    assert texts(body["entrySet"]) == ["new"]
    assert (body["minSeq"], body["latestSeq"]) == ("2", "2")


def texts_of(entries: list[Entry]) -> list[str]:
    return [json.loads(e.message)["t"] for e in entries]


def test_mongo_removes_by_its_purge_alone_and_drops_a_ttl_index(mongo_store: MongoStore) -> None:
    # Given collections on which an earlier version made its TTL backstop, and an operator
    # another TTL index on created_at,
    database = mongo_store._database  # prepared with no retention: no purge index
    database["chat_sync"].create_index("created_at", name=TTL_INDEX_NAME, expireAfterSeconds=5)
    database["chat_history"].create_index("created_at", name="mine", expireAfterSeconds=9)
    # when the service prepares the store (a retention for sync, none for history),
    MongoStore(database, retention_ms={Kind.SYNC: 5000}).prepare()
    # then no TTL index removes entries any more: the purge alone does, by a plain index.
    sync = database["chat_sync"].index_information()
    history = database["chat_history"].index_information()
    assert TTL_INDEX_NAME not in sync
    assert "mine" not in history
    assert sync[PURGE_INDEX_NAME]["key"] == [("created_at", 1)]
    assert "expireAfterSeconds" not in sync[PURGE_INDEX_NAME]
    assert not any(list(i["key"]) == [("created_at", 1)] for i in history.values())
    # No retention any more: no index for a purge that does not run.
    MongoStore(database, retention_ms={}).prepare()
    assert PURGE_INDEX_NAME not in database["chat_sync"].index_information()


def test_entries_past_their_retention_then_redis_lost_continue_above_them(
    settings: Settings, mongo_store: MongoStore, key_prefix: str
) -> None:
    # Given a store an earlier version prepared with its TTL backstop (a day past the
    # retention), and three messages sent two days ago (mongomock applies a TTL index when
    # a collection is read: with one, they would be gone at the next read, floors unraised),
    database = mongo_store._database  # prepared with no retention: no purge index
    database["chat_sync"].create_index(
        "created_at", name=TTL_INDEX_NAME, expireAfterSeconds=2 + 86_400
    )
    store = MongoStore(database, retention_ms={Kind.SYNC: 2000})
    store.prepare()
    app = create_app(settings.replace(sync_retention_seconds=2), store=store)
    clock = Clock()
    clock.ms -= 2 * 86_400_000
    service = app.extensions["timeline"]["service"]
    service.__init__(service.allocator, service.store, service.policy, clock)
    purger = app.extensions["timeline"]["purger"]
    purger._clock_ms = clock
    client = app.test_client()
    for i in range(3):
        send(client, "a", "b", f"old{i}")
    # when they are read, then purged (the clock back at today),
    clock.ms += 2 * 86_400_000
    assert sync(client, "b")["entrySet"] == []
    assert store.max_seqs(Kind.SYNC, ["b"]) == {"b": 3}
    assert purger.run_once() == 6  # a's and b's copies
    assert database["chat_sync"].count_documents({}) == 0
    # and Redis loses every counter,
    redis_client = redis.Redis.from_url(settings.redis_url)
    for key in redis_client.scan_iter(match=key_prefix + "*"):
        redis_client.delete(key)
    # then the next message continues each timeline above what was removed, not at 1.
    send(client, "a", "b", "new")
    body = sync(client, "b")
    assert texts(body["entrySet"]) == ["new"]
    assert seqs(body["entrySet"]) == [4]
    assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10)] == [4]


def test_the_purge_runs_in_the_background(store: Store) -> None:
    if isinstance(store, MongoStore):  # told of the retention, it builds the purge's index
        store = MongoStore(store._database, retention_ms={Kind.SYNC: 1000})
        store.prepare()
    old = Message({"t": "old"}, '{"t":"old"}')
    put(store, Kind.SYNC, "b", 1, old, int(time.time() * 1000) - 5000, "m")
    purger = Purger(store, {Kind.SYNC: 1000}, 0.2, lambda: int(time.time() * 1000))
    purger.start()
    try:
        deadline = time.monotonic() + 5
        while store.read(Kind.SYNC, "b", 0, 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.read(Kind.SYNC, "b", 0, 10) == []
    finally:
        purger.stop()


# --- backward history ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/timeline/history/single/b/a", "/timeline/history/group/g"])
def test_backward_paging_walks_newest_first_to_the_first_message(client: Any, route: str) -> None:
    for i in range(7):
        if "group" in route:
            post(
                client,
                "/timeline/sendGroup",
                {"group_name": "g", "group_members": ["a"], "message": {"t": f"m{i}"}},
            )
        else:
            send(client, "a", "b", f"m{i}")
    pages = []
    before = 0
    while True:
        reply = client.get(f"{route}?direction=backward&before={before}&count=3")
        assert reply.status_code == 200
        body = reply.get_json()
        pages.append(seqs(body["entrySet"]))
        before = int(body["nextBefore"])
        if before == 0:
            break
    assert pages == [[7, 6, 5], [4, 3, 2], [1]]


def test_backward_before_is_exclusive_and_forward_stays_the_default(client: Any) -> None:
    for i in range(5):
        send(client, "a", "b", f"m{i}")
    body = client.get("/timeline/history/single/a/b?direction=backward&before=4&count=2").get_json()
    assert seqs(body["entrySet"]) == [3, 2]
    assert body["nextBefore"] == "2"
    body = client.get("/timeline/history/single/a/b?direction=backward&before=3").get_json()
    assert (seqs(body["entrySet"]), body["nextBefore"]) == ([2, 1], "0")
    forward = client.get("/timeline/history/single/a/b?last_read=3").get_json()
    assert forward == {"entrySet": forward["entrySet"]}  # no nextBefore: go-timeline's shape
    assert seqs(forward["entrySet"]) == [4, 5]


def test_backward_pages_hold_count_entries_and_name_the_next_before(client: Any) -> None:
    # Given five messages between a and b,
    for i in range(5):
        send(client, "a", "b", f"m{i}")

    def page(query: str) -> tuple[list[int], str]:
        reply = client.get(f"/timeline/history/single/a/b?direction=backward&{query}")
        assert reply.status_code == 200, reply.get_data(as_text=True)
        body = reply.get_json()
        assert set(body) == {"entrySet", "nextBefore"}
        return seqs(body["entrySet"]), body["nextBefore"]

    # when a client scrolls back with count=2, each time from the nextBefore it got,
    pages, before = [], "0"
    for _ in range(3):
        pages.append(page(f"count=2&before={before}"))
        before = pages[-1][1]
    # then it gets [5, 4] [3, 2] [1], newest first, and "0" once nothing older is left.
    assert pages == [([5, 4], "4"), ([3, 2], "2"), ([1], "0")]
    # A full page with nothing older says "0" too; one with something older names its
    # lowest sequence; count bounds every page, wherever it starts.
    assert page("count=2&before=3") == ([2, 1], "0")
    assert page("count=1") == ([5], "5")
    assert page("count=3&before=5") == ([4, 3, 2], "2")
    assert page("count=5") == ([5, 4, 3, 2, 1], "0")
    assert page("count=2&before=1") == ([], "0")


def test_a_bad_direction_is_a_400(client: Any) -> None:
    send(client, "a", "b", "kept")
    reply = client.get("/timeline/history/single/a/b?direction=sideways")
    assert reply.status_code == 400
    assert reply.mimetype == "application/json"
    assert reply.get_json() == {
        "code": 400,
        "reason": "TIMELINE_INVALID_PARAM",
        "message": "direction must be forward or backward",
        "metadata": {"field": "direction"},
    }
    # Only an unknown direction is refused: an empty one is forward, and case is ignored.
    for direction, expected in (("", [1]), ("forward", [1]), ("BACKWARD", [1])):
        body = client.get(f"/timeline/history/single/a/b?direction={direction}").get_json()
        assert seqs(body["entrySet"]) == expected, direction


# --- batches ---------------------------------------------------------------------------------


def test_a_batch_of_3_to_a_group_gives_every_member_3_contiguous_sequences_in_order(
    client: Any,
) -> None:
    send(client, "a", "c", "before")  # c is one ahead of the others
    body = {
        "group_name": "g",
        "group_members": ["a", "b", "c"],
        "messages": [{"t": "one"}, '{"t":"two"}', {"t": "three"}],
    }
    assert post(client, "/timeline/sendGroup", body).get_json() == {"failedMembers": []}
    for member, first in (("a", 2), ("b", 1), ("c", 2)):
        entries = sync(client, member, last_read=first - 1)["entrySet"]
        assert seqs(entries) == [first, first + 1, first + 2]
        assert texts(entries) == ["one", "two", "three"]
    history = client.get("/timeline/history/group/g").get_json()["entrySet"]
    assert (seqs(history), texts(history)) == ([1, 2, 3], ["one", "two", "three"])


def test_a_batch_send_replies_every_sequence_of_the_receiver(client: Any) -> None:
    send(client, "x", "b", "earlier")
    body = {"from": "a", "to": "b", "messages": [{"t": "1"}, {"t": "2"}]}
    assert post(client, "/timeline/send", body).get_json() == {
        "sequence": "3",
        "sequences": ["2", "3"],
    }


def test_a_retried_batch_is_stored_once(client: Any) -> None:
    body = {"from": "a", "to": "b", "messages": [{"t": "1"}, {"t": "2"}], "client_msg_id": "b-1"}
    first = post(client, "/timeline/send", body).get_json()
    assert post(client, "/timeline/send", body).get_json() == first
    assert seqs(sync(client, "b")["entrySet"]) == [1, 2]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": []}, 400),
        ({"messages": "not a list"}, 400),
        ({"messages": [{"t": 1}] * 101}, 400),
        ({"messages": [{"t": 1}, "not json"]}, 400),
        ({"messages": [{"t": 1}], "message": {"t": 2}}, 400),
        ({"messages": [{"t": 1}, {"$where": 1}]}, 400),
        ({"messages": [{"t": "x" * 65536}]}, 413),
    ],
)
def test_bad_batches_are_refused_whole(client: Any, body: dict[str, Any], status: int) -> None:
    reply = post(client, "/timeline/send", {"from": "a", "to": "b"} | body)
    assert reply.status_code == status
    assert sync(client, "b")["latestSeq"] == "0"


def test_a_bad_batch_message_is_named_by_its_position(client: Any) -> None:
    body = {"from": "a", "to": "b", "messages": [{"t": 1}, "[1]"]}
    assert post(client, "/timeline/send", body).get_json()["metadata"] == {"field": "messages[1]"}


def test_the_fan_out_budget_counts_every_message_of_a_batch(client: Any) -> None:
    members = [f"m{i}" for i in range(600)]
    batch = [{"t": "x" * 60_000}] * 2  # 601 x 120 KB > 64 MiB, though one message would fit
    body = {"group_name": "g", "group_members": members, "messages": batch}
    assert post(client, "/timeline/sendGroup", body).status_code == 413


# --- timestamps ------------------------------------------------------------------------------


def test_entries_carry_their_creation_time(client: Any) -> None:
    before = datetime.now(UTC)
    send(client, "a", "b", "now")
    [entry] = sync(client, "b")["entrySet"]
    stamp = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
    assert entry["timestamp"].endswith("Z")
    assert abs((stamp - before).total_seconds()) < 5
    [history] = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert history["timestamp"] == entry["timestamp"]


def test_timeline_admin_purge_runs_one_pass_raising_floors(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from timeline.admin import main

    # Given a store no service runs on, with entries past the sync retention and one within,
    path = tmp_path / "t.sqlite3"
    store = SQLiteStore(path)
    now = int(time.time() * 1000)
    old = Message({"t": "old"}, '{"t":"old"}')
    for seq in (1, 2):
        put(store, Kind.SYNC, "b", seq, old, now - 3_600_000, f"m{seq}")
    put(store, Kind.SYNC, "b", 3, old, now, "m3")
    store.close()
    monkeypatch.delenv("TIMELINE_MONGO_URI", raising=False)
    monkeypatch.setenv("TIMELINE_SQLITE_PATH", str(path))
    monkeypatch.setenv("TIMELINE_SYNC_RETENTION_SECONDS", "60")
    # when an operator's cron runs the purge, then it removes the expired ones, floors first.
    assert main(["purge"]) == 0
    assert "2 expired entries removed" in capsys.readouterr().out
    store = SQLiteStore(path)
    try:
        assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 10)] == [3]
        assert store.page(Kind.SYNC, "b", 0, 0, 0).floor == 2
    finally:
        store.close()


# --- pages in bytes ----------------------------------------------------------------------------


def test_a_page_holds_at_most_page_max_bytes_and_paging_on_gets_everything(
    settings: Settings, store: Store
) -> None:
    # Given pages of at most 2,000 bytes and messages of about 600 as JSON encodes them
    # (300 quotes, each escaped twice: in the message, then in the reply),
    client = create_app(settings.replace(page_max_bytes=2_000), store=store).test_client()
    quotes = '"' * 120
    for i in range(10):
        assert send(client, "a", "b", f"{i}{quotes}").status_code == 200
    # a sync page stops where the next entry would not fit, and entrySetLastSeq says where
    # to page on from, until everything was read, once, in order,
    seen: list[int] = []
    last_read, pages = 0, 0
    while True:
        body = sync(client, "b", last_read, count=100)
        if not body["entrySet"]:
            break
        pages += 1
        assert len(client.get(f"/timeline/sync?member=b&last_read={last_read}").data) < 2_000 + 200
        seen += seqs(body["entrySet"])
        last_read = int(body["entrySetLastSeq"])
        assert body["latestSeq"] == "10"
    assert seen == list(range(1, 11))
    assert pages >= 3
    # and so does history, both ways.
    forward = client.get("/timeline/history/single/a/b?count=100").get_json()
    assert 1 < len(forward["entrySet"]) < 10
    backward = client.get("/timeline/history/single/a/b?direction=backward&count=100").get_json()
    assert 1 < len(backward["entrySet"]) < 10
    assert backward["nextBefore"] == backward["entrySet"][-1]["sequence"]


def test_an_entry_bigger_than_a_page_is_a_page_alone(settings: Settings, store: Store) -> None:
    client = create_app(settings.replace(page_max_bytes=100), store=store).test_client()
    for i in range(3):
        send(client, "a", "b", f"{i}" + "x" * 500)
    for last_read in range(3):
        assert seqs(sync(client, "b", last_read)["entrySet"]) == [last_read + 1]
    page = client.get("/timeline/history/single/a/b?direction=backward&count=10").get_json()
    assert (seqs(page["entrySet"]), page["nextBefore"]) == ([3], "3")
