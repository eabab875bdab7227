"""Conversations, read positions, unread counts and devices over the HTTP API: what a chat
client shows first (the conversation list) and what several devices of one member share."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest
import redis

from support import release
from test_faults import threadsafe
from timeline.factory import create_app
from timeline.settings import Settings
from timeline.store import Store


def post(client: Any, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, data=orjson.dumps(body), content_type="application/json")


def send(client: Any, sender: str, receiver: str, text: str, **extra: Any) -> int:
    body = {"from": sender, "to": receiver, "message": {"t": text, "from": sender}, **extra}
    reply = post(client, "/timeline/send", body)
    assert reply.status_code == 200, reply.get_json()
    return int(reply.get_json()["sequence"])


def send_group(client: Any, group: str, members: list[str], text: str, **extra: Any) -> None:
    message = {"t": text, **({"from": extra["from"]} if "from" in extra else {})}
    body = {"group_name": group, "group_members": members, "message": message, **extra}
    reply = post(client, "/timeline/sendGroup", body)
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["failedMembers"] == []


def read(client: Any, member: str, kind: str, conversation: str, seq: Any) -> dict[str, Any]:
    body = {"member": member, "type": kind, "conversation": conversation, "seq": seq}
    reply = post(client, "/timeline/read", body)
    assert reply.status_code == 200, reply.get_json()
    return dict(reply.get_json())


def conversations(client: Any, member: str, **query: Any) -> dict[str, Any]:
    reply = client.get("/timeline/conversations", query_string={"member": member, **query})
    assert reply.status_code == 200, reply.get_json()
    return dict(reply.get_json())


def summary(client: Any, member: str) -> list[tuple[str, str, int, int, int]]:
    """(type, conversation, latestSeq, readSeq, unread) of the member's whole list."""
    out = []
    for c in conversations(client, member, count=100)["conversations"]:
        out.append(
            (c["type"], c["conversation"], int(c["latestSeq"]), int(c["readSeq"]), c["unread"])
        )
    return out


def sync(client: Any, member: str, last_read: int = 0, **query: Any) -> dict[str, Any]:
    reply = client.get(
        "/timeline/sync", query_string={"member": member, "last_read": last_read, **query}
    )
    assert reply.status_code == 200, reply.get_json()
    return dict(reply.get_json())


def ack(client: Any, member: str, seq: int, device: str | None = None) -> int:
    body: dict[str, Any] = {"member": member, "seq": seq}
    if device is not None:
        body["device"] = device
    reply = post(client, "/timeline/ack", body)
    assert reply.status_code == 200, reply.get_json()
    return int(reply.get_json()["minSeq"])


# --- the list, read positions, unread counts ------------------------------------------------


def test_the_conversation_list_with_unread_counts(client: Any) -> None:
    send(client, "alice", "bob", "hi bob")
    send(client, "bob", "alice", "hi alice")
    send(client, "bob", "alice", "how are you?")
    send_group(client, "team", ["alice", "bob", "carol"], "standup in 5", **{"from": "carol"})

    page = conversations(client, "alice")
    assert page["next"] == ""
    team, bob = page["conversations"]
    assert team["type"] == "group"
    assert team["conversation"] == "team"
    assert (team["latestSeq"], team["readSeq"], team["unread"]) == ("1", "0", 1)
    assert orjson.loads(team["lastMessage"]["message"]) == {"t": "standup in 5", "from": "carol"}
    assert team["lastMessage"]["sequence"] == "1"
    assert team["lastMessage"]["timestamp"].endswith("Z")
    # alice read her own message (seq 1), not bob's two.
    assert (bob["type"], bob["conversation"], bob["latestSeq"], bob["readSeq"], bob["unread"]) == (
        "single",
        "bob",
        "3",
        "1",
        2,
    )
    assert summary(client, "carol") == [("group", "team", 1, 1, 0)]
    assert summary(client, "bob") == [("group", "team", 1, 0, 1), ("single", "alice", 3, 3, 0)]

    assert read(client, "alice", "single", "bob", 2) == {"readSeq": "2", "unread": 1}
    assert read(client, "alice", "single", "bob", "1") == {"readSeq": "2", "unread": 1}  # not back
    assert read(client, "alice", "single", "bob", 100) == {"readSeq": "3", "unread": 0}  # clamped
    # alice replies: bob's messages before hers are read by her; her own is not unread to her.
    send(client, "alice", "bob", "fine")
    assert summary(client, "alice")[0] == ("single", "bob", 4, 4, 0)


