"""The gRPC API in process: a real grpc server on a free port, a client generated from the
project's .proto, a real redis-server and both stores; the HTTP API beside it on the same
Redis and store, for the calls that cross transports."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from support import CountedReads, put
from timeline.bench.grpc_load import run_sends
from timeline.bench.harness import SEND_USERS
from timeline.errors import PartialWrite, Unavailable
from timeline.factory import create_app
from timeline.logs import JsonFormatter, RequestIdFilter
from timeline.model import Kind, Message, Timeline
from timeline.rpc.calls import Calls
from timeline.rpc.server import THREADS, Runtime, TimelineServer
from timeline.rpc.status import KRATOS_CODES, grpc_code
from timeline.rpc.supervisor import PortLease
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.rpc.v1 import timeline_pb2_grpc
from timeline.settings import Settings
from timeline.store import Store, WriteResult
from timeline.store.sqlite import SQLiteStore

SEED_TEXTS = ["吃了吗？", "吃了", "大家好", "报三围", "初次见面，多多指教"]


class Grpc:
    """A TimelineServer in this process on a free port, and a client of it."""

    def __init__(self, settings: Settings, store: Store | None = None, **options: Any) -> None:
        self.runtime = Runtime.open(settings, store=store)
        self.server = TimelineServer(
            self.runtime, "127.0.0.1:0", **({"health_interval_s": 0.1} | options)
        )
        self.server.start()
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = timeline_pb2_grpc.TimelineStub(self.channel)

    def health(self, service: str = "") -> int:
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        status: int = check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        return status

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
        self.runtime.close()


@pytest.fixture
def rpc(settings: Settings, store: Store) -> Iterator[Grpc]:
    """The gRPC API on both stores, in turn."""
    served = Grpc(settings, store)
    yield served
    served.close()


@pytest.fixture
def http(settings: Settings, store: Store) -> Any:
    """The HTTP API on the same Redis and store as `rpc`."""
    return create_app(settings, store=store).test_client()


@dataclass(frozen=True)
class Failure:
    """What a failed call carries: go-kratos's code, message and one ErrorInfo."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]
    retry_after_s: int | None  # google.rpc.RetryInfo, sent beside it on UNAVAILABLE
    trailing: dict[str, Any]


def failure(call: Callable[[], Any]) -> Failure:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return failure_of(raised.value)


def failure_of(error: Any) -> Failure:
    status = rpc_status.from_call(error)  # also checks code and message agree with the call
    assert status is not None, (error.code(), error.details())
    infos, retries = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retries.append(retry.retry_delay.seconds)
    [info] = infos  # exactly one, as go-kratos sends it
    return Failure(
        code=error.code(),
        reason=info.reason,
        message=error.details(),
        metadata=dict(info.metadata),
        retry_after_s=retries[0] if retries else None,
        trailing=dict(error.trailing_metadata()),
    )


def send(
    stub: Any,
    sender: str,
    receiver: str,
    message: Any,
    *,
    timeout: float | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    **fields: Any,
) -> Any:
    text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
    request = pb.SendMessageRequest(**{"from": sender, "to": receiver}, message=text, **fields)
    return stub.Send(request, timeout=timeout, metadata=metadata)


def send_group(
    stub: Any,
    group: str,
    members: list[str],
    message: Any,
    *,
    timeout: float | None = None,
    **fields: Any,
) -> Any:
    text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
    request = pb.SendGroupRequest(group_name=group, group_members=members, message=text, **fields)
    return stub.SendGroup(request, timeout=timeout)


def single(stub: Any, a: str, b: str, **extra: Any) -> Any:
    return stub.GetSingleHistoryMessage(
        pb.GetSingleHistoryMessageRequest(**{"from": a, "to": b}, **extra)
    )


def rfc3339(entry: Any) -> str:
    """A TimelineEntry's timestamp as the HTTP API writes it ("" when unset)."""
    if not entry.HasField("timestamp"):
        return ""
    ms = entry.timestamp.seconds * 1000 + entry.timestamp.nanos // 1_000_000
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def as_http(entries: Any) -> list[dict[str, str]]:
    """Entries of a gRPC reply in the HTTP API's JSON form (a sync entry's conversation, an
    extension, where it has one)."""
    out = []
    for e in entries:
        item = {"sequence": str(e.sequence), "message": e.message, "timestamp": rfc3339(e)}
        if e.type:
            item["type"] = e.type
            item["conversation"] = e.conversation
            item["conversationSeq"] = str(e.conversation_seq)
        out.append(item)
    return out


def texts(entries: Any) -> list[tuple[int, str]]:
    return [(e.sequence, json.loads(e.message)["text"]) for e in entries]


# --- go-timeline's seed, and what a go-timeline client leaves unset ------------------------


def test_the_seed_scenario_over_grpc(rpc: Grpc) -> None:
    # Given the seed's conversation, sent over gRPC as a go-timeline client sends it
    stub = rpc.stub
    assert send(stub, "a", "b", {"text": SEED_TEXTS[0]}).sequence == 1
    assert send(stub, "b", "a", {"text": SEED_TEXTS[1]}).sequence == 2
    for text in SEED_TEXTS[2:]:
        reply = send_group(stub, "group_a", ["a", "c", "d"], {"text": text})
        assert list(reply.failed_members) == []

    # Then a's sync timeline holds all five, in order, numbered 1 to 5
    sync = stub.GetSyncMessage(pb.SyncMessageRequest(member="a", last_read=0, count=10))
    assert texts(sync.entry_set) == list(enumerate(SEED_TEXTS, start=1))
    assert (sync.latest_seq, sync.entry_set_last_seq, sync.min_seq) == (5, 5, 1)
    # And the histories: two private messages, three group messages, each from 1
    for a, b in (("a", "b"), ("b", "a")):
        assert texts(single(stub, a, b).entry_set) == [(1, SEED_TEXTS[0]), (2, SEED_TEXTS[1])]
    group = stub.GetGroupHistoryMessage(pb.GetGroupHistoryMessageRequest(group="group_a"))
    assert texts(group.entry_set) == list(enumerate(SEED_TEXTS[2:], start=1))
    # And pulling on from entry_set_last_seq, as a client does, ends with an empty set
    rest = stub.GetSyncMessage(pb.SyncMessageRequest(member="a", last_read=5))
    assert (list(rest.entry_set), rest.latest_seq, rest.entry_set_last_seq) == ([], 5, 0)
    c = stub.GetSyncMessage(pb.SyncMessageRequest(member="c", last_read=1, count=1))
    assert texts(c.entry_set) == [(2, SEED_TEXTS[3])]

    # A request missing its fields is refused as over HTTP
    refused = failure(lambda: stub.Send(pb.SendMessageRequest(**{"from": "a"})))
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TIMELINE_INVALID_PARAM",
    )
    assert refused.metadata == {"field": "to"}


def test_a_client_that_sets_nothing_of_ours_gets_go_timelines_answers(rpc: Grpc) -> None:
    stub = rpc.stub
    # count 0 (proto3's unset) is the default page of 100, forward, from the start
    stub.Send(
        pb.SendMessageRequest(
            **{"from": "x", "to": "y"}, messages=[json.dumps({"i": i}) for i in range(100)]
        )
    )
    send(stub, "x", "y", {"i": 100})
    page = stub.GetSyncMessage(pb.SyncMessageRequest(member="y"))
    assert [e.sequence for e in page.entry_set] == list(range(1, 101))
    assert (page.latest_seq, page.entry_set_last_seq) == (101, 100)
    history = single(stub, "y", "x")
    assert [e.sequence for e in history.entry_set] == list(range(1, 101))
    assert history.next_before == 0
    # A single message's reply has go-timeline's field only
    reply = send(stub, "x", "y", {"i": 101})
    assert (reply.sequence, list(reply.sequences)) == (102, [])


# --- the same data through both transports -----------------------------------------------


