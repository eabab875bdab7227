"""Conversations, read positions, unread counts and devices over the gRPC API (MarkRead,
ListConversations, ListDevices; SendGroupRequest.from, AckRequest.device,
SyncMessageRequest.device, the conversation fields of sync entries): the HTTP API's
behaviour (tests/test_conversations.py), on the same Redis and store as HTTP, refused as
HTTP refuses."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from test_grpc import Grpc, failure, rfc3339, send, send_group

from support import release
from timeline.factory import create_app
from timeline.rpc.status import grpc_code
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.settings import Settings
from timeline.store import Store
from timeline.store.sqlite import SQLiteStore


@pytest.fixture
def rpc(settings: Settings, store: Store) -> Iterator[Grpc]:
    """The gRPC API on both stores, in turn."""
    served = Grpc(settings, store)
    yield served
    served.close()


@pytest.fixture
def http(settings: Settings, store: Store) -> Iterator[Any]:
    """The HTTP API on the same Redis and store as `rpc`."""
    app = create_app(settings, store=store)
    yield app.test_client()
    release(app)


def sync(stub: Any, member: str, last_read: int = 0, **fields: Any) -> Any:
    return stub.GetSyncMessage(pb.SyncMessageRequest(member=member, last_read=last_read, **fields))


def ack(stub: Any, member: str, seq: int, device: str = "") -> int:
    min_seq: int = stub.Ack(pb.AckRequest(member=member, seq=seq, device=device)).min_seq
    return min_seq


def mark_read(stub: Any, member: str, kind: str, conversation: str, seq: int) -> tuple[int, int]:
    reply = stub.MarkRead(
        pb.MarkReadRequest(member=member, type=kind, conversation=conversation, seq=seq)
    )
    return reply.read_seq, reply.unread


def conversations(stub: Any, member: str, **fields: Any) -> Any:
    return stub.ListConversations(pb.ListConversationsRequest(member=member, **fields))


def summary(stub: Any, member: str) -> list[tuple[str, str, int, int, int]]:
    """(type, conversation, latest_seq, read_seq, unread) of the member's whole list."""
    page = conversations(stub, member, count=100)
    return [
        (c.type, c.conversation, c.latest_seq, c.read_seq, c.unread) for c in page.conversations
    ]


def conversation_as_http(c: Any) -> dict[str, Any]:
    """A Conversation of a gRPC reply in the HTTP API's JSON form."""
    last = c.last_message
    return {
        "type": c.type,
        "conversation": c.conversation,
        "latestSeq": str(c.latest_seq),
        "readSeq": str(c.read_seq),
        "unread": c.unread,
        "lastMessage": (
            {"sequence": str(last.sequence), "message": last.message, "timestamp": rfc3339(last)}
            if c.HasField("last_message")
            else None
        ),
    }


def sync_entries_as_http(entries: Any) -> list[dict[str, str]]:
    """Sync entries of a gRPC reply in the HTTP API's JSON form, conversation included."""
    out = []
    for e in entries:
        item = {"sequence": str(e.sequence), "message": e.message, "timestamp": rfc3339(e)}
        if e.type:
            item |= {
                "type": e.type,
                "conversation": e.conversation,
                "conversationSeq": str(e.conversation_seq),
            }
        out.append(item)
    return out


# --- devices ---------------------------------------------------------------------------------


def test_one_devices_ack_does_not_release_anothers_entries(rpc: Grpc, http: Any) -> None:
    stub = rpc.stub
    for n in range(10):
        send(stub, "friend", "md", {"t": f"m{n}"})
    assert len(sync(stub, "md", device="B").entry_set) == 10  # B is seen: it holds entries
    assert len(sync(stub, "md", device="A").entry_set) == 10
    assert ack(stub, "md", 10, "A") == 1  # B has acked nothing: nothing is released

    page = sync(stub, "md", device="B")
    assert [e.sequence for e in page.entry_set] == list(range(1, 11))
    assert page.min_seq == 1
    assert ack(stub, "md", 4, "B") == 5  # one past the lower of A's 10 and B's 4
    assert ack(stub, "md", 10, "B") == 11
    assert list(sync(stub, "md", device="B").entry_set) == []

    devices = stub.ListDevices(pb.ListDevicesRequest(member="md")).devices
    assert [(d.device, d.position) for d in devices] == [("A", 10), ("B", 10)]
    assert all(d.HasField("last_seen") for d in devices)
    # The same devices as HTTP lists them, last seen to the millisecond
    over_http = http.get("/timeline/devices", query_string={"member": "md"}).get_json()
    assert over_http["devices"] == [
        {"device": d.device, "position": str(d.position), "lastSeen": rfc3339_of(d.last_seen)}
        for d in devices
    ]
    assert list(stub.ListDevices(pb.ListDevicesRequest(member="nobody")).devices) == []