def test_the_list_pages_by_cursor_most_recent_first(client: Any) -> None:
    for n in range(7):
        send(client, "m", f"friend{n}", f"msg {n}")
        time.sleep(0.002)  # distinct activity times (ties are ordered too; see the store tests)
    send(client, "friend2", "m", "back to you")
    names: list[str] = []
    before = ""
    pages = 0
    while True:
        query = {"count": 3, **({"before": before} if before else {})}
        page = conversations(client, "m", **query)
        names += [c["conversation"] for c in page["conversations"]]
        pages += 1
        before = page["next"]
        if not before:
            break
    assert names == ["friend2", "friend6", "friend5", "friend4", "friend3", "friend1", "friend0"]
    assert pages == 3


def test_group_messages_without_a_sender_are_unread_for_everyone(client: Any) -> None:
    send_group(client, "g", ["a", "b"], "go-timeline style: no from")
    assert summary(client, "a") == [("group", "g", 1, 0, 1)]
    assert summary(client, "b") == [("group", "g", 1, 0, 1)]


def test_sync_entries_carry_their_conversation(client: Any) -> None:
    send(client, "ann", "ben", "one")
    send_group(client, "g", ["ann", "ben"], "two", **{"from": "ben"})
    send(client, "ben", "ann", "three")
    entries = sync(client, "ann")["entrySet"]
    assert [(e["type"], e["conversation"], e["conversationSeq"]) for e in entries] == [
        ("single", "ben", "1"),
        ("group", "g", "1"),
        ("single", "ben", "2"),
    ]
    history = client.get("/timeline/history/single/ann/ben").get_json()["entrySet"]
    assert [e["message"] for e in history] == [entries[0]["message"], entries[2]["message"]]


def test_a_batch_gives_each_message_its_conversation_sequence(client: Any) -> None:
    send(client, "x", "y", "first")
    body = {"from": "y", "to": "x", "messages": [{"n": 1}, {"n": 2}, {"n": 3}]}
    assert post(client, "/timeline/send", body).status_code == 200
    entries = sync(client, "x")["entrySet"]
    assert [(e["sequence"], e["conversationSeq"]) for e in entries] == [
        ("1", "1"),
        ("2", "2"),
        ("3", "3"),
        ("4", "4"),
    ]
    assert summary(client, "x") == [("single", "y", 4, 1, 3)]
    assert summary(client, "y") == [("single", "x", 4, 4, 0)]


def test_a_retried_idempotent_send_counts_once(client: Any) -> None:
    for _ in range(3):
        send(client, "p", "q", "only once", client_msg_id="c-1")
    send_group(client, "g", ["p", "q"], "group once", client_msg_id="c-2", **{"from": "p"})
    send_group(client, "g", ["q", "p"], "group once", client_msg_id="c-2", **{"from": "p"})
    assert summary(client, "q") == [("group", "g", 1, 0, 1), ("single", "p", 1, 0, 1)]
    assert summary(client, "p") == [("group", "g", 1, 1, 0), ("single", "q", 1, 1, 0)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "single", "conversation": "b", "seq": 1}, "member"),
        ({"member": "a", "conversation": "b", "seq": 1}, "type"),
        ({"member": "a", "type": "channel", "conversation": "b", "seq": 1}, "type"),
        ({"member": "a", "type": "single", "seq": 1}, "conversation"),
        ({"member": "a", "type": "single", "conversation": "b:c", "seq": 1}, "conversation"),
        ({"member": "a", "type": "single", "conversation": "b"}, "seq"),
        ({"member": "a", "type": "single", "conversation": "b", "seq": -1}, "seq"),
        ({"member": "a", "type": "single", "conversation": "b", "seq": "x"}, "seq"),
        ({"member": "a", "type": "single", "conversation": "b", "seq": 2**63}, "seq"),
    ],
)
def test_a_bad_read_is_refused_and_changes_nothing(
    client: Any, body: dict[str, Any], field: str
) -> None:
    send(client, "b", "a", "hello")
    reply = post(client, "/timeline/read", body)
    assert reply.status_code == 400
    error = reply.get_json()
    assert error["code"] == 400
    assert error["metadata"]["field"] == field
    assert summary(client, "a") == [("single", "b", 1, 0, 1)]


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/timeline/conversations", {}, "member"),
        ("/timeline/conversations", {"member": "a", "count": -1}, "count"),
        ("/timeline/conversations", {"member": "a", "count": 10**9}, "count"),
        ("/timeline/conversations", {"member": "a", "before": "not-a-cursor!"}, "before"),
        ("/timeline/devices", {}, "member"),
        ("/timeline/sync", {"member": "a", "device": "x" * 1000}, "device"),
    ],
)
def test_bad_queries_are_refused(client: Any, path: str, query: dict[str, Any], field: str) -> None:
    reply = client.get(path, query_string=query)
    assert reply.status_code == 400, reply.get_json()
    assert reply.get_json()["metadata"]["field"] == field