def test_a_message_sent_over_one_transport_is_read_over_the_other(rpc: Grpc, http: Any) -> None:
    stub = rpc.stub
    # Sends alternate between gRPC and HTTP: the sequences run on, one counter per timeline
    assert send(stub, "a", "b", {"text": "1 grpc"}).sequence == 1
    reply = http.post(
        "/timeline/send", json={"from": "b", "to": "a", "message": {"text": "2 http"}}
    )
    assert reply.get_json() == {"sequence": "2"}
    batch = stub.Send(
        pb.SendMessageRequest(
            **{"from": "a", "to": "b"},
            messages=[json.dumps({"text": "3 grpc"}), json.dumps({"text": "4 grpc"})],
        )
    )
    assert (batch.sequence, list(batch.sequences)) == (4, [3, 4])
    group = {"group_name": "g", "group_members": ["a", "b"], "message": {"text": "g1 http"}}
    assert http.post("/timeline/sendGroup", json=group).get_json() == {"failedMembers": []}
    assert list(send_group(stub, "g", ["b", "a"], {"text": "g2 grpc"}).failed_members) == []

    # Then both transports read the same entries, timestamps included
    for member in ("a", "b"):
        over_http = http.get(f"/timeline/sync?member={member}&last_read=0&count=100").get_json()
        over_grpc = stub.GetSyncMessage(pb.SyncMessageRequest(member=member, count=100))
        assert over_http["entrySet"] == as_http(over_grpc.entry_set)
        assert [e.sequence for e in over_grpc.entry_set] == [1, 2, 3, 4, 5, 6]
        assert over_http["latestSeq"] == str(over_grpc.latest_seq) == "6"
        assert over_http["minSeq"] == str(over_grpc.min_seq) == "1"
        assert all(e.HasField("timestamp") for e in over_grpc.entry_set)
    over_http = http.get("/timeline/history/single/b/a").get_json()
    assert over_http["entrySet"] == as_http(single(rpc.stub, "a", "b").entry_set)
    assert [e["sequence"] for e in over_http["entrySet"]] == ["1", "2", "3", "4"]
    over_grpc = stub.GetGroupHistoryMessage(pb.GetGroupHistoryMessageRequest(group="g"))
    assert http.get("/timeline/history/group/g").get_json()["entrySet"] == as_http(
        over_grpc.entry_set
    )
    assert texts(over_grpc.entry_set) == [(1, "g1 http"), (2, "g2 grpc")]

    # An ack over one is seen over the other
    assert stub.Ack(pb.AckRequest(member="b", seq=2)).min_seq == 3
    assert http.get("/timeline/sync?member=b").get_json()["minSeq"] == "3"
    assert http.post("/timeline/ack", json={"member": "b", "seq": "4"}).get_json() == {
        "minSeq": "5"
    }
    assert stub.GetSyncMessage(pb.SyncMessageRequest(member="b")).min_seq == 5


def test_a_retry_with_the_same_client_msg_id_is_answered_once_across_transports(
    rpc: Grpc, http: Any
) -> None:
    stub = rpc.stub
    first = send(stub, "a", "b", {"text": "hi"}, client_msg_id="a-0001")
    again = send(stub, "a", "b", {"text": "hi"}, client_msg_id="a-0001")
    over_http = http.post(
        "/timeline/send",
        json={"from": "a", "to": "b", "message": {"text": "hi"}, "client_msg_id": "a-0001"},
    )
    assert first.sequence == again.sequence == 1
    assert over_http.get_json() == {"sequence": "1"}
    # Stored once, everywhere
    assert [
        e.sequence for e in stub.GetSyncMessage(pb.SyncMessageRequest(member="b")).entry_set
    ] == [1]
    assert len(single(stub, "a", "b").entry_set) == 1
    # A group retry lists its members in another order: still the first answer, one copy each
    for members in (["c", "d"], ["d", "c"]):
        reply = send_group(stub, "g", members, {"text": "yo"}, client_msg_id="g-1")
        assert list(reply.failed_members) == []
    group = stub.GetGroupHistoryMessage(pb.GetGroupHistoryMessageRequest(group="g"))
    assert [e.sequence for e in group.entry_set] == [1]
    # The same id with another message is go-kratos's 409: ABORTED
    reused = failure(lambda: send(stub, "a", "b", {"text": "other"}, client_msg_id="a-0001"))
    assert (reused.code, reused.reason, reused.metadata) == (
        grpc.StatusCode.ABORTED,
        "TIMELINE_CLIENT_MSG_ID_REUSED",
        {},
    )
    assert reused.message == (
        "client_msg_id was already used for another message in this conversation"
    )


def test_extensions_batches_min_seq_backward_history_and_ack(rpc: Grpc) -> None:
    stub = rpc.stub
    messages = [json.dumps({"n": n}) for n in range(1, 6)]
    reply = stub.Send(pb.SendMessageRequest(**{"from": "a", "to": "b"}, messages=messages))
    assert (reply.sequence, list(reply.sequences)) == (5, [1, 2, 3, 4, 5])

    # Backward from the newest, two at a time, following next_before to the start
    pages, before = [], 0
    while True:
        page = single(
            stub, "b", "a", direction=pb.HISTORY_DIRECTION_BACKWARD, count=2, before=before
        )
        pages.append([e.sequence for e in page.entry_set])
        before = page.next_before
        if not before:
            break
    assert pages == [[5, 4], [3, 2], [1]]
    group = stub.GetGroupHistoryMessage(
        pb.GetGroupHistoryMessageRequest(group="nobody", direction=pb.HISTORY_DIRECTION_BACKWARD)
    )
    assert (list(group.entry_set), group.next_before) == ([], 0)

    # Ack: b's entries up to 3 leave its sync timeline; history and latest_seq stay
    assert stub.Ack(pb.AckRequest(member="b", seq=3)).min_seq == 4
    assert stub.Ack(pb.AckRequest(member="b", seq=3)).min_seq == 4  # idempotent
    sync = stub.GetSyncMessage(pb.SyncMessageRequest(member="b"))
    assert ([e.sequence for e in sync.entry_set], sync.latest_seq, sync.min_seq) == ([4, 5], 5, 4)
    assert stub.Ack(pb.AckRequest(member="b", seq=0)).min_seq == 4  # 0 is a seq, acking nothing
    assert len(single(stub, "a", "b").entry_set) == 5


# --- errors: go-kratos's code, the HTTP envelope's reason and metadata ---------------------


def test_the_code_of_each_http_status_is_go_kratos() -> None:
    expected = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        501: "UNIMPLEMENTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
        413: "UNKNOWN",  # go-kratos maps no other code: UNKNOWN
        408: "UNKNOWN",
        418: "UNKNOWN",
    }
    assert {code: grpc_code(code).name for code in expected} == expected
    assert set(expected) - {413, 408, 418} <= set(KRATOS_CODES)


@dataclass(frozen=True)
class Case:
    """One bad request, over gRPC and over HTTP."""

    name: str
    grpc: Callable[[Any], Any]
    http: Callable[[Any], Any]


def _send(**fields: Any) -> Callable[[Any], Any]:
    return lambda stub: stub.Send(pb.SendMessageRequest(**fields))


def _post(path: str, body: dict[str, Any]) -> Callable[[Any], Any]:
    return lambda client: client.post(path, data=json.dumps(body))