def test_devices_named_over_one_transport_hold_entries_for_the_other(rpc: Grpc, http: Any) -> None:
    stub = rpc.stub
    for n in range(8):
        send(stub, "f", "m2", {"t": n})
    sync(stub, "m2", device="A")
    assert http.get("/timeline/sync?member=m2&device=B").status_code == 200
    assert ack(stub, "m2", 6, "A") == 1
    reply = http.post("/timeline/ack", json={"member": "m2", "seq": 3, "device": "B"})
    assert reply.get_json() == {"minSeq": "4"}
    assert ack(stub, "m2", 8, "B") == 7


def test_an_ack_without_a_device_keeps_todays_meaning(rpc: Grpc) -> None:
    stub = rpc.stub
    for n in range(5):
        send(stub, "f", "solo", {"t": n})
    assert ack(stub, "solo", 3) == 4
    assert [e.sequence for e in sync(stub, "solo").entry_set] == [4, 5]


# --- the list, read positions, unread counts ------------------------------------------------


def test_the_conversation_list_with_unread_counts(rpc: Grpc, http: Any) -> None:
    stub = rpc.stub
    send(stub, "alice", "bob", {"t": "hi bob"})
    send(stub, "bob", "alice", {"t": "hi alice"})
    send(stub, "bob", "alice", {"t": "how are you?"})
    group = send_group(
        stub, "team", ["alice", "bob", "carol"], {"t": "standup"}, **{"from": "carol"}
    )
    assert list(group.failed_members) == []

    page = conversations(stub, "alice")
    assert page.next == ""
    team, bob = page.conversations
    assert (team.type, team.conversation) == ("group", "team")
    assert (team.latest_seq, team.read_seq, team.unread) == (1, 0, 1)
    assert json.loads(team.last_message.message) == {"t": "standup"}
    assert team.last_message.sequence == 1
    assert team.last_message.HasField("timestamp")
    assert team.last_message.type == ""  # the last message carries no conversation fields
    # alice read her own message (seq 1), not bob's two.
    assert (bob.type, bob.conversation, bob.latest_seq, bob.read_seq, bob.unread) == (
        "single",
        "bob",
        3,
        1,
        2,
    )
    assert summary(stub, "carol") == [("group", "team", 1, 1, 0)]
    assert summary(stub, "bob") == [("group", "team", 1, 0, 1), ("single", "alice", 3, 3, 0)]
    # The list HTTP gives, field for field
    for member in ("alice", "bob", "carol"):
        over_http = http.get("/timeline/conversations", query_string={"member": member})
        listed = conversations(stub, member)
        assert over_http.get_json() == {
            "conversations": [conversation_as_http(c) for c in listed.conversations],
            "next": listed.next,
        }

    assert mark_read(stub, "alice", "single", "bob", 2) == (2, 1)
    assert mark_read(stub, "alice", "single", "bob", 1) == (2, 1)  # never back
    assert mark_read(stub, "alice", "single", "bob", 0) == (2, 1)  # 0 is a seq, moving nothing
    assert mark_read(stub, "alice", "single", "bob", 100) == (3, 0)  # clamped to the latest
    assert mark_read(stub, "bob", "group", "team", 1) == (1, 0)
    # A read over gRPC is the position HTTP lists, and one over HTTP the one gRPC lists
    listed = http.get("/timeline/conversations?member=alice").get_json()["conversations"]
    assert [(c["conversation"], c["readSeq"], c["unread"]) for c in listed] == [
        ("team", "0", 1),
        ("bob", "3", 0),
    ]
    body = {"member": "alice", "type": "group", "conversation": "team", "seq": "1"}
    assert http.post("/timeline/read", json=body).get_json() == {"readSeq": "1", "unread": 0}
    assert summary(stub, "alice") == [("group", "team", 1, 1, 0), ("single", "bob", 3, 3, 0)]
    # alice replies: her own message is not unread to her
    send(stub, "alice", "bob", {"t": "fine"})
    assert summary(stub, "alice")[0] == ("single", "bob", 4, 4, 0)
    assert summary(stub, "bob")[0] == ("single", "alice", 4, 3, 1)


def test_the_list_pages_by_cursor_most_recent_first(rpc: Grpc) -> None:
    stub = rpc.stub
    for n in range(7):
        send(stub, "m", f"friend{n}", {"t": f"msg {n}"})
        time.sleep(0.002)  # distinct activity times
    send(stub, "friend2", "m", {"t": "back to you"})
    names: list[str] = []
    before = ""
    pages = 0
    while True:
        page = conversations(stub, "m", count=3, before=before)
        names += [c.conversation for c in page.conversations]
        pages += 1
        before = page.next
        if not before:
            break
    assert names == ["friend2", "friend6", "friend5", "friend4", "friend3", "friend1", "friend0"]
    assert pages == 3
    assert list(conversations(stub, "nobody").conversations) == []