def test_a_bad_sender_of_a_group_message_is_refused_and_nothing_is_stored(client: Any) -> None:
    body = {"group_name": "g", "group_members": ["a"], "message": {"t": 1}, "from": "a:b"}
    reply = post(client, "/timeline/sendGroup", body)
    assert reply.status_code == 400
    assert reply.get_json()["metadata"]["field"] == "from"
    assert summary(client, "a") == []
    assert sync(client, "a")["entrySet"] == []


# --- devices ---------------------------------------------------------------------------------


def test_one_devices_ack_does_not_release_anothers_entries(client: Any) -> None:
    for n in range(10):
        send(client, "friend", "md", f"m{n}")
    assert len(sync(client, "md", device="B")["entrySet"]) == 10  # B is seen: it holds entries
    assert len(sync(client, "md", device="A")["entrySet"]) == 10
    assert ack(client, "md", 10, "A") == 1  # B has acked nothing: nothing is released
    page = sync(client, "md", device="B")
    assert [e["sequence"] for e in page["entrySet"]] == [str(n) for n in range(1, 11)]
    assert page["minSeq"] == "1"
    assert ack(client, "md", 4, "B") == 5  # one past the lower of A's 10 and B's 4
    assert ack(client, "md", 10, "B") == 11
    assert sync(client, "md", device="B")["entrySet"] == []

    devices = client.get("/timeline/devices", query_string={"member": "md"}).get_json()["devices"]
    assert [(d["device"], d["position"]) for d in devices] == [("A", "10"), ("B", "10")]
    assert all(d["lastSeen"].endswith("Z") for d in devices)


def test_acks_to_different_points_release_below_the_lower(client: Any) -> None:
    for n in range(8):
        send(client, "f", "m2", f"{n}")
    sync(client, "m2", device="A")
    sync(client, "m2", device="B")
    assert ack(client, "m2", 6, "A") == 1
    assert ack(client, "m2", 3, "B") == 4
    assert ack(client, "m2", 8, "B") == 7


def test_an_ack_without_a_device_keeps_todays_meaning(client: Any) -> None:
    for n in range(5):
        send(client, "f", "solo", f"{n}")
    assert ack(client, "solo", 3) == 4
    assert [e["sequence"] for e in sync(client, "solo")["entrySet"]] == ["4", "5"]


def test_a_device_idle_past_the_setting_stops_holding_entries(
    settings: Settings, store: Store
) -> None:
    app = create_app(_with(settings, device_idle_seconds=1), store=store)
    client = app.test_client()
    try:
        for n in range(6):
            send(client, "f", "mi", f"{n}")
        sync(client, "mi", device="old")
        sync(client, "mi", device="new")
        assert ack(client, "mi", 6, "new") == 1  # "old" holds everything
        time.sleep(1.2)
        assert ack(client, "mi", 6, "new") == 7  # "old" is idle past the setting: released
    finally:
        release(app)


def _with(settings: Settings, **changes: Any) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, **changes).validate()


# --- right by construction, under concurrency and through Redis loss ------------------------