OK_MESSAGE = json.dumps({"text": "hi"})
BAD_REQUESTS = [
    Case(
        "from missing",
        _send(to="b", message=OK_MESSAGE),
        _post("/timeline/send", {"to": "b", "message": OK_MESSAGE}),
    ),
    Case(
        "':' in from",
        _send(**{"from": "a:x", "to": "b", "message": OK_MESSAGE}),
        _post("/timeline/send", {"from": "a:x", "to": "b", "message": OK_MESSAGE}),
    ),
    Case(
        "'/' in to",
        _send(**{"from": "a", "to": "b/c", "message": OK_MESSAGE}),
        _post("/timeline/send", {"from": "a", "to": "b/c", "message": OK_MESSAGE}),
    ),
    Case(
        "message missing",
        _send(**{"from": "a", "to": "b"}),
        _post("/timeline/send", {"from": "a", "to": "b"}),
    ),
    Case(
        "message not JSON",
        _send(**{"from": "a", "to": "b", "message": "{oops"}),
        _post("/timeline/send", {"from": "a", "to": "b", "message": "{oops"}),
    ),
    Case(
        "message not an object",
        _send(**{"from": "a", "to": "b", "message": "[1]"}),
        _post("/timeline/send", {"from": "a", "to": "b", "message": "[1]"}),
    ),
    Case(
        "a key repeated in the message",
        _send(**{"from": "a", "to": "b", "message": '{"k": 1, "k": 2}'}),
        _post("/timeline/send", {"from": "a", "to": "b", "message": '{"k": 1, "k": 2}'}),
    ),
    Case(
        "a '$' key",
        _send(**{"from": "a", "to": "b", "message": '{"$ref": "x"}'}),
        _post("/timeline/send", {"from": "a", "to": "b", "message": '{"$ref": "x"}'}),
    ),
    Case(
        "message and messages",
        _send(**{"from": "a", "to": "b", "message": OK_MESSAGE, "messages": [OK_MESSAGE]}),
        _post(
            "/timeline/send",
            {"from": "a", "to": "b", "message": OK_MESSAGE, "messages": [OK_MESSAGE]},
        ),
    ),
    Case(
        "a batch over batch_max_messages",
        _send(**{"from": "a", "to": "b", "messages": [OK_MESSAGE] * 3}),
        _post("/timeline/send", {"from": "a", "to": "b", "messages": [OK_MESSAGE] * 3}),
    ),
    Case(
        "a bad message in a batch",
        _send(**{"from": "a", "to": "b", "messages": [OK_MESSAGE, "7"]}),
        _post("/timeline/send", {"from": "a", "to": "b", "messages": [OK_MESSAGE, "7"]}),
    ),
    Case(
        "client_msg_id with ':'",
        _send(**{"from": "a", "to": "b", "message": OK_MESSAGE, "client_msg_id": "x:y"}),
        _post(
            "/timeline/send",
            {"from": "a", "to": "b", "message": OK_MESSAGE, "client_msg_id": "x:y"},
        ),
    ),
    Case(
        "no members",
        lambda stub: stub.SendGroup(pb.SendGroupRequest(group_name="g", message=OK_MESSAGE)),
        _post("/timeline/sendGroup", {"group_name": "g", "message": OK_MESSAGE}),
    ),
    Case(
        "a bad member",
        lambda stub: stub.SendGroup(
            pb.SendGroupRequest(group_name="g", group_members=["a", ".."], message=OK_MESSAGE)
        ),
        _post(
            "/timeline/sendGroup",
            {"group_name": "g", "group_members": ["a", ".."], "message": OK_MESSAGE},
        ),
    ),
    Case(
        "too many members",
        lambda stub: stub.SendGroup(
            pb.SendGroupRequest(group_name="g", group_members=list("abcd"), message=OK_MESSAGE)
        ),
        _post(
            "/timeline/sendGroup",
            {"group_name": "g", "group_members": list("abcd"), "message": OK_MESSAGE},
        ),
    ),
    Case(
        "count over count_max",
        lambda stub: stub.GetSyncMessage(pb.SyncMessageRequest(member="a", count=5000)),
        lambda client: client.get("/timeline/sync?member=a&count=5000"),
    ),
    Case(
        "a negative last_read",
        lambda stub: stub.GetSyncMessage(pb.SyncMessageRequest(member="a", last_read=-1)),
        lambda client: client.get("/timeline/sync?member=a&last_read=-1"),
    ),
    Case(
        "member missing",
        lambda stub: stub.GetSyncMessage(pb.SyncMessageRequest()),
        lambda client: client.get("/timeline/sync"),
    ),
    Case(
        "a negative wait_ms",
        lambda stub: stub.GetSyncMessage(pb.SyncMessageRequest(member="a", wait_ms=-1)),
        lambda client: client.get("/timeline/sync?member=a&wait_ms=-1"),
    ),
    Case(
        "a negative history wait_ms",
        lambda stub: single(stub, "a", "b", wait_ms=-5),
        lambda client: client.get("/timeline/history/single/a/b?wait_ms=-5"),
    ),
    # Subscribe checks member and last_read as a sync does
    Case(
        "subscribe: ':' in member",
        lambda stub: next(stub.Subscribe(pb.SubscribeRequest(member="a:x"), timeout=5)),
        lambda client: client.get("/timeline/sync?member=a:x"),
    ),
    Case(
        "subscribe: member missing",
        lambda stub: next(stub.Subscribe(pb.SubscribeRequest(last_read=3), timeout=5)),
        lambda client: client.get("/timeline/sync?last_read=3"),
    ),
    Case(
        "subscribe: a negative last_read",
        lambda stub: next(stub.Subscribe(pb.SubscribeRequest(member="a", last_read=-1), timeout=5)),
        lambda client: client.get("/timeline/sync?member=a&last_read=-1"),
    ),
    Case(
        "a negative history count",
        lambda stub: stub.GetGroupHistoryMessage(
            pb.GetGroupHistoryMessageRequest(group="g", count=-1)
        ),
        lambda client: client.get("/timeline/history/group/g?count=-1"),
    ),
    Case(
        "a negative before",
        lambda stub: single(stub, "a", "b", direction=pb.HISTORY_DIRECTION_BACKWARD, before=-1),
        lambda client: client.get("/timeline/history/single/a/b?direction=backward&before=-1"),
    ),
    Case(
        "ack without seq",
        lambda stub: stub.Ack(pb.AckRequest(member="a")),
        _post("/timeline/ack", {"member": "a"}),
    ),
    Case(
        "ack below 0",
        lambda stub: stub.Ack(pb.AckRequest(member="a", seq=-5)),
        _post("/timeline/ack", {"member": "a", "seq": -5}),
    ),
    Case(
        "a message over message_max_bytes",
        _send(**{"from": "a", "to": "b", "message": json.dumps({"t": "x" * 300})}),
        _post("/timeline/send", {"from": "a", "to": "b", "message": json.dumps({"t": "x" * 300})}),
    ),
    Case(
        "more sync copies than request_documents_max",
        lambda stub: stub.SendGroup(
            pb.SendGroupRequest(
                group_name="g", group_members=list("abc"), messages=[OK_MESSAGE] * 2
            )
        ),
        _post(
            "/timeline/sendGroup",
            {"group_name": "g", "group_members": list("abc"), "messages": [OK_MESSAGE] * 2},
        ),
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_a_bad_request_is_refused_as_over_http(
    settings: Settings, sqlite_store: SQLiteStore, case: Case
) -> None:
    # Limits low enough for each case to break one
    settings = settings.replace(
        batch_max_messages=2, group_members_max=3, message_max_bytes=256, request_documents_max=5
    )
    served = Grpc(settings, sqlite_store)
    try:
        got = failure(lambda: case.grpc(served.stub))
        reply = case.http(create_app(settings, store=sqlite_store).test_client())
    finally:
        served.close()
    envelope = reply.get_json()
    assert envelope["code"] == reply.status_code
    # The HTTP envelope's reason, message and metadata; go-kratos's code for its status
    assert got.reason == envelope["reason"]
    assert got.message == envelope["message"]
    assert got.metadata == envelope["metadata"]
    assert got.code == grpc_code(reply.status_code)
    assert got.code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN}  # 400, 413
    assert got.retry_after_s is None
    # Nothing was stored: no timeline has a sequence
    client = create_app(settings, store=sqlite_store).test_client()
    for member in ("a", "b", "c", "d"):
        assert client.get(f"/timeline/sync?member={member}").get_json()["latestSeq"] == "0"


def test_an_unknown_direction_is_refused(rpc: Grpc) -> None:
    refused = failure(lambda: single(rpc.stub, "a", "b", direction=7))
    assert (refused.code, refused.reason, refused.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TIMELINE_INVALID_PARAM",
        {"field": "direction"},
    )


def test_a_message_over_the_body_limit_is_refused_by_the_transport(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    served = Grpc(settings.replace(body_max_bytes=10_000), sqlite_store)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            send(served.stub, "a", "b", {"t": "x" * 20_000})
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert send(served.stub, "a", "b", {"t": "x" * 5_000}).sequence == 1
    finally:
        served.close()


def test_the_bearer_token_is_read_from_the_authorization_metadata(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    served = Grpc(settings.replace(api_token="s3cret"), sqlite_store)
    try:
        request = pb.SyncMessageRequest(member="a")
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            refused = failure(lambda m=metadata: served.stub.GetSyncMessage(request, metadata=m))
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TIMELINE_UNAUTHORIZED",
            )
        good = (("authorization", "Bearer s3cret"),)
        assert served.stub.GetSyncMessage(request, metadata=good).latest_seq == 0
        sent = served.stub.Send(
            pb.SendMessageRequest(**{"from": "a", "to": "b"}, message=OK_MESSAGE), metadata=good
        )
        assert sent.sequence == 1
        # Health and reflection need no token, as /healthz and /readyz
        assert served.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        served.close()


class SyncCopiesRefused:
    """A store that takes history copies and refuses every sync copy, failing halfway as
    MongoDB can (PartialWrite: the history copy is stored)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def write(self, history: Any, sync: Any, *more: Any) -> Any:
        if sync is None:
            return self.inner.write(history, None, *more)
        if history is not None:
            if self.inner.write(history, None, *more).history_taken:
                return WriteResult(history_taken=True)
            raise PartialWrite("injected: stored the history copy, not the sync copies")
        raise Unavailable("injected: sync copies not stored")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_copies_not_stored_are_reported(settings: Settings, sqlite_store: SQLiteStore) -> None:
    settings = settings.replace(store_retry_backoff_ms=1, store_write_attempts=2)
    served = Grpc(settings, SyncCopiesRefused(sqlite_store))  # type: ignore[arg-type]
    try:
        # A send: go-kratos's 503, the members in metadata (a JSON list: map<string, string>)
        failed = failure(lambda: send(served.stub, "a", "b", {"text": "x"}))
        assert (failed.code, failed.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "TIMELINE_WRITE_FAILED",
        )
        assert json.loads(failed.metadata["failedMembers"]) == ["a", "b"]
        assert failed.retry_after_s == 1
        # A group: its reply names them, as go-timeline's failed_members
        reply = send_group(served.stub, "g", ["c", "d"], {"text": "y"})
        assert list(reply.failed_members) == ["c", "d"]
    finally:
        served.close()


class BrokenReads:
    """A store whose reads fail with an error the service does not expect."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def page(self, *args: Any) -> Any:
        raise RuntimeError("injected: a bug")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_unexpected_error_is_internal_and_logged(
    settings: Settings, sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    served = Grpc(settings, BrokenReads(sqlite_store))  # type: ignore[arg-type]
    try:
        caplog.set_level(logging.ERROR, logger="timeline.rpc.calls")
        broken = failure(lambda: served.stub.GetSyncMessage(pb.SyncMessageRequest(member="a")))
        assert (broken.code, broken.reason, broken.message) == (
            grpc.StatusCode.INTERNAL,
            "TIMELINE_INTERNAL",
            "internal error",
        )
        [logged] = [r for r in caplog.records if r.name == "timeline.rpc.calls"]
        assert logged.exc_info is not None
        assert "injected: a bug" in str(logged.exc_info[1])
        # The server goes on serving
        assert send(served.stub, "a", "b", {"text": "still here"}).sequence == 1
    finally:
        served.close()


# --- dependencies down, deadlines -----------------------------------------------------------


def test_redis_down_is_a_fast_unavailable_and_recovers(
    tmp_path: Path, redis_factory: Any, key_prefix: str
) -> None:
    server = redis_factory()
    settings = Settings(
        redis_url=server.url, redis_key_prefix=key_prefix, sqlite_path=str(tmp_path / "t.db")
    )
    served = Grpc(settings)
    try:
        assert send(served.stub, "a", "b", {"text": "1"}).sequence == 1
        assert served.health("timeline.v1.Timeline") == health_pb2.HealthCheckResponse.SERVING

        server.stop()
        calls = (
            lambda: send(served.stub, "a", "b", {"text": "2"}),
            lambda: served.stub.GetSyncMessage(pb.SyncMessageRequest(member="a")),
        )
        for call in calls:
            started = time.monotonic()
            down = failure(call)
            # The bound is the behaviour: a refused connection answers at once.
            assert time.monotonic() - started < 1.0
            assert (down.code, down.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "TIMELINE_UNAVAILABLE",
            )
            assert down.retry_after_s == 1  # HTTP's Retry-After: 1
        # Readiness follows; liveness does not
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: served.health("timeline.v1.Timeline") == not_serving, "NOT_SERVING")
        assert served.health("") == health_pb2.HealthCheckResponse.SERVING

        server.start()  # same port, and empty: the counters are gone
        assert send(served.stub, "a", "b", {"text": "3"}).sequence == 2  # from the store
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: served.health("timeline.v1.Timeline") == serving, "SERVING again")
    finally:
        served.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.02)


