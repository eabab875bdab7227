"""The HTTP contract through Flask's test client, on both stores."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from support import put
from timeline.model import Kind, Message
from timeline.store import Store


def post(client: Any, path: str, body: Any, **kwargs: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def send(client: Any, sender: str, receiver: str, text: str) -> Any:
    message = json.dumps({"from": sender, "to": receiver, "text": text}, ensure_ascii=False)
    return post(client, "/timeline/send", {"from": sender, "to": receiver, "message": message})


def send_group(client: Any, sender: str, group: str, members: list[str], text: str) -> Any:
    message = json.dumps({"from": sender, "group": group, "text": text}, ensure_ascii=False)
    body = {"group_name": group, "group_members": members, "message": message}
    return post(client, "/timeline/sendGroup", body)


def texts(entries: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(e["sequence"], json.loads(e["message"])["text"]) for e in entries]


# --- the seed's example ---------------------------------------------------------------


def test_seed_example(client: Any) -> None:
    assert send(client, "a", "b", "吃了吗？").get_json() == {"sequence": "1"}
    assert send(client, "b", "a", "吃了").get_json() == {"sequence": "2"}
    group = ["a", "c", "d"]
    for sender, text in [("a", "大家好"), ("c", "报三围"), ("a", "初次见面，多多指教")]:
        reply = send_group(client, sender, "group_a", group, text)
        assert reply.status_code == 200
        assert reply.get_json() == {"failedMembers": []}

    sync = client.get("/timeline/sync?member=a&last_read=0&count=10").get_json()
    assert texts(sync["entrySet"]) == [
        ("1", "吃了吗？"),
        ("2", "吃了"),
        ("3", "大家好"),
        ("4", "报三围"),
        ("5", "初次见面，多多指教"),
    ]
    assert sync["latestSeq"] == "5"
    assert sync["entrySetLastSeq"] == "5"

    for path in ("/timeline/history/single/a/b", "/timeline/history/single/b/a"):
        history = client.get(path + "?last_read=0&count=10").get_json()
        assert texts(history["entrySet"]) == [("1", "吃了吗？"), ("2", "吃了")]
    history = client.get("/timeline/history/group/group_a?last_read=0&count=10").get_json()
    assert texts(history["entrySet"]) == [
        ("1", "大家好"),
        ("2", "报三围"),
        ("3", "初次见面，多多指教"),
    ]
    # The messages come back exactly as the clients wrote them.
    first = json.loads(sync["entrySet"][0]["message"])
    assert first == {"from": "a", "to": "b", "text": "吃了吗？"}


# --- protojson conventions --------------------------------------------------------------


def test_zero_values_are_written(client: Any) -> None:
    reply = client.get("/timeline/sync?member=nobody")
    assert reply.status_code == 200
    assert reply.get_json() == {
        "latestSeq": "0",
        "entrySetLastSeq": "0",
        "entrySet": [],
        "minSeq": "1",  # extension: a new member's timeline can return from 1 on
    }
    assert client.get("/timeline/history/group/nobody").get_json() == {"entrySet": []}
    assert client.get("/timeline/history/single/x/y").get_json() == {"entrySet": []}


def test_int64_fields_are_strings_and_accept_numbers_or_strings(client: Any) -> None:
    for i in range(3):
        send(client, "a", "b", f"m{i}")
    for last_read in ("1", 1):
        reply = client.get("/timeline/sync", query_string={"member": "b", "last_read": last_read})
        body = reply.get_json()
        assert body["latestSeq"] == "3"
        assert [e["sequence"] for e in body["entrySet"]] == ["2", "3"]
    # The contract's history routes read last_read as string or number alike.
    body = client.get("/timeline/history/single/a/b?last_read=2").get_json()
    assert [e["sequence"] for e in body["entrySet"]] == ["3"]


def test_both_field_spellings_are_accepted(client: Any) -> None:
    body = {"groupName": "g", "groupMembers": ["a", "b"], "message": {"text": "camel"}}
    assert post(client, "/timeline/sendGroup", body).get_json() == {"failedMembers": []}
    send_group(client, "a", "g", ["a", "b"], "proto")
    reply = client.get("/timeline/sync?member=a&lastRead=1&count=5").get_json()
    assert texts(reply["entrySet"]) == [("2", "proto")]


def test_message_object_is_accepted_as_extension(client: Any) -> None:
    body = {"from": "a", "to": "b", "message": {"text": "object", "n": 1}}
    assert post(client, "/timeline/send", body).get_json() == {"sequence": "1"}
    [entry] = client.get("/timeline/sync?member=b").get_json()["entrySet"]
    assert json.loads(entry["message"]) == {"text": "object", "n": 1}


def test_unknown_request_fields_are_ignored(client: Any, store: Store) -> None:
    # Given a send carrying fields the API does not know,
    body = {"from": "a", "to": "b", "message": '{"text":"hi"}', "priority": 5, "extra": {"x": 1}}
    # when it is posted, then it is answered as if they were absent,
    assert post(client, "/timeline/send", body).get_json() == {"sequence": "1"}
    # and the message alone is stored, in both sync timelines and the history: the unknown
    # fields are neither stored nor merged into it.
    for kind, timeline_id in ((Kind.SYNC, "a"), (Kind.SYNC, "b"), (Kind.HISTORY, "a:b")):
        [entry] = store.read(kind, timeline_id, 0, 10)
        assert (entry.seq, json.loads(entry.message)) == (1, {"text": "hi"}), timeline_id
    [entry] = client.get("/timeline/sync?member=b").get_json()["entrySet"]
    assert (entry["sequence"], entry["message"]) == ("1", '{"text":"hi"}')


def test_form_content_type_is_read_as_json(client: Any) -> None:
    # curl -d '{...}' sends application/x-www-form-urlencoded.
    data = json.dumps({"from": "a", "to": "b", "message": '{"text":"curl"}'})
    reply = client.post(
        "/timeline/send", data=data, content_type="application/x-www-form-urlencoded"
    )
    assert reply.status_code == 200
    assert reply.get_json() == {"sequence": "1"}


def test_send_to_self_writes_one_sync_copy(client: Any) -> None:
    assert send(client, "a", "a", "note to self").get_json() == {"sequence": "1"}
    body = client.get("/timeline/sync?member=a").get_json()
    assert texts(body["entrySet"]) == [("1", "note to self")]
    history = client.get("/timeline/history/single/a/a").get_json()
    assert texts(history["entrySet"]) == [("1", "note to self")]


def test_duplicate_group_members_receive_one_copy(client: Any) -> None:
    send_group(client, "a", "g", ["a", "b", "a", "b"], "once")
    assert texts(client.get("/timeline/sync?member=a").get_json()["entrySet"]) == [("1", "once")]
    assert client.get("/timeline/sync?member=a").get_json()["latestSeq"] == "1"


def sync_page(client: Any, member: str, last_read: str, count: int) -> tuple[Any, ...]:
    """One pull: the sequences it returned, its entrySetLastSeq and its latestSeq."""
    reply = client.get(f"/timeline/sync?member={member}&last_read={last_read}&count={count}")
    assert reply.status_code == 200, reply.get_data(as_text=True)
    body = reply.get_json()
    return [e["sequence"] for e in body["entrySet"]], body["entrySetLastSeq"], body["latestSeq"]


def test_sync_pages_hold_count_entries_and_end_at_the_latest(client: Any) -> None:
    # Given five messages in b's sync timeline,
    for i in range(5):
        send(client, "a", "b", f"m{i}")
    # when a device pulls with count=2, each time from the entrySetLastSeq it got,
    pages = []
    last_read = "0"
    for _ in range(4):
        page = sync_page(client, "b", last_read, count=2)
        pages.append(page)
        last_read = page[1] if page[0] else last_read
    # then every page holds exactly count entries but the last, and says where it ended;
    # the one that reaches latestSeq is the last, and the pull after it is empty.
    assert pages == [
        (["1", "2"], "2", "5"),
        (["3", "4"], "4", "5"),
        (["5"], "5", "5"),
        ([], "0", "5"),
    ]


@pytest.mark.parametrize(
    ("last_read", "count", "expected"),
    [
        ("0", 1, ["1"]),
        ("0", 4, ["1", "2", "3", "4"]),
        ("0", 5, ["1", "2", "3", "4", "5"]),  # exactly all: the page ends at latestSeq
        ("0", 6, ["1", "2", "3", "4", "5"]),
        ("1", 3, ["2", "3", "4"]),
        ("3", 2, ["4", "5"]),
        ("4", 1, ["5"]),
        ("5", 3, []),
    ],
)
def test_sync_returns_at_most_count_entries_after_last_read(
    client: Any, last_read: str, count: int, expected: list[str]
) -> None:
    for i in range(5):
        send(client, "a", "b", f"m{i}")
    last_seq = expected[-1] if expected else "0"
    assert sync_page(client, "b", last_read, count) == (expected, last_seq, "5")


@pytest.mark.parametrize("route", ["/timeline/history/single/b/a", "/timeline/history/group/g"])
def test_history_pages_forward_hold_count_entries(client: Any, route: str) -> None:
    # Given five messages in a conversation (a one-to-one, or a group),
    for i in range(5):
        if "group" in route:
            send_group(client, "a", "g", ["a", "b"], f"m{i}")
        else:
            send(client, "a", "b", f"m{i}")

    def page(last_read: str, count: int, spelling: str = "last_read") -> list[str]:
        reply = client.get(f"{route}?{spelling}={last_read}&count={count}")
        assert reply.status_code == 200, reply.get_data(as_text=True)
        body = reply.get_json()
        assert set(body) == {"entrySet"}  # forward is go-timeline's shape: no nextBefore
        return [e["sequence"] for e in body["entrySet"]]

    # when a web client pages forward with count=2 from the last sequence it has,
    pages, last_read = [], "0"
    for _ in range(4):
        pages.append(page(last_read, 2))
        last_read = pages[-1][-1] if pages[-1] else last_read
    # then it gets [1, 2] [3, 4] [5], then nothing;
    assert pages == [["1", "2"], ["3", "4"], ["5"], []]
    # count bounds every page, whatever it starts from and however last_read is spelt.
    assert page("0", 1) == ["1"]
    assert page("1", 3, "lastRead") == ["2", "3", "4"]
    assert page("0", 5) == ["1", "2", "3", "4", "5"]
    assert page("2", 10) == ["3", "4", "5"]


def test_count_defaults_to_100(client: Any) -> None:
    members = ["a"]
    for i in range(101):
        send_group(client, "a", "g", members, f"m{i}")
    assert len(client.get("/timeline/sync?member=a").get_json()["entrySet"]) == 100
    assert len(client.get("/timeline/sync?member=a&count=0").get_json()["entrySet"]) == 100
    assert len(client.get("/timeline/history/group/g?count=101").get_json()["entrySet"]) == 101


# --- retries: a client_msg_id replays the first answer ------------------------------------


def test_a_retry_with_the_same_client_msg_id_replays_its_sequences(client: Any) -> None:
    # Given a message sent with a client_msg_id, and another message to b after it,
    body = {"from": "a", "to": "b", "message": {"text": "hi"}, "client_msg_id": "a-0001"}
    assert post(client, SEND, body).get_json() == {"sequence": "1"}
    assert send(client, "c", "b", "later").get_json() == {"sequence": "2"}
    # when the first is sent again (its reply was lost), twice,
    replies = [post(client, SEND, body).get_json() for _ in range(2)]
    # then each retry gets the first answer, and nothing is allocated or stored again.
    assert replies == [{"sequence": "1"}, {"sequence": "1"}]
    inbox = client.get("/timeline/sync?member=b").get_json()
    assert texts(inbox["entrySet"]) == [("1", "hi"), ("2", "later")]
    assert inbox["latestSeq"] == "2"
    sender = client.get("/timeline/sync?member=a").get_json()
    assert (texts(sender["entrySet"]), sender["latestSeq"]) == ([("1", "hi")], "1")
    history = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert texts(history) == [("1", "hi")]
    # The same id with another message is refused, and stores nothing either.
    other = post(client, SEND, body | {"message": {"text": "other"}})
    assert assert_envelope(other, 409)["reason"] == "TIMELINE_CLIENT_MSG_ID_REUSED"
    assert client.get("/timeline/sync?member=b").get_json()["latestSeq"] == "2"


def test_a_retried_group_message_is_stored_once(client: Any) -> None:
    # Given a group message with a client_msg_id, already stored for a, b and c,
    body = {
        "group_name": "g",
        "group_members": ["a", "b", "c"],
        "message": {"text": "hello"},
        "clientMsgId": "g-1",
    }
    assert post(client, GROUP, body).get_json() == {"failedMembers": []}
    # when it is retried, its members listed in another order,
    retry = body | {"group_members": ["c", "a", "b"]}
    assert post(client, GROUP, retry).get_json() == {"failedMembers": []}
    # then every member and the group's history hold it once, at 1.
    for member in ("a", "b", "c"):
        reply = client.get(f"/timeline/sync?member={member}").get_json()
        assert (texts(reply["entrySet"]), reply["latestSeq"]) == ([("1", "hello")], "1"), member
    history = client.get("/timeline/history/group/g").get_json()["entrySet"]
    assert texts(history) == [("1", "hello")]


# --- validation: every bad input is a 4xx envelope and stores nothing ---------------------

DEEP: Any = {"x": 1}
for _ in range(70):
    DEEP = {"x": DEEP}

SEND = "/timeline/send"
GROUP = "/timeline/sendGroup"
OK_MESSAGE = '{"text":"hi"}'


def bad_send(**fields: Any) -> dict[str, Any]:
    """A valid send body with some fields replaced; a field set to None is left out."""
    body = {"from": "a", "to": "b", "message": OK_MESSAGE} | fields
    return {key: value for key, value in body.items() if value is not None}


def bad_group(**fields: Any) -> dict[str, Any]:
    body = {"group_name": "g", "group_members": ["a", "b"], "message": OK_MESSAGE} | fields
    return {key: value for key, value in body.items() if value is not None}


BIG = "x" * 65536
BAD_POSTS: list[tuple[str, str, Any, int]] = [
    ("send without from", SEND, bad_send(**{"from": None}), 400),
    ("send without to", SEND, bad_send(to=None), 400),
    ("send without message", SEND, bad_send(message=None), 400),
    ("empty body", SEND, None, 400),
    ("operator object as from", SEND, bad_send(**{"from": {"$gt": ""}}), 400),
    ("number as to", SEND, bad_send(to=7), 400),
    ("list as from", SEND, bad_send(**{"from": ["a"]}), 400),
    ("colon in from", SEND, bad_send(**{"from": "a:b"}), 400),
    ("slash in from", SEND, bad_send(**{"from": "a/b"}), 400),
    ("slash in to", SEND, bad_send(to="/"), 400),
    ("dot-dot as to", SEND, bad_send(to=".."), 400),
    ("repeated from", SEND, '{"from":"a","from":"c","to":"b","message":"{}"}', 400),
    ("id too long", SEND, bad_send(**{"from": "a" * 129}), 400),
    ("control char in id", SEND, bad_send(**{"from": "a\x01"}), 400),
    ("newline in id", SEND, bad_send(to="b\n"), 400),
    ("message not JSON", SEND, bad_send(message="hello"), 400),
    ("message a JSON array", SEND, bad_send(message="[1]"), 400),
    ("message a number", SEND, bad_send(message=5), 400),
    ("message a list", SEND, bad_send(message=[{"a": 1}]), 400),
    ("message too deep", SEND, bad_send(message=DEEP), 400),
    ("message too deep as string", SEND, bad_send(message=json.dumps(DEEP)), 400),
    ("message int over int64", SEND, bad_send(message={"n": 2**63}), 400),
    ("message int over uint64", SEND, bad_send(message={"n": 2**64}), 400),
    ("message text int over uint64", SEND, bad_send(message=f'{{"n":{2**70}}}'), 400),
    ("message NUL in key", SEND, bad_send(message={"a\x00b": 1}), 400),
    ("message over 64 KiB", SEND, bad_send(message={"t": BIG}), 413),
    ("message text over 64 KiB", SEND, bad_send(message=f'{{"t":"{BIG}"}}'), 413),
    ("body not an object", SEND, [1, 2], 400),
    ("group without name", GROUP, bad_group(group_name=None), 400),
    ("group with no members", GROUP, bad_group(group_members=[]), 400),
    ("members not a list", GROUP, bad_group(group_members="a"), 400),
    ("member not a string", GROUP, bad_group(group_members=["a", {"$ne": 1}]), 400),
    ("member with colon", GROUP, bad_group(group_members=["a", "b:c"]), 400),
    ("group name with colon", GROUP, bad_group(group_name="a:b"), 400),
    ("group name with slash", GROUP, bad_group(group_name="g/h"), 400),
    ("group name a dot", GROUP, bad_group(group_name="."), 400),
    ("member with slash", GROUP, bad_group(group_members=["a", "b/c"]), 400),
    ("member a dot-dot", GROUP, bad_group(group_members=["a", ".."]), 400),
    ("too many members", GROUP, bad_group(group_members=[f"m{i}" for i in range(10_001)]), 400),
    ("both spellings", GROUP, bad_group(groupName="h"), 400),
    ("group without message", GROUP, bad_group(message=None), 400),
]


def assert_envelope(reply: Any, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.get_data(as_text=True)
    assert reply.mimetype == "application/json"
    body: dict[str, Any] = reply.get_json()
    assert set(body) == {"code", "reason", "message", "metadata"}
    assert body["code"] == status
    assert body["reason"].startswith("TIMELINE_")
    assert body["message"]
    return body


def assert_nothing_stored(redis_client: redis.Redis, key_prefix: str, store: Store) -> None:
    assert redis_client.keys(f"{key_prefix}*") == []
    for kind in Kind:
        for timeline_id in ("a", "b", "c", "g", "a:b", "h"):
            assert store.read(kind, timeline_id, 0, 10) == []


@pytest.mark.parametrize(
    ("case", "path", "body", "status"), BAD_POSTS, ids=[c[0] for c in BAD_POSTS]
)
def test_bad_posts_get_a_4xx_and_store_nothing(
    client: Any,
    redis_client: redis.Redis,
    key_prefix: str,
    store: Store,
    case: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    if body is None:
        data = b""
    elif isinstance(body, str):  # raw JSON that json.dumps cannot write: a repeated key
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    reply = client.post(path, data=data, content_type="application/json")
    envelope = assert_envelope(reply, status)
    assert envelope["reason"] == (
        "TIMELINE_INVALID_PARAM" if status == 400 else "TIMELINE_PAYLOAD_TOO_LARGE"
    )
    assert_nothing_stored(redis_client, key_prefix, store)


def test_body_that_is_not_json_is_a_400(client: Any) -> None:
    reply = client.post(SEND, data=b"from=a&to=b", content_type="application/x-www-form-urlencoded")
    assert assert_envelope(reply, 400)["reason"] == "TIMELINE_INVALID_PARAM"


def test_body_over_the_limit_is_a_413(client: Any, app: Any) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1000
    body = {"from": "a", "to": "b", "message": {"t": "x" * 2000}}
    assert_envelope(post(client, SEND, body), 413)


BAD_GETS = [
    ("sync without member", "/timeline/sync"),
    ("sync member empty", "/timeline/sync?member="),
    ("sync member with colon", "/timeline/sync?member=a:b"),
    ("sync member with slash", "/timeline/sync?member=a%2Fb"),
    ("sync member dot-dot", "/timeline/sync?member=.."),
    ("sync member not UTF-8", "/timeline/sync?member=%FF"),
    ("history query not UTF-8", "/timeline/history/group/g?count=%C0"),
    ("history group dot", "/timeline/history/group/."),
    ("last_read not a number", "/timeline/sync?member=a&last_read=abc"),
    ("last_read negative", "/timeline/sync?member=a&last_read=-1"),
    ("last_read over int64", f"/timeline/sync?member=a&last_read={2**63}"),
    ("last_read fraction", "/timeline/sync?member=a&last_read=1.5"),
    ("count over the cap", "/timeline/sync?member=a&count=1001"),
    ("count negative", "/timeline/sync?member=a&count=-1"),
    ("member repeated", "/timeline/sync?member=a&member=b"),
    ("last_read in both spellings", "/timeline/sync?member=a&last_read=1&lastRead=2"),
    ("history single with colon", "/timeline/history/single/a:b/c"),
    ("history group with colon", "/timeline/history/group/a:b"),
    ("history count over the cap", "/timeline/history/group/g?count=5000"),
    ("history bad last_read", "/timeline/history/single/a/b?last_read=x"),
]


@pytest.mark.parametrize(("case", "url"), BAD_GETS, ids=[c[0] for c in BAD_GETS])
def test_bad_reads_get_a_400(client: Any, case: str, url: str) -> None:
    assert assert_envelope(client.get(url), 400)["reason"] == "TIMELINE_INVALID_PARAM"


def test_errors_name_the_field(client: Any) -> None:
    body = assert_envelope(post(client, SEND, {"from": {"$gt": ""}, "to": "b"}), 400)
    assert body["metadata"] == {"field": "from"}
    assert "from" in body["message"]


def test_unknown_route_and_wrong_method_use_the_envelope(
    client: Any, settings: Any, store: Store
) -> None:
    from timeline.factory import create_app

    assert assert_envelope(client.get("/timeline/nope"), 404)["reason"] == "TIMELINE_NOT_FOUND"
    # / is the console's page (tests/test_console.py) unless the console is off: then no route.
    api_only = create_app(settings.replace(console=False), store=store).test_client()
    assert assert_envelope(api_only.get("/"), 404)["reason"] == "TIMELINE_NOT_FOUND"
    reply = client.get("/timeline/send")
    assert assert_envelope(reply, 405)["reason"] == "TIMELINE_METHOD_NOT_ALLOWED"
    assert "POST" in reply.headers["Allow"]
    assert_envelope(client.delete("/timeline/sync?member=a"), 405)


# --- concurrency -------------------------------------------------------------------------


def test_concurrent_senders_leave_every_timeline_contiguous(app: Any) -> None:
    users = ["u0", "u1", "u2", "u3", "u4"]
    expected: dict[str, set[str]] = defaultdict(set)  # sync timeline -> message ids
    lock = threading.Lock()

    def work(worker: int) -> None:
        client = app.test_client()
        for i in range(12):
            message_id = f"w{worker}-{i}"
            if i % 3 == 0:
                members = users[: 2 + (worker + i) % 4]
                reply = send_group(client, users[worker % 5], "g", members, message_id)
                assert reply.get_json() == {"failedMembers": []}
                recipients = set(members)
            else:
                sender, receiver = users[worker % 5], users[(worker + i) % 5]
                assert send(client, sender, receiver, message_id).status_code == 200
                recipients = {sender, receiver}
            with lock:
                for user in recipients:
                    expected[user].add(message_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))

    client = app.test_client()
    for user in users:
        body = client.get(f"/timeline/sync?member={user}&count=1000").get_json()
        sequences = [int(e["sequence"]) for e in body["entrySet"]]
        ids = [json.loads(e["message"])["text"] for e in body["entrySet"]]
        assert sequences == list(range(1, len(sequences) + 1)), user
        assert sorted(ids) == sorted(expected[user]), user  # each message once, none lost
        assert body["latestSeq"] == str(len(sequences))
    history = client.get("/timeline/history/group/g?count=1000").get_json()["entrySet"]
    assert [int(e["sequence"]) for e in history] == list(range(1, 8 * 4 + 1))


# --- one Redis command per request --------------------------------------------------------


def commands_during(redis_client: redis.Redis, action: Any) -> list[str]:
    """The commands clients (not scripts) sent to Redis while `action` ran, per MONITOR."""
    marker = f"marker-{time.monotonic_ns()}"
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with redis_client.monitor() as monitor:
            ready.set()
            recording = False
            for command in monitor.listen():
                text = command["command"]
                if text == f"ECHO {marker}-start":
                    recording = True
                elif text == f"ECHO {marker}-end":
                    return
                elif recording and command.get("client_type") != "lua":
                    seen.append(text)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert ready.wait(5)  # set once the server acknowledged MONITOR: nothing is missed
    other = redis.Redis(connection_pool=redis_client.connection_pool)
    other.echo(f"{marker}-start")
    action()
    other.echo(f"{marker}-end")
    watcher.join(60)  # a loaded machine may relay MONITOR's stream slowly
    assert not watcher.is_alive(), "MONITOR never showed the end marker"
    return seen


def test_each_request_costs_one_redis_command(client: Any, redis_url: str) -> None:
    monitor_client = redis.Redis.from_url(redis_url)
    members = [f"m{i}" for i in range(500)]
    # The first calls load the script, connect, and create the counters of new timelines.
    send(client, "a", "b", "warm up")
    send_group(client, "a", "g", members, "warm up")

    # (The wake-up of waiting readers is published off the request's path, by a thread.)
    def names(commands: list[str]) -> list[str]:
        return [c.split()[0] for c in commands if not c.startswith("PUBLISH")]

    sent = commands_during(monitor_client, lambda: send(client, "a", "b", "one"))
    assert names(sent) == ["EVALSHA"]

    grouped = commands_during(
        monitor_client, lambda: send_group(client, "a", "g", members, "five hundred")
    )
    assert names(grouped) == ["EVALSHA"]

    synced = commands_during(monitor_client, lambda: client.get("/timeline/sync?member=m7"))
    assert names(synced) == ["GET"]

    read = commands_during(monitor_client, lambda: client.get("/timeline/history/group/g"))
    assert names(read) == []
    monitor_client.close()


# --- readers never step over a write in flight --------------------------------------------


def test_sync_stops_before_a_fresh_hole_and_passes_an_old_one(client: Any, store: Store) -> None:
    now = int(time.time() * 1000)

    def put_seq(seq: int, created_at_ms: int) -> None:
        message = Message({"n": seq}, orjson.dumps({"n": seq}).decode())
        put(store, Kind.SYNC, "r", seq, message, created_at_ms, "")

    # Given seq 2 allocated but not yet written, and seq 3 written just now,
    put_seq(1, now)
    put_seq(3, now)
    body = client.get("/timeline/sync?member=r").get_json()
    # then a reader gets seq 1 only, and will come back for 2 and 3.
    assert [e["sequence"] for e in body["entrySet"]] == ["1"]
    assert body["entrySetLastSeq"] == "1"

    # Given a hole whose next entry is older than the grace period, the writer has failed:
    put_seq(5, now - 60_000)
    body = client.get("/timeline/sync?member=r&last_read=3").get_json()
    assert [e["sequence"] for e in body["entrySet"]] == ["5"]


# --- one bulk write per collection --------------------------------------------------------


class CountingCollection:
    """Delegates to a real collection and counts the write calls made on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    def insert_one(self, document: Any, **kwargs: Any) -> Any:
        self.calls.append(("insert_one", 1))
        return self.inner.insert_one(document, **kwargs)

    def insert_many(self, documents: Any, **kwargs: Any) -> Any:
        documents = list(documents)
        self.calls.append(("insert_many", len(documents)))
        assert kwargs.get("ordered") is False
        return self.inner.insert_many(documents, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_mongo_fan_out_is_one_insert_one_and_one_insert_many(
    settings: Any, mongo_store: Any
) -> None:
    from timeline.factory import create_app

    client = create_app(settings, store=mongo_store).test_client()
    counting = {kind: CountingCollection(c) for kind, c in mongo_store._collections.items()}
    mongo_store._collections = counting
    members = [f"m{i}" for i in range(300)]
    assert send_group(client, "a", "g", members, "hello").get_json() == {"failedMembers": []}
    assert counting[Kind.HISTORY].calls == [("insert_one", 1)]
    assert counting[Kind.SYNC].calls == [("insert_many", 300)]


def test_sqlite_fan_out_is_one_transaction(settings: Any, sqlite_store: Any) -> None:
    from timeline.factory import create_app

    client = create_app(settings, store=sqlite_store).test_client()
    send(client, "a", "b", "warm up")  # opens this thread's connection
    statements: list[str] = []
    sqlite_store._connections.connection().set_trace_callback(statements.append)
    send_group(client, "a", "g", [f"m{i}" for i in range(300)], "hello")
    transactions = [s for s in statements if s.split()[0] in {"BEGIN", "COMMIT", "ROLLBACK"}]
    assert transactions == ["BEGIN IMMEDIATE", "COMMIT"]


# --- edges found in review ------------------------------------------------------------------


def test_an_oversized_integer_elsewhere_in_the_body_does_not_taint_the_message(
    client: Any,
) -> None:
    # orjson reads 1e19 as a float; the message is read again exactly, and only the message.
    data = b'{"from":"a","to":"b","x":18446744073709551616,"message":{"f":1e19}}'
    reply = client.post(SEND, data=data)
    assert reply.status_code == 200
    [entry] = client.get("/timeline/sync?member=b").get_json()["entrySet"]
    assert json.loads(entry["message"]) == {"f": 1e19}


def test_a_deeply_nested_unknown_field_is_a_400_not_a_500(client: Any) -> None:
    deep = "[" * 1000 + "]" * 1000
    data = f'{{"from":"a","to":"b","x":{deep},"message":{{"f":1e19}}}}'.encode()
    assert_envelope(client.post(SEND, data=data), 400)


def test_a_chunked_body_over_the_limit_is_a_413(client: Any, app: Any) -> None:
    import io

    app.config["MAX_CONTENT_LENGTH"] = 1000
    body = json.dumps({"from": "a", "to": "b", "message": "{}"}).encode()
    data = body + b" " * 2000 + b"not json"
    reply = client.post(
        SEND,
        input_stream=io.BytesIO(data),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_envelope(reply, 413)
    assert client.get("/timeline/sync?member=b").get_json()["latestSeq"] == "0"


def test_a_body_shorter_than_its_content_length_is_refused(client: Any) -> None:
    import io

    body = json.dumps({"from": "a", "to": "b", "message": "{}"}).encode()
    reply = client.post(
        SEND,
        input_stream=io.BytesIO(body),
        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": str(len(body) + 100)},
    )
    assert_envelope(reply, 400)
    assert client.get("/timeline/sync?member=b").get_json()["latestSeq"] == "0"


def test_cors_headers_as_go_timeline_sends_them(client: Any) -> None:
    reply = client.get("/timeline/sync?member=a", headers={"Origin": "http://localhost:3000"})
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    preflight = client.options("/timeline/send", headers={"Origin": "http://x"})
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    nope = client.get("/timeline/nope", headers={"Origin": "http://x"})
    assert nope.headers["Access-Control-Allow-Origin"] == "*"
    # Without Origin the caller is no browser: the headers would be bytes for nothing.
    assert "Access-Control-Allow-Origin" not in client.get("/timeline/sync?member=a").headers


def test_cors_can_be_switched_off(settings: Any, sqlite_store: Any) -> None:
    from timeline.factory import create_app

    client = create_app(settings.replace(cors_allow_origin=""), store=sqlite_store).test_client()
    reply = client.get("/timeline/sync?member=a", headers={"Origin": "http://x"})
    assert "Access-Control-Allow-Origin" not in reply.headers


def test_doubled_slashes_get_the_envelope_not_a_redirect(client: Any) -> None:
    assert_envelope(client.get("//timeline/sync?member=a"), 404)


def test_a_pretty_printed_message_is_measured_compact(client: Any, store: Store) -> None:
    # Given a message of 30 KB that pretty-printing pads past the 64 KiB limit,
    message = json.dumps({"a": "x" * 30000}, indent=40000)  # 40 KB of spaces
    assert len(message) > 65536
    # when it is sent, then it is accepted: the limit is on the compact form,
    assert post(client, SEND, {"from": "a", "to": "b", "message": message}).get_json() == {
        "sequence": "1"
    }
    # and the compact form is what is stored and returned, the same object, without padding.
    compact = json.dumps({"a": "x" * 30000}, separators=(",", ":"))
    [entry] = client.get("/timeline/sync?member=b").get_json()["entrySet"]
    assert entry["message"] == compact
    [history] = client.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert history["message"] == compact
    [stored] = store.read(Kind.SYNC, "b", 0, 10)
    assert json.loads(stored.message) == {"a": "x" * 30000}


def test_a_fan_out_over_the_byte_budget_is_a_413(client: Any, store: Store) -> None:
    members = [f"m{i}" for i in range(1200)]  # 1,201 x 60 KB > 64 MiB
    body = {"group_name": "g", "group_members": members, "message": {"t": "x" * 60000}}
    assert_envelope(post(client, GROUP, body), 413)
    assert store.read(Kind.HISTORY, "g", 0, 10) == []


def test_dollar_keys_are_refused_and_dotted_keys_stored_as_they_are(client: Any) -> None:
    for message in ({"$ref": "x", "$id": 1}, {"a": {"$gt": 1}}, '{"$where":"1"}'):
        assert_envelope(post(client, SEND, {"from": "a", "to": "b", "message": message}), 400)
    dotted = {"user.name": "a", "a": {"b.c": [1, {"d.e": None}]}, "x$": 1}
    assert post(client, SEND, {"from": "a", "to": "b", "message": dotted}).status_code == 200
    [entry] = client.get("/timeline/sync?member=b").get_json()["entrySet"]
    assert json.loads(entry["message"]) == dotted


@pytest.mark.parametrize("encoded", ["%FF", "%FE", "%ED%A0%80"])
def test_path_ids_that_are_not_utf8_are_refused(client: Any, encoded: str) -> None:
    # Werkzeug decodes such a path segment to U+FFFD: %FF and %FE would name one group.
    # (In a query string it keeps them as the text "%FF": refused too, see test_input_rules.)
    assert_envelope(client.get(f"/timeline/history/group/{encoded}"), 400)
    assert_envelope(client.get(f"/timeline/history/single/a/{encoded}"), 400)


def test_a_bad_member_is_named_by_its_position(client: Any) -> None:
    body = {"group_name": "g", "group_members": ["a", None], "message": "{}"}
    envelope = assert_envelope(post(client, GROUP, body), 400)
    assert envelope["metadata"] == {"field": "group_members[1]"}


# --- one dispatch path ----------------------------------------------------------------------


class Middleware:
    """A WSGI middleware, as OpenTelemetry's or Sentry's: what it sees of every request."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        def recorded(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            self.seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], status[:3]))
            return start_response(status, headers, *args)

        return self.wrapped(environ, recorded)


def test_a_wsgi_middleware_around_the_app_sees_every_request_errors_included(app: Any) -> None:
    middleware = Middleware(app.wsgi_app)
    app.wsgi_app = middleware
    flask_hooks: list[str] = []
    app.before_request(lambda: flask_hooks.append(__import__("flask").request.path) and None)
    client = app.test_client()
    body = json.dumps({"from": "a", "to": "b", "message": "{}"})
    client.post("/timeline/send", data=body)
    client.get("/timeline/sync?member=b")
    client.get("/timeline/history/single/a/b")
    client.head("/timeline/sync?member=b")
    client.options("/timeline/send")
    client.get("/timeline/send")  # 405
    client.get("/timeline/nowhere")  # 404
    client.post("/timeline/send", data="{")  # 400
    client.get("/healthz")
    client.get("/nowhere")
    assert middleware.seen == [
        ("POST", "/timeline/send", "200"),
        ("GET", "/timeline/sync", "200"),
        ("GET", "/timeline/history/single/a/b", "200"),
        ("HEAD", "/timeline/sync", "200"),
        ("OPTIONS", "/timeline/send", "204"),
        ("GET", "/timeline/send", "405"),
        ("GET", "/timeline/nowhere", "404"),
        ("POST", "/timeline/send", "400"),
        ("GET", "/healthz", "200"),
        ("GET", "/nowhere", "404"),
    ]
    # Flask's hooks see its own pages, and no API request at all (never half of a route's).
    assert flask_hooks == ["/healthz", "/nowhere"]


def test_head_is_get_without_its_body_and_options_is_a_preflight(client: Any) -> None:
    get = client.get("/timeline/sync?member=b")
    head = client.head("/timeline/sync?member=b")
    assert head.status_code == 200
    assert head.data == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    preflight = client.options("/timeline/sendGroup")
    assert (preflight.status_code, preflight.data) == (204, b"")
    wrong = client.get("/timeline/sendGroup")
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "OPTIONS, POST"
    assert wrong.get_json()["reason"] == "TIMELINE_METHOD_NOT_ALLOWED"
    assert client.delete("/timeline/sync").headers["Allow"] == "GET, HEAD, OPTIONS"


def test_one_place_builds_the_error_envelope() -> None:
    root = Path(__file__).resolve().parent.parent / "timeline"
    # A dict literal with a code and a reason that are values, not a schema's {"type": ...}.
    building = re.compile(r"""["']code["']:\s*[^{\s][^,]*,\s*["']reason["']:""")
    builders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if building.search(path.read_text())
    ]
    assert builders == ["errors.py"]