def test_lists_and_counts_match_the_stored_histories_through_a_flushall(
    settings: Settings, store: Store, redis_factory: Any
) -> None:
    """Three users in a group and a one-to-one conversation; sends and reads interleaved
    from several threads. Every member's list and counts must equal what a model computes
    from the stored histories and the reads made, before and after Redis loses everything."""
    server = redis_factory()
    app = create_app(_with(settings, redis_url=server.url), store=threadsafe(store))
    users = ["u1", "u2", "u3"]
    reads: dict[tuple[str, str], int] = defaultdict(int)  # (member, history id): highest read
    lock = threading.Lock()
    errors: list[BaseException] = []

    def history_id(member: str, kind: str, name: str) -> str:
        return ":".join(sorted((member, name))) if kind == "single" else name

    def worker(seed: int, rounds: int) -> None:
        rng = random.Random(seed)
        client = app.test_client()
        try:
            for n in range(rounds):
                me = rng.choice(users)
                action = rng.random()
                if action < 0.35:
                    send_group(client, "trio", users, f"{seed}-{n}", **{"from": me})
                elif action < 0.45:
                    send_group(client, "trio", users, f"{seed}-{n} anonymous")
                elif action < 0.7:
                    other = "u2" if me == "u1" else "u1"
                    send(client, me, other, f"{seed}-{n}")
                else:
                    kind, name = rng.choice(
                        [("group", "trio"), ("single", "u2" if me == "u1" else "u1")]
                    )
                    hid = history_id(me, kind, name)
                    route = "group/trio" if kind == "group" else f"single/{me}/{name}"
                    entries = client.get(f"/timeline/history/{route}").get_json()["entrySet"]
                    if not entries:
                        continue
                    seq = int(rng.choice(entries)["sequence"])  # a position it has seen
                    read(client, me, kind, name, seq)
                    with lock:
                        reads[(me, hid)] = max(reads[(me, hid)], seq)
        except BaseException as exc:
            errors.append(exc)

    def model() -> dict[str, list[tuple[str, str, int, int, int]]]:
        """From the stored histories: each member's conversations with latest, read, unread."""
        expected: dict[str, list[tuple[str, str, int, int, int]]] = {}
        client = app.test_client()
        pairs = [("u1", "u2"), ("u1", "u3"), ("u2", "u3")]
        histories = {
            "trio": client.get("/timeline/history/group/trio?count=1000").get_json()["entrySet"],
            **{
                f"{a}:{b}": client.get(f"/timeline/history/single/{a}/{b}?count=1000").get_json()[
                    "entrySet"
                ]
                for a, b in pairs
            },
        }
        conversations_of = {
            member: [("group", "trio", "trio")]
            + [
                ("single", b if a == member else a, f"{a}:{b}")
                for a, b in pairs
                if member in (a, b)
            ]
            for member in users
        }
        for member, convs in conversations_of.items():
            rows = []
            for kind, name, hid in convs:
                entries = histories[hid]
                if not entries:
                    continue
                latest = int(entries[-1]["sequence"])
                own = [
                    int(e["sequence"])
                    for e in entries
                    if orjson.loads(e["message"]).get("from") == member
                ]
                position = max([reads[(member, hid)], *own])
                unread = sum(
                    1
                    for e in entries
                    if int(e["sequence"]) > position
                    and orjson.loads(e["message"]).get("from") != member
                )
                rows.append((kind, name, latest, position, unread, int(entries[-1]["sequence"])))
            expected[member] = sorted((r[:5] for r in rows), key=lambda r: (r[0], r[1]))
        return expected

    def actual() -> dict[str, list[tuple[str, str, int, int, int]]]:
        client = app.test_client()
        return {m: sorted(summary(client, m)) for m in users}

    def run(seeds: range, rounds: int) -> None:
        threads = [threading.Thread(target=worker, args=(seed, rounds)) for seed in seeds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

    try:
        run(range(4), 40)
        assert actual() == model()
        redis.Redis.from_url(server.url).flushall()
        assert actual() == model()  # the list and counts live in the store
        run(range(4, 8), 40)
        assert actual() == model()
    finally:
        release(app)