def duration_count(method: str, status: int) -> float:
    labels = {
        "route": f"grpc:/timeline.v1.Timeline/{method}",
        "method": "GRPC",
        "status": str(status),
    }
    value = REGISTRY.get_sample_value("timeline_http_request_duration_seconds_count", labels)
    return value or 0.0


def duration_sum(method: str, status: int) -> float:
    labels = {
        "route": f"grpc:/timeline.v1.Timeline/{method}",
        "method": "GRPC",
        "status": str(status),
    }
    return REGISTRY.get_sample_value("timeline_http_request_duration_seconds_sum", labels) or 0.0


def slow_writes(settings: Settings, tmp_path: Path) -> Settings:
    """Settings under which a write waiting on SQLite's lock would go on trying for 10 s:
    only the call's own deadline stops it sooner."""
    return settings.replace(
        sqlite_path=str(tmp_path / "locked.sqlite3"),
        sqlite_busy_timeout_ms=100,
        request_deadline_ms=10_000,
        gap_grace_ms=13_000,
        store_write_attempts=1000,
        store_retry_backoff_ms=20,
        store_retry_budget_ms=10_000,
    )


def test_a_write_stops_at_the_calls_deadline(settings: Settings, tmp_path: Path) -> None:
    settings = slow_writes(settings, tmp_path)
    served = Grpc(settings)
    blocker = sqlite3.connect(settings.sqlite_path, isolation_level=None)
    try:
        before = duration_count("Send", 504)
        # Given every store write waits on a lock another process holds
        blocker.execute("BEGIN IMMEDIATE")
        # When a send has half a second
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            served.stub.Send(
                pb.SendMessageRequest(**{"from": "a", "to": "b"}, message=OK_MESSAGE), timeout=0.5
            )
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        # Then the server gives up on it soon after, while the lock is still held (without the
        # deadline it would try for 10 s, and store the message once the lock is gone)
        # (its access line: 504, what the client got, written when the write ended)
        wait_for(lambda: duration_count("Send", 504) == before + 1, "the send to end", 3.0)
        assert time.monotonic() - started < 2.0
        blocker.execute("ROLLBACK")
        time.sleep(0.5)
        assert list(single(served.stub, "a", "b").entry_set) == []
        # And the service writes again once the lock is free
        assert send(served.stub, "a", "b", {"text": "later"}).sequence == 2
    finally:
        blocker.close()
        served.close()


def test_a_call_whose_deadline_passes_while_queued_never_starts(
    settings: Settings, tmp_path: Path, redis_client: Any, key_prefix: str
) -> None:
    settings = slow_writes(settings, tmp_path)
    served = Grpc(settings, threads=1, held=0)  # one call at a time
    blocker = sqlite3.connect(settings.sqlite_path, isolation_level=None)
    try:
        # Given the only thread is busy with a write waiting on the lock
        blocker.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(send, served.stub, "a", "b", {"text": "first"})
            time.sleep(0.3)
            # When another call's deadline passes while it waits for the thread
            with pytest.raises(grpc.RpcError) as raised:
                send(served.stub, "x", "y", {"text": "late"}, timeout=0.3)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            blocker.execute("ROLLBACK")
            assert busy.result(timeout=15).sequence == 1
        time.sleep(0.3)
        # Then it never ran (grpc drops it, or calls.py does when it is picked up before grpc
        # noticed: test_a_call_picked_up_too_late_is_not_started): not even a sequence was
        # allocated for it
        assert not redis_client.exists(f"{key_prefix}seq:history:x:y")
        assert redis_client.exists(f"{key_prefix}seq:history:a:b")
        assert list(served.stub.GetSyncMessage(pb.SyncMessageRequest(member="y")).entry_set) == []
    finally:
        blocker.close()
        served.close()