def test_group_messages_with_and_without_a_sender(rpc: Grpc) -> None:
    stub = rpc.stub
    send_group(stub, "g", ["a", "b"], {"t": "go-timeline style: no from"})
    assert summary(stub, "a") == [("group", "g", 1, 0, 1)]
    assert summary(stub, "b") == [("group", "g", 1, 0, 1)]
    # With `from`, the sender's position moves to its own message
    send_group(stub, "g", ["a", "b"], {"t": "from b"}, **{"from": "b"})
    assert summary(stub, "a") == [("group", "g", 2, 0, 2)]
    assert summary(stub, "b") == [("group", "g", 2, 2, 0)]


def test_sync_entries_carry_their_conversation(rpc: Grpc, http: Any) -> None:
    stub = rpc.stub
    send(stub, "ann", "ben", {"t": "one"})
    send_group(stub, "g", ["ann", "ben"], {"t": "two"}, **{"from": "ben"})
    send(stub, "ben", "ann", {"t": "three"})
    page = sync(stub, "ann")
    assert [(e.type, e.conversation, e.conversation_seq) for e in page.entry_set] == [
        ("single", "ben", 1),
        ("group", "g", 1),
        ("single", "ben", 2),
    ]
    assert [(e.type, e.conversation) for e in sync(stub, "ben").entry_set] == [
        ("single", "ann"),
        ("group", "g"),
        ("single", "ann"),
    ]
    # As HTTP has them
    over_http = http.get("/timeline/sync?member=ann").get_json()["entrySet"]
    assert over_http == sync_entries_as_http(page.entry_set)
    # A Subscribe page is a sync page: the same fields
    [first] = [next(iter(stub.Subscribe(pb.SubscribeRequest(member="ann"), timeout=10)))]
    assert list(first.entry_set) == list(page.entry_set)
    # History entries leave them empty
    history = stub.GetSingleHistoryMessage(
        pb.GetSingleHistoryMessageRequest(**{"from": "ann", "to": "ben"})
    ).entry_set
    assert [e.message for e in history] == [page.entry_set[0].message, page.entry_set[2].message]
    assert all((e.type, e.conversation, e.conversation_seq) == ("", "", 0) for e in history)


def test_a_batch_gives_each_message_its_conversation_sequence(rpc: Grpc) -> None:
    stub = rpc.stub
    send(stub, "x", "y", {"t": "first"})
    stub.Send(pb.SendMessageRequest(**{"from": "y", "to": "x"}, messages=['{"n":1}', '{"n":2}']))
    entries = sync(stub, "x").entry_set
    assert [(e.sequence, e.conversation_seq) for e in entries] == [(1, 1), (2, 2), (3, 3)]
    assert summary(stub, "x") == [("single", "y", 3, 1, 2)]


# --- refused as HTTP refuses ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    grpc: Callable[[Any], Any]
    http: Callable[[Any], Any]
    field: str


def _post(path: str, body: dict[str, Any]) -> Callable[[Any], Any]:
    return lambda client: client.post(path, json=body)


def _get(path: str, query: dict[str, Any]) -> Callable[[Any], Any]:
    return lambda client: client.get(path, query_string=query)


def _read(**fields: Any) -> Callable[[Any], Any]:
    return lambda stub: stub.MarkRead(pb.MarkReadRequest(**fields))


def _list(**fields: Any) -> Callable[[Any], Any]:
    return lambda stub: stub.ListConversations(pb.ListConversationsRequest(**fields))


READ = {"member": "a", "type": "single", "conversation": "b"}
LONG = "x" * 1000
OK = json.dumps({"t": 1})