class PickedUpLate:
    """The context of a call whose deadline passed (or whose client left) before its
    handler began: grpc.aio's ServicerContext, as much of it as Calls uses."""

    def __init__(self, remaining: float, cancelled: bool = False) -> None:
        self.remaining, self._cancelled = remaining, cancelled
        self.status: Any = None

    def cancelled(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float:
        return self.remaining

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv6:%5B::1%5D:4321"

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str, trailing_metadata: Any) -> None:
        self.status = AbortedWith(code, details, trailing_metadata)
        raise RuntimeError("aborted")  # what grpc's abort does: the handler stops here


@dataclass(frozen=True)
class AbortedWith:
    code: grpc.StatusCode
    details: str
    trailing_metadata: Any


def reason_of(status: AbortedWith) -> str:
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(details).details[0].Unpack(info)
    return info.reason


@pytest.mark.parametrize(
    ("context", "code", "reason"),
    [
        (PickedUpLate(0.0), grpc.StatusCode.DEADLINE_EXCEEDED, "TIMELINE_DEADLINE_EXCEEDED"),
        (PickedUpLate(5.0, cancelled=True), grpc.StatusCode.CANCELLED, "TIMELINE_CANCELLED"),
    ],
)
def test_a_call_over_before_it_began_is_not_started(
    rpc: Grpc, context: PickedUpLate, code: grpc.StatusCode, reason: str
) -> None:
    started: list[Any] = []
    with ThreadPoolExecutor(1) as pool:
        calls = Calls(rpc.runtime.service, None, pool)
        method = calls.method("Send", lambda *args: started.append(args), writes=True)
        with pytest.raises(RuntimeError, match="aborted"):
            asyncio.run(method(pb.SendMessageRequest(), context))  # type: ignore[arg-type]
    assert started == []
    assert context.status.code is code
    assert reason_of(context.status) == reason


def test_a_call_picked_up_by_a_thread_after_its_deadline_is_not_started(rpc: Grpc) -> None:
    # Given the pool's only thread busy past the call's deadline
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    pool.submit(release.wait, 5)
    started: list[Any] = []
    calls = Calls(rpc.runtime.service, None, pool)
    method = calls.method("Send", lambda *args: started.append(args), writes=True)
    context = PickedUpLate(0.2)

    async def call() -> None:
        asyncio.get_running_loop().call_later(0.4, release.set)
        await method(pb.SendMessageRequest(), context)  # type: ignore[arg-type]

    # When the thread takes it (grpc had not cancelled it yet: nothing does, here)
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(call())
    pool.shutdown()
    # Then it never ran, and the call ends DEADLINE_EXCEEDED
    assert started == []
    assert context.status.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(context.status) == "TIMELINE_DEADLINE_EXCEEDED"


def test_calls_beyond_what_the_pool_may_queue_are_refused_at_once(rpc: Grpc) -> None:
    # Given a pool of one thread, busy, and room for 2 calls running or queued
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    ran: list[Any] = []
    calls = Calls(rpc.runtime.service, None, pool, queued_max=2)
    method = calls.method("Ack", lambda *args: (release.wait(5), ran.append(args)))
    contexts = [PickedUpLate(30.0) for _ in range(3)]

    async def three() -> list[Any]:
        tasks = [
            asyncio.ensure_future(method(pb.AckRequest(), context))  # type: ignore[arg-type]
            for context in contexts
        ]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(three())
    pool.shutdown()
    # Then the third is refused at once, UNAVAILABLE (retry shortly), and never runs
    assert len(ran) == 2
    assert [type(outcome) for outcome in outcomes] == [tuple, tuple, RuntimeError]
    assert contexts[2].status.code is grpc.StatusCode.UNAVAILABLE
    assert reason_of(contexts[2].status) == "TIMELINE_UNAVAILABLE"
    assert calls.queued == 0


def test_a_write_gets_the_sooner_of_the_two_deadlines(rpc: Grpc) -> None:
    seen: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        method = Calls(rpc.runtime.service, None, pool).method(
            "Send",
            lambda r, c, service: seen.append(service.policy.request_deadline_ms),
            writes=True,
        )
        for remaining in (0.25, 1e9):
            asyncio.run(method(pb.SendMessageRequest(), PickedUpLate(remaining)))  # type: ignore[arg-type]
    assert seen == [250, rpc.runtime.service.policy.request_deadline_ms]
    assert rpc.runtime.service.policy.request_deadline_ms == 3000  # the shared one untouched


def test_a_second_server_on_the_same_address_is_refused(rpc: Grpc) -> None:
    # grpc's default (SO_REUSEPORT) would let it bind and take half the calls, in silence
    with pytest.raises(RuntimeError):
        TimelineServer(rpc.runtime, rpc.address)


def test_the_servers_of_one_deployment_share_its_port(rpc: Grpc) -> None:
    # Given the port a supervisor holds for its processes (as gunicorn's master does)
    lease = PortLease("127.0.0.1:0")
    servers = [TimelineServer(rpc.runtime, lease.bind, reuse_port=True) for _ in range(2)]
    try:
        # A server that is not one of them is refused there, as anywhere taken
        with pytest.raises(RuntimeError):
            TimelineServer(rpc.runtime, lease.bind)
        for server in servers:
            server.start()
        # Calls on connections of their own are all answered, whichever server takes each
        options = [("grpc.use_local_subchannel_pool", 1)]
        for i in range(8):
            with grpc.insecure_channel(lease.bind, options=options) as channel:
                reply = send(timeline_pb2_grpc.TimelineStub(channel), "a", "b", {"i": i})
                assert reply.sequence == i + 1
    finally:
        for server in servers:
            server.stop(0)
        lease.release()


@pytest.mark.slow
def test_the_bench_load_sends_each_call_a_new_message(rpc: Grpc) -> None:
    # make bench's gRPC load (timeline/bench/grpc_load.py): 2 processes x 2 channels x 2 calls
    result = run_sends(rpc.address, 1.0, processes=2, channels=2, in_flight=2)
    assert result.errors == {}
    assert result.requests > 0
    # Every call it counted (and the first call of each channel) stored a message of its
    # own: never a retry of another's client_msg_id. Each is in both members' sync.
    copies: Counter[str] = Counter()
    for member in range(SEND_USERS):
        reply = rpc.stub.GetSyncMessage(pb.SyncMessageRequest(member=f"u{member}", count=1000))
        copies.update(json.loads(entry.message)["id"] for entry in reply.entry_set)
    assert len(copies) == result.requests + 2 * 2
    assert set(copies.values()) == {2}


# --- health, reflection, access lines, metrics ---------------------------------------------


def test_health_and_reflection_answer(rpc: Grpc) -> None:
    assert rpc.health("") == health_pb2.HealthCheckResponse.SERVING
    assert rpc.health("timeline.v1.Timeline") == health_pb2.HealthCheckResponse.SERVING

    # Reflection: the services, and the API's whole description, without any .proto
    reflection = reflection_pb2_grpc.ServerReflectionStub(rpc.channel)
    [listed] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {service.name for service in listed.list_services_response.service}
    assert names == {
        "timeline.v1.Timeline",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(rpc.channel))
    service = pool.FindServiceByName("timeline.v1.Timeline")
    assert [m.name for m in service.methods] == [
        "Send",
        "SendGroup",
        "GetSyncMessage",
        "GetSingleHistoryMessage",
        "GetGroupHistoryMessage",
        "Ack",
        "Subscribe",
        "MarkRead",
        "ListConversations",
        "ListDevices",
    ]
    entry = pool.FindMessageTypeByName("timeline.v1.TimelineEntry")
    assert [(f.name, f.number) for f in entry.fields] == [
        ("sequence", 1),
        ("message", 2),
        ("timestamp", 3),
        ("type", 4),
        ("conversation", 5),
        ("conversation_seq", 6),
    ]


def test_health_tells_readiness_for_reads_apart_while_writes_wait(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While what gates writes is built (MongoDB's unique indexes), reads are served:
    monkeypatch.setattr(store, "readiness", lambda: "building")
    served = Grpc(settings, store)
    try:
        assert served.health("timeline.v1.Timeline") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert served.health("timeline.v1.Timeline.reads") == health_pb2.HealthCheckResponse.SERVING
        assert list(served.stub.GetSyncMessage(pb.SyncMessageRequest(member="a")).entry_set) == []
    finally:
        served.close()


def test_health_says_not_serving_while_it_stops(settings: Settings, store: Store) -> None:
    served = Grpc(settings, store)
    health = served.health
    try:
        assert health("") == health_pb2.HealthCheckResponse.SERVING
        served.server.on_loop(served.server.health.enter_graceful_shutdown())  # stop() does
        assert health("") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health("timeline.v1.Timeline") == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.3)  # the readiness checks go on: they must not say SERVING again
        assert health("timeline.v1.Timeline") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        served.close()


def test_one_access_line_per_call_with_the_request_id(
    rpc: Grpc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="timeline.access")
    ok_before, bad_before = duration_count("Send", 200), duration_count("Send", 400)
    reply, call = rpc.stub.Send.with_call(
        pb.SendMessageRequest(**{"from": "a", "to": "b"}, message=OK_MESSAGE),
        metadata=(("x-request-id", "req-1"),),
    )
    assert reply.sequence == 1
    assert dict(call.trailing_metadata())["x-request-id"] == "req-1"
    refused = failure(
        lambda: rpc.stub.Send(
            pb.SendMessageRequest(**{"from": "a"}), metadata=(("x-request-id", 'x" "evil'),)
        )
    )
    made = refused.trailing["x-request-id"]
    assert made != 'x" "evil'
    assert len(made) == 32

    lines = [
        json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "timeline.access"
    ]
    assert [(line["msg"], line["request_id"]) for line in lines] == [
        ("GRPC /timeline.v1.Timeline/Send 200", "req-1"),
        ("GRPC /timeline.v1.Timeline/Send 400", made),
    ]
    first = lines[0]
    assert {key: first[key] for key in ("method", "path", "route", "status", "grpc_code")} == {
        "method": "GRPC",
        "path": "/timeline.v1.Timeline/Send",
        "route": "grpc:/timeline.v1.Timeline/Send",
        "status": 200,
        "grpc_code": "OK",
    }
    assert lines[1]["grpc_code"] == "INVALID_ARGUMENT"
    assert first["duration_ms"] > 0
    assert first["remote"] == "127.0.0.1"
    # The request metrics count them, as HTTP's
    assert duration_count("Send", 200) == ok_before + 1
    assert duration_count("Send", 400) == bad_before + 1
    assert duration_sum("Send", 200) > 0


def test_a_call_logs_with_its_request_id(
    settings: Settings, sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    # What the service logs while serving a call carries the call's id
    settings = settings.replace(store_retry_backoff_ms=1, store_write_attempts=2)
    served = Grpc(settings, SyncCopiesRefused(sqlite_store))  # type: ignore[arg-type]
    try:
        caplog.set_level(logging.WARNING)
        caplog.handler.addFilter(RequestIdFilter())  # as logging_config installs it
        reply = served.stub.SendGroup(
            pb.SendGroupRequest(group_name="g", group_members=["c"], message=OK_MESSAGE),
            metadata=(("x-request-id", "req-log"),),
        )
        assert list(reply.failed_members) == ["c"]
        warned = [r for r in caplog.records if r.name == "timeline.service"]
        assert warned
        for record in warned:
            line = json.loads(JsonFormatter().format(record))
            assert line["request_id"] == "req-log"
    finally:
        served.close()


def test_entries_without_a_creation_time_have_no_timestamp(
    rpc: Grpc, http: Any, store: Store
) -> None:
    # A document go-timeline wrote (no creation time), in a history kept forever
    text = '{"text":"from go-timeline"}'
    put(store, Kind.HISTORY, "old", 1, Message({"text": "from go-timeline"}, text), 0, "m")
    reply = rpc.stub.GetGroupHistoryMessage(pb.GetGroupHistoryMessageRequest(group="old"))
    [entry] = reply.entry_set
    assert (entry.sequence, entry.message, entry.HasField("timestamp")) == (1, text, False)
    over_http = http.get("/timeline/history/group/old").get_json()["entrySet"]
    assert over_http == as_http([entry]) == [{"sequence": "1", "message": text, "timestamp": ""}]


def test_calls_run_at_once_on_the_thread_pool(rpc: Grpc) -> None:
    # Many clients at once: every timeline stays 1..N, each message once
    members = [f"u{i}" for i in range(10)]

    def one(i: int) -> list[str]:
        return list(send_group(rpc.stub, "room", members, {"i": i}).failed_members)

    with ThreadPoolExecutor(8) as pool:
        assert all(failed == [] for failed in pool.map(one, range(40)))
    for member in members:
        sync = rpc.stub.GetSyncMessage(pb.SyncMessageRequest(member=member, count=1000))
        assert [e.sequence for e in sync.entry_set] == list(range(1, 41))
        assert sorted(json.loads(e.message)["i"] for e in sync.entry_set) == list(range(40))


def test_graceful_stop_lets_a_call_in_flight_finish(settings: Settings, tmp_path: Path) -> None:
    settings = slow_writes(settings, tmp_path)
    served = Grpc(settings)
    blocker = sqlite3.connect(settings.sqlite_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(2) as pool:
            # Given a send in flight, waiting on the store
            in_flight = pool.submit(send, served.stub, "a", "b", {"text": "in flight"})
            time.sleep(0.3)
            # When the server stops with a grace period, and the store frees up meanwhile
            stopped = pool.submit(served.server.stop, 5.0)
            time.sleep(0.3)
            # Then new calls are refused at once
            with pytest.raises(grpc.RpcError) as refused:
                send(served.stub, "c", "d", {"text": "too late"})
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            blocker.execute("ROLLBACK")
            # And the call in flight completes
            assert in_flight.result(timeout=10).sequence == 1
            stopped.result(timeout=10)
    finally:
        blocker.close()
        served.channel.close()
        served.runtime.close()


def test_a_fan_out_cut_short_by_its_deadline_leaves_no_hole(
    settings: Settings, sqlite_store: Store
) -> None:
    """A 10,000-member SendGroup with a 20 ms deadline: DEADLINE_EXCEEDED, and whatever the
    server allocated for it is given back or sealed before it ends, so the next group
    message is readable by every member within a second, none of them waiting out the gap
    grace (6 s) on a hole."""
    served = Grpc(settings, sqlite_store)
    try:
        members = [f"m{i:05}" for i in range(10_000)]
        assert list(send_group(served.stub, "g", members, {"text": "first"}).failed_members) == []
        with pytest.raises(grpc.RpcError) as raised:
            send_group(served.stub, "g", members, {"text": "late"}, timeout=0.02)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert list(send_group(served.stub, "g", members, {"text": "next"}).failed_members) == []
        started = time.monotonic()
        for member in [*members[::250], members[-1]]:
            while True:
                reply = served.stub.GetSyncMessage(pb.SyncMessageRequest(member=member))
                got = [json.loads(e.message)["text"] for e in reply.entry_set]
                if "next" in got:
                    break
                assert time.monotonic() - started < 1.0, (member, got)
                time.sleep(0.01)
            assert got in (["first", "next"], ["first", "late", "next"]), (member, got)
    finally:
        served.close()


# --- waiting for the next message: wait_ms and Subscribe -------------------------------------


@pytest.fixture
def waiting(settings: Settings, store: Store) -> Iterator[Grpc]:
    """The gRPC API with waits of up to 10 s, its wake-up listener subscribed."""
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), store)
    wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
    yield served
    served.close()


@pytest.fixture
def sender(settings: Settings, store: Store) -> Iterator[Any]:
    """Another app (its own wake-ups) on the same Redis prefix and store: an HTTP client."""
    app = create_app(settings, store=store)
    yield app.test_client()
    app.extensions["timeline"]["wakes"].stop()


def http_send(client: Any, sender: str, receiver: str, text: str) -> str:
    body = {"from": sender, "to": receiver, "message": json.dumps({"text": text})}
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.status_code == 200, reply.get_data(as_text=True)
    sequence: str = reply.get_json()["sequence"]
    return sequence


def parked(served: Grpc, member: str) -> int:
    """How many calls of the server wait for the member's sync timeline."""
    return len(served.runtime.wakes._parked.get(f"s:{member}", ()))


def released(served: Grpc) -> bool:
    """No call of the server waits: no waiter, no watch, no slot taken."""
    wakes = served.runtime.wakes
    return not wakes._parked and not wakes._watched and served.server.holds.held == 0


class Follower:
    """A Subscribe call read by a thread of its own: the pages, in the order received."""

    def __init__(self, stub: Any, member: str, last_read: int = 0, timeout: float = 30) -> None:
        request = pb.SubscribeRequest(member=member, last_read=last_read)
        self.call = stub.Subscribe(request, timeout=timeout)
        self.pages: list[Any] = []
        self.error: Any = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for page in self.call:
                self.pages.append(page)
        except grpc.RpcError as error:
            self.error = error

    def sequences(self) -> list[int]:
        return [entry.sequence for page in self.pages for entry in page.entry_set]

    def texts(self) -> list[str]:
        return [json.loads(e.message)["text"] for page in self.pages for e in page.entry_set]

    def until(self, count: int, timeout_s: float = 5.0) -> list[int]:
        wait_for(lambda: len(self.sequences()) >= count, f"{count} entries", timeout_s)
        return self.sequences()

    def ended(self, timeout_s: float = 5.0) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.error

    def cancel(self) -> None:
        self.call.cancel()
        self.ended()


def test_a_waiting_read_is_answered_by_the_next_message_from_another_process(
    waiting: Grpc, sender: Any
) -> None:
    stub = waiting.stub
    with ThreadPoolExecutor(2) as pool:
        # Given a sync held with wait_ms, and nothing to read yet
        held = pool.submit(stub.GetSyncMessage, pb.SyncMessageRequest(member="b", wait_ms=10_000))
        wait_for(lambda: parked(waiting, "b") == 1, "the read to wait")
        # When another app sends b a message over HTTP (its wake-up crosses Redis)
        started = time.monotonic()
        assert http_send(sender, "a", "b", "hello") == "1"
        # Then the read answers with it, long before its 10 s
        reply = held.result(timeout=5)
        assert time.monotonic() - started < 5.0
        assert (texts(reply.entry_set), reply.entry_set_last_seq, reply.latest_seq) == (
            [(1, "hello")],
            1,
            1,
        )

        # A forward history read waits too, and is answered by a message sent over gRPC
        history = pool.submit(single, stub, "b", "a", last_read=1, wait_ms=10_000)
        wait_for(lambda: len(waiting.runtime.wakes._parked.get("h:a:b", ())) == 1, "history")
        send(stub, "b", "a", {"text": "there"})
        assert texts(history.result(timeout=5).entry_set) == [(2, "there")]

    # What is readable is answered at once, as without wait_ms
    started = time.monotonic()
    reply = stub.GetSyncMessage(pb.SyncMessageRequest(member="b", wait_ms=10_000))
    assert [e.sequence for e in reply.entry_set] == [1, 2]
    assert time.monotonic() - started < 2.0
    assert released(waiting)


def test_a_wait_that_ends_answers_the_normal_empty_page(waiting: Grpc) -> None:
    stub = waiting.stub
    empty = pb.SyncMessageReply(latest_seq=0, entry_set_last_seq=0, min_seq=1)
    # wait_ms over
    started = time.monotonic()
    assert stub.GetSyncMessage(pb.SyncMessageRequest(member="b", wait_ms=300)) == empty
    assert time.monotonic() - started >= 0.3
    # The call's deadline comes first: the empty page is answered before it, not an error
    started = time.monotonic()
    reply = stub.GetSyncMessage(pb.SyncMessageRequest(member="b", wait_ms=10_000), timeout=1.0)
    assert reply == empty
    assert 0.5 <= time.monotonic() - started < 1.0
    assert list(single(stub, "a", "b", wait_ms=200).entry_set) == []
    assert released(waiting)


def test_wait_ms_is_clamped_to_the_setting(settings: Settings, sqlite_store: SQLiteStore) -> None:
    served = Grpc(settings.replace(sync_wait_max_ms=200), sqlite_store)
    try:
        started = time.monotonic()
        reply = served.stub.GetSyncMessage(pb.SyncMessageRequest(member="b", wait_ms=600_000))
        assert list(reply.entry_set) == []
        assert time.monotonic() - started < 5.0  # clamped to 0.2 s, not refused
    finally:
        served.close()


def test_subscribe_sends_each_message_once_in_order_as_it_is_stored(
    waiting: Grpc, sender: Any
) -> None:
    # Given a member subscribed with nothing to read yet
    follower = Follower(waiting.stub, "b")
    try:
        wait_for(lambda: parked(waiting, "b") == 1, "the stream to wait")
        # When three messages are sent one after another (over HTTP, by another app)
        for i, text in enumerate(["one", "two", "three"], start=1):
            http_send(sender, "a", "b", text)
            # Then each is sent as soon as it is stored, in a page of its own
            assert follower.until(i) == list(range(1, i + 1))
        time.sleep(0.3)
        # in order, none twice
        assert follower.texts() == ["one", "two", "three"]
        assert [p.entry_set_last_seq for p in follower.pages] == [1, 2, 3]
        assert [p.latest_seq for p in follower.pages] == [1, 2, 3]
    finally:
        follower.cancel()


def test_subscribe_resumes_from_the_last_sequence_received(waiting: Grpc, sender: Any) -> None:
    stub = waiting.stub
    http_send(sender, "a", "b", "one")
    # A subscriber gets what is readable at once, then what follows
    first = Follower(stub, "b")
    assert first.until(1) == [1]
    http_send(sender, "a", "b", "two")
    assert first.until(2) == [1, 2]
    first.cancel()
    assert first.error.code() is grpc.StatusCode.CANCELLED
    # Messages sent while no one is subscribed
    http_send(sender, "a", "b", "three")
    http_send(sender, "a", "b", "four")
    # are received by the next subscription, from the last sequence received, exactly once
    again = Follower(stub, "b", last_read=first.pages[-1].entry_set_last_seq)
    try:
        assert again.until(2) == [3, 4]
        send(stub, "a", "b", {"text": "five"})
        assert again.until(3) == [3, 4, 5]
        time.sleep(0.3)
        assert again.texts() == ["three", "four", "five"]
    finally:
        again.cancel()


def test_a_hole_holds_the_stream_back_until_it_is_written(settings: Settings, store: Store) -> None:
    counted = CountedReads(store, "b")
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), counted)  # type: ignore[arg-type]
    wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
    service, wakes = served.runtime.service, served.runtime.wakes
    b = Timeline(Kind.SYNC, "b")
    now = int(time.time() * 1000)
    # Given b's seq 1 allocated and not yet written (a write in flight)
    service.allocator.allocate([b], 1, None, now)
    follower = Follower(served.stub, "b")
    try:
        wait_for(lambda: parked(served, "b") == 1, "the stream to wait")
        # When seq 2 is stored and its wake-up published, the stream reads again, and waits:
        # sending 2 would move the client past 1 for good
        reads = counted.reads
        service.allocator.allocate([b], 1, None, now)
        put(store, Kind.SYNC, "b", 2, Message({"text": "2"}, '{"text":"2"}'), now, "m2")
        wakes.publish([b])
        wait_for(lambda: counted.reads > reads and parked(served, "b") == 1, "a read, a wait")
        assert follower.pages == []
        # Once seq 1 lands, both are sent, in order, in one page
        put(store, Kind.SYNC, "b", 1, Message({"text": "1"}, '{"text":"1"}'), now, "m1")
        wakes.publish([b])
        assert follower.until(2) == [1, 2]
        assert [len(page.entry_set) for page in follower.pages] == [2]
    finally:
        follower.cancel()
        served.close()