BAD_REQUESTS = [
    Case(
        "read: member missing",
        _read(type="single", conversation="b", seq=1),
        _post("/timeline/read", {"type": "single", "conversation": "b", "seq": 1}),
        "member",
    ),
    Case(
        "read: type missing",
        _read(member="a", conversation="b", seq=1),
        _post("/timeline/read", {"member": "a", "conversation": "b", "seq": 1}),
        "type",
    ),
    Case(
        "read: a bad type",
        _read(**{**READ, "type": "channel"}, seq=1),
        _post("/timeline/read", {**READ, "type": "channel", "seq": 1}),
        "type",
    ),
    Case(
        "read: an enum-like type",
        _read(**{**READ, "type": "SINGLE"}, seq=1),
        _post("/timeline/read", {**READ, "type": "SINGLE", "seq": 1}),
        "type",
    ),
    Case(
        "read: conversation missing",
        _read(member="a", type="single", seq=1),
        _post("/timeline/read", {"member": "a", "type": "single", "seq": 1}),
        "conversation",
    ),
    Case(
        "read: ':' in conversation",
        _read(**{**READ, "conversation": "b:c"}, seq=1),
        _post("/timeline/read", {**READ, "conversation": "b:c", "seq": 1}),
        "conversation",
    ),
    Case("read: seq missing", _read(**READ), _post("/timeline/read", READ), "seq"),
    Case(
        "read: a negative seq",
        _read(**READ, seq=-1),
        _post("/timeline/read", {**READ, "seq": -1}),
        "seq",
    ),
    Case("conversations: member missing", _list(), _get("/timeline/conversations", {}), "member"),
    Case(
        "conversations: a negative count",
        _list(member="a", count=-1),
        _get("/timeline/conversations", {"member": "a", "count": -1}),
        "count",
    ),
    Case(
        "conversations: count over count_max",
        _list(member="a", count=5000),
        _get("/timeline/conversations", {"member": "a", "count": 5000}),
        "count",
    ),
    Case(
        "conversations: a bad cursor",
        _list(member="a", before="not-a-cursor!"),
        _get("/timeline/conversations", {"member": "a", "before": "not-a-cursor!"}),
        "before",
    ),
    Case(
        "conversations: a cursor of no list",
        _list(member="a", before="eDp5"),  # "x:y"
        _get("/timeline/conversations", {"member": "a", "before": "eDp5"}),
        "before",
    ),
    Case(
        "devices: member missing",
        lambda stub: stub.ListDevices(pb.ListDevicesRequest()),
        _get("/timeline/devices", {}),
        "member",
    ),
    Case(
        "sync: a device too long",
        lambda stub: sync(stub, "a", device=LONG),
        _get("/timeline/sync", {"member": "a", "device": LONG}),
        "device",
    ),
    Case(
        "sync: ':' in device",
        lambda stub: sync(stub, "a", device="d:1"),
        _get("/timeline/sync", {"member": "a", "device": "d:1"}),
        "device",
    ),
    Case(
        "ack: a device too long",
        lambda stub: stub.Ack(pb.AckRequest(member="a", seq=1, device=LONG)),
        _post("/timeline/ack", {"member": "a", "seq": 1, "device": LONG}),
        "device",
    ),
    Case(
        "sendGroup: ':' in from",
        lambda stub: send_group(stub, "g", ["a"], OK, **{"from": "a:b"}),
        _post(
            "/timeline/sendGroup",
            {"group_name": "g", "group_members": ["a"], "message": OK, "from": "a:b"},
        ),
        "from",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_a_bad_request_is_refused_as_over_http(
    settings: Settings, sqlite_store: SQLiteStore, case: Case
) -> None:
    served = Grpc(settings, sqlite_store)
    client = create_app(settings, store=sqlite_store).test_client()
    try:
        send(served.stub, "b", "a", {"t": "hello"})
        got = failure(lambda: case.grpc(served.stub))
        reply = case.http(client)
        # Nothing changed: a's list, its sync timeline, the group
        assert summary(served.stub, "a") == [("single", "b", 1, 0, 1)]
        assert [e.sequence for e in sync(served.stub, "a").entry_set] == [1]
        group = pb.GetGroupHistoryMessageRequest(group="g")
        assert list(served.stub.GetGroupHistoryMessage(group).entry_set) == []
    finally:
        served.close()
    envelope = reply.get_json()
    assert reply.status_code == 400, envelope
    # The HTTP envelope's reason, message and metadata; go-kratos's code for its status
    assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TIMELINE_INVALID_PARAM")
    assert got.code == grpc_code(reply.status_code)
    assert got.reason == envelope["reason"]
    assert got.message == envelope["message"]
    assert got.metadata == envelope["metadata"]
    assert got.metadata["field"] == case.field
    assert "x-request-id" in got.trailing


def rfc3339_of(value: Any) -> str:
    """A google.protobuf.Timestamp as the HTTP API writes it ("" when unset)."""
    entry = pb.TimelineEntry(timestamp=value)
    return rfc3339(entry)


def test_a_subscribing_device_holds_entries_until_it_acks(rpc: Grpc) -> None:
    stub = rpc.stub
    send(stub, "f", "ms", {"t": 1})
    stream = stub.Subscribe(pb.SubscribeRequest(member="ms", device="watch"), timeout=10)
    first = next(iter(stream))
    stream.cancel()
    assert [e.sequence for e in first.entry_set] == [1]
    # The watch subscribed: another device's ack releases nothing it has not acked too.
    assert ack(stub, "ms", 1, "phone") == 1
    assert [d.device for d in stub.ListDevices(pb.ListDevicesRequest(member="ms")).devices] == [
        "phone",
        "watch",
    ]
    assert ack(stub, "ms", 1, "watch") == 2