def test_a_cancel_or_a_deadline_lets_the_waiter_go(waiting: Grpc) -> None:
    stub = waiting.stub
    cancelled_before = duration_count("Subscribe", 499)
    late_before = duration_count("Subscribe", 504)
    # A stream cancelled by its client while it waits
    follower = Follower(stub, "b")
    wait_for(lambda: parked(waiting, "b") == 1 and waiting.server.holds.held == 1, "a waiter")
    follower.cancel()
    wait_for(lambda: released(waiting), "the waiter to go")
    wait_for(lambda: duration_count("Subscribe", 499) == cancelled_before + 1, "its access line")
    # A held read cancelled by its client
    future = stub.GetSyncMessage.future(pb.SyncMessageRequest(member="b", wait_ms=10_000))
    wait_for(lambda: parked(waiting, "b") == 1, "the read to wait")
    future.cancel()
    wait_for(lambda: released(waiting), "the read to go")
    # A stream whose deadline passes
    started = time.monotonic()
    late = Follower(stub, "b", timeout=0.5)
    assert late.ended().code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    wait_for(lambda: released(waiting), "the stream to go")
    wait_for(lambda: duration_count("Subscribe", 504) == late_before + 1, "its access line")


def test_waiting_calls_are_capped_and_never_starve_the_others(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    # Given a server running 2 calls at once, and 2 more that wait
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), sqlite_store, threads=2, held=2)
    wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
    stub = served.stub
    followers = [Follower(stub, "f0"), Follower(stub, "f1")]
    try:
        wait_for(lambda: served.server.holds.held == 2, "both streams to wait")
        # A third stream, and a read that would wait, are refused: try again later
        for refused in (
            failure(lambda: next(stub.Subscribe(pb.SubscribeRequest(member="f2"), timeout=5))),
            failure(lambda: stub.GetSyncMessage(pb.SyncMessageRequest(member="f2", wait_ms=5000))),
        ):
            assert (refused.code, refused.reason, refused.retry_after_s) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TIMELINE_TOO_MANY_WAITING",
                1,
            )
        # Every other call is served, two at a time, on threads the streams do not hold
        with ThreadPoolExecutor(8) as pool:
            sent = list(
                pool.map(lambda i: send(stub, "x", f"f{i % 2}", {"text": str(i)}), range(8))
            )
        assert sorted(reply.sequence for reply in sent) == [1, 1, 2, 2, 3, 3, 4, 4]
        # and a read with wait_ms that has entries to answer takes no slot
        reply = stub.GetSyncMessage(pb.SyncMessageRequest(member="x", wait_ms=5000), timeout=5)
        assert len(reply.entry_set) == 8
        assert [f.until(4) for f in followers] == [[1, 2, 3, 4]] * 2
        # Once a stream ends, its slot is free for another
        followers[0].cancel()
        wait_for(lambda: served.server.holds.held == 1, "the slot to be free")
        followers[0] = Follower(stub, "f0", last_read=4)
        wait_for(lambda: served.server.holds.held == 2, "the new stream to wait")
        assert followers[0].error is None
    finally:
        for follower in followers:
            follower.cancel()
        served.close()


def test_waiting_calls_hold_no_thread(waiting: Grpc, sender: Any) -> None:
    # Given 300 streams and 300 reads with wait_ms held by one server, for 3 members
    stub = waiting.stub
    members = ["w0", "w1", "w2"]

    def server_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("timeline-grpc"))

    streams = [stub.Subscribe(pb.SubscribeRequest(member=members[i % 3])) for i in range(150)]
    reads = [
        stub.GetSyncMessage.future(pb.SyncMessageRequest(member=members[i % 3], wait_ms=10_000))
        for i in range(150)
    ]
    wait_for(lambda: waiting.server.holds.held == 300, "300 to wait", 10.0)
    streams += [stub.Subscribe(pb.SubscribeRequest(member=members[i % 3])) for i in range(150)]
    reads += [
        stub.GetSyncMessage.future(pb.SyncMessageRequest(member=members[i % 3], wait_ms=10_000))
        for i in range(150)
    ]
    wait_for(lambda: waiting.server.holds.held == 600, "600 to wait", 10.0)
    # the server's threads are its pool's (at most THREADS, made as reads need them), its
    # loop's and its health check's, whatever the waiters (grpcio's own server held one
    # per call),
    assert server_threads() <= THREADS + 2
    # and one group message wakes every one of them.
    body = {"group_name": "g", "group_members": members, "message": json.dumps({"text": "all"})}
    assert sender.post("/timeline/sendGroup", data=json.dumps(body)).status_code == 200
    for read in reads:
        assert texts(read.result(timeout=10).entry_set) == [(1, "all")]
    for stream in streams:
        assert texts(next(stream).entry_set) == [(1, "all")]
        stream.cancel()
    wait_for(lambda: released(waiting), "every waiter to go")


def test_a_quiet_wait_ends_on_the_page_it_read(settings: Settings, store: Store) -> None:
    # Nothing allocated past last_read: a wait that nothing woke answers the page it read,
    # without reading again (a sequence allocated meanwhile, its write in flight, is not
    # a wake-up).
    counted = CountedReads(store, "q")
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), counted)  # type: ignore[arg-type]
    try:
        wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
        held = served.stub.GetSyncMessage.future(pb.SyncMessageRequest(member="q", wait_ms=600))
        wait_for(lambda: parked(served, "q") == 1, "the read to wait")
        served.runtime.service.allocator.allocate(
            [Timeline(Kind.SYNC, "q")], 1, None, int(time.time() * 1000)
        )
        reply = held.result(timeout=5)
        assert (list(reply.entry_set), reply.latest_seq) == ([], 0)
        assert counted.reads == 1
    finally:
        served.close()


def test_a_wait_stopped_at_a_hole_reads_again_at_its_end(settings: Settings, store: Store) -> None:
    # Seq 1 allocated and never written, seq 2 stored: the read stops before the hole. A
    # seal publishes nothing, so the end of the wait reads again and finds 2.
    counted = CountedReads(store, "h")
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), counted)  # type: ignore[arg-type]
    try:
        wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
        now = int(time.time() * 1000)
        served.runtime.service.allocator.allocate([Timeline(Kind.SYNC, "h")], 2, None, now)
        put(store, Kind.SYNC, "h", 2, Message({"text": "2"}, '{"text":"2"}'), now, "m2")
        held = served.stub.GetSyncMessage.future(pb.SyncMessageRequest(member="h", wait_ms=800))
        wait_for(lambda: parked(served, "h") == 1, "the read to wait")
        store.seal(Kind.SYNC, [("h", 1)], now)
        assert texts(held.result(timeout=5).entry_set) == [(2, "2")]
        assert counted.reads == 2
    finally:
        served.close()


def test_a_stopping_server_ends_its_waiting_calls_at_once(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    served = Grpc(settings.replace(sync_wait_max_ms=10_000), sqlite_store)
    wait_for(lambda: served.runtime.wakes.listening, "the wake-up listener to subscribe")
    try:
        follower = Follower(served.stub, "b")
        held = served.stub.GetSyncMessage.future(pb.SyncMessageRequest(member="c", wait_ms=10_000))
        wait_for(lambda: served.server.holds.held == 2, "both to wait")
        # When the server stops, with calls in flight given 5 s
        started = time.monotonic()
        stopping = threading.Thread(target=served.server.stop, args=(5.0,))
        stopping.start()
        # Then the stream ends at once, UNAVAILABLE: its client subscribes again, elsewhere
        ended = failure_of(follower.ended())
        assert (ended.code, ended.reason, ended.retry_after_s) == (
            grpc.StatusCode.UNAVAILABLE,
            "TIMELINE_UNAVAILABLE",
            1,
        )
        # and the held read answers its empty page
        assert list(held.result(timeout=5).entry_set) == []
        assert time.monotonic() - started < 2.0
        stopping.join(10)
    finally:
        served.channel.close()
        served.runtime.close()


def test_a_client_that_stops_reading_stops_the_stream(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    # Given 200 messages of 50 KB for b (10 MB), one to a page (page_max_bytes)
    counted = CountedReads(sqlite_store, "b")
    settings = settings.replace(sync_wait_max_ms=10_000, page_max_bytes=60_000)
    served = Grpc(settings, counted)  # type: ignore[arg-type]
    try:
        text = "x" * 50_000
        for _ in range(200):
            served.runtime.service.send(
                "a", "b", [Message({"text": text}, json.dumps({"text": text}))], None
            )
        # When a client subscribes and reads nothing
        call = served.stub.Subscribe(pb.SubscribeRequest(member="b"), timeout=30)
        # Then the server sends what the client's HTTP/2 window takes (4 MiB by grpc's
        # defaults: about 85 pages) and stops reading there: its stream waits, with one page
        # in hand, until the client reads
        ahead, deadline = -1, time.monotonic() + 10
        while ahead != counted.reads or ahead < 1:
            assert time.monotonic() < deadline, "the stream never stopped"
            ahead = counted.reads
            time.sleep(0.5)
        assert ahead <= 120
        # And once the client reads, it gets every entry, in order, once
        got: list[int] = []
        for page in call:
            got += [entry.sequence for entry in page.entry_set]
            if len(got) >= 200:
                break
        assert got == list(range(1, 201))
        call.cancel()
    finally:
        served.close()
