"""Input rules: keys repeated in a JSON object, ids that every route can read back, strict
%-decoding of query strings, the headers CORS exposes, and the sync copies one request may
write. Each refusal is a 4xx envelope and leaves Redis and the store untouched."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_api import assert_envelope

from support import free_port
from test_e2e import Service, service_env
from timeline.errors import InvalidParam
from timeline.factory import create_app
from timeline.model import Kind, conversation_id
from timeline.settings import Settings
from timeline.store import Store
from timeline.validation import Limits, decode_body, parse_id, parse_members

SEND, GROUP, ACK = "/timeline/send", "/timeline/sendGroup", "/timeline/ack"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_untouched(redis_client: redis.Redis, key_prefix: str, store: Store, *ids: str) -> None:
    """Nothing allocated (the test's Redis namespace is empty) and nothing stored."""
    assert redis_client.keys(f"{key_prefix}*") == []
    for kind in Kind:
        for timeline_id in ids:
            assert store.read(kind, timeline_id, 0, 10) == [], (kind, timeline_id)


# --- 1. a key repeated in one object is a 400 ------------------------------------------------

# (case, route, raw body, the key named, the field named or None for the body itself)
DUPLICATES: list[tuple[str, str, bytes, str, str | None]] = [
    ("from twice", SEND, b'{"from":"dk1","from":"dk2","to":"b","message":"{}"}', "from", None),
    (
        "from twice, spaced, apart",
        SEND,
        b'{"from": "dk1", "to": "b", "message": "{}", "from": "dk2"}\n',
        "from",
        None,
    ),
    (
        "from twice, one spelt with an escape",
        SEND,
        b'{"from":"dk1","\\u0066rom":"dk2","to":"b","message":"{}"}',
        "from",
        None,
    ),
    ("to twice, same value", SEND, b'{"from":"a","to":"b","to":"b","message":"{}"}', "to", None),
    (
        "message twice",
        SEND,
        b'{"from":"a","to":"b","message":"{\\"t\\":1}","message":"{\\"t\\":2}"}',
        "message",
        None,
    ),
    (
        "in an object message",
        SEND,
        b'{"from":"a","to":"b","message":{"text":"hi","text":"bye"}}',
        "text",
        None,
    ),
    (
        "deep in an object message",
        SEND,
        b'{"from":"a","to":"b","message":{"a":[{"b":{"c":1,"c":2}}]}}',
        "c",
        None,
    ),
    (
        "in an object of a batch",
        SEND,
        b'{"from":"a","to":"b","messages":[{"t":1},{"t":1,"t":2}]}',
        "t",
        None,
    ),
    (
        "in a message string",
        SEND,
        b'{"from":"a","to":"b","message":"{\\"text\\":\\"hi\\",\\"text\\":\\"bye\\"}"}',
        "text",
        "message",
    ),
    (
        "deep in a message string",
        SEND,
        b'{"from":"a","to":"b","message":"{\\"a\\": {\\"b\\": 1, \\"b\\": 2}}"}',
        "b",
        "message",
    ),
    (
        "in a message string of a batch",
        SEND,
        b'{"from":"a","to":"b","messages":["{}","{\\"t\\":1,\\"t\\":2}"]}',
        "t",
        "messages[1]",
    ),
    (
        "in an unknown field",
        SEND,
        b'{"from":"a","to":"b","message":"{}","extra":{"x":1,"x":2}}',
        "x",
        None,
    ),
    (
        "group_name twice",
        GROUP,
        b'{"group_name":"g","group_name":"h","group_members":["a"],"message":"{}"}',
        "group_name",
        None,
    ),
    (
        "group_members twice",
        GROUP,
        b'{"group_name":"g","group_members":["a"],"group_members":["b"],"message":"{}"}',
        "group_members",
        None,
    ),
    (
        "in a group's message string",
        GROUP,
        b'{"group_name":"g","group_members":["a"],"message":"{\\"k\\":1,\\"k\\":1}"}',
        "k",
        "message",
    ),
    ("member twice in an ack", ACK, b'{"member":"a","member":"b","seq":1}', "member", None),
]


@pytest.mark.parametrize(
    ("case", "route", "data", "key", "field"), DUPLICATES, ids=[d[0] for d in DUPLICATES]
)
def test_a_key_repeated_in_one_object_is_a_400_and_nothing_is_stored(
    client: Any,
    redis_client: redis.Redis,
    key_prefix: str,
    store: Store,
    case: str,
    route: str,
    data: bytes,
    key: str,
    field: str | None,
) -> None:
    # Given a body orjson alone would read, the last repeat winning,
    assert isinstance(orjson.loads(data), dict)
    # when it is posted, then it is refused, naming the key (and the message it is in),
    envelope = assert_envelope(client.post(route, data=data), 400)
    assert envelope["reason"] == "TIMELINE_INVALID_PARAM"
    expected = {"key": key} if field is None else {"field": field, "key": key}
    assert envelope["metadata"] == expected
    assert repr(key) in envelope["message"]
    # and nothing was allocated or stored, for either of the values.
    ids = ("a", "b", "dk1", "dk2", "g", "h", "a:b", "b:dk1", "b:dk2")
    assert_untouched(redis_client, key_prefix, store, *ids)


def test_the_same_key_in_different_objects_is_no_repeat(client: Any, store: Store) -> None:
    # Given keys that recur, but each once per object (and a body not in compact form),
    message = {"from": "x", "to": "y", "list": [{"k": 1}, {"k": 2}], "o": {"from": {"from": 1}}}
    data = json.dumps({"from": "a", "to": "b", "message": message}, indent=2).encode()
    # when it is sent, in both message forms, then it is stored as it was sent.
    assert client.post(SEND, data=data).get_json() == {"sequence": "1"}
    text = json.dumps(message, indent=1)
    body = json.dumps({"from": "a", "to": "b", "message": text}).encode()
    assert client.post(SEND, data=body).get_json() == {"sequence": "2"}
    entries = store.read(Kind.SYNC, "b", 0, 10)
    assert [json.loads(e.message) for e in entries] == [message, message]


# A JSON text whose objects are lists of pairs (so a key may repeat), written in one of
# three styles: compact as orjson writes it (the fast path's case), spaced, or indented.
keys = st.sampled_from(["a", "b", "from", "é", "\u0066"]) | st.text(max_size=3)
leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=4)
trees = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(keys, inner), max_size=4).map(lambda pairs: ("object", pairs))
    ),
    max_leaves=10,
)


def render(node: Any, style: str) -> str:
    comma, colon = (",", ":") if style == "compact" else (", ", ": ")
    if isinstance(node, tuple):
        inner = comma.join(
            orjson.dumps(key).decode() + colon + render(value, style) for key, value in node[1]
        )
        return "{" + ("\n" if style == "indented" and inner else "") + inner + "}"
    if isinstance(node, list):
        return "[" + comma.join(render(value, style) for value in node) + "]"
    return orjson.dumps(node).decode()


def repeats(node: Any) -> bool:
    if isinstance(node, tuple):
        names = [key for key, _ in node[1]]
        return len(set(names)) != len(names) or any(repeats(v) for _, v in node[1])
    if isinstance(node, list):
        return any(repeats(value) for value in node)
    return False


@FUZZ
@given(
    pairs=st.lists(st.tuples(keys, trees), max_size=5),
    style=st.sampled_from(["compact", "spaced", "indented"]),
)
def test_a_body_is_refused_exactly_when_an_object_repeats_a_key(
    pairs: list[tuple[str, Any]], style: str
) -> None:
    root = ("object", pairs)
    data = render(root, style).encode()
    if repeats(root):
        with pytest.raises(InvalidParam, match="repeats the key"):
            decode_body(data)
    else:
        assert decode_body(data) == json.loads(data)


# --- 2. every id accepted on write is readable on every route ---------------------------------

REFUSED_IDS = ["a/b", "/", "a/", ".", "..", "a:b", "a\tb", "a\u2028b", "\ufffd"]


def path(value: str) -> str:
    return urllib.parse.quote(value, safe="")


@pytest.mark.parametrize("bad", REFUSED_IDS)
def test_ids_no_route_could_read_are_refused_and_store_nothing(
    client: Any, redis_client: redis.Redis, key_prefix: str, store: Store, bad: str
) -> None:
    # In every place an id is written (a member, a group, the sender, the receiver),
    for route, body in (
        (SEND, {"from": bad, "to": "b", "message": "{}"}),
        (SEND, {"from": "a", "to": bad, "message": "{}"}),
        (GROUP, {"group_name": bad, "group_members": ["a"], "message": "{}"}),
        (GROUP, {"group_name": "g", "group_members": ["a", bad], "message": "{}"}),
        (ACK, {"member": bad, "seq": 1}),
    ):
        envelope = assert_envelope(client.post(route, data=json.dumps(body)), 400)
        assert envelope["reason"] == "TIMELINE_INVALID_PARAM"
    # and where it is read, such an id is a 400 (or, a '/' in a path, no route at all).
    assert_envelope(client.get("/timeline/sync", query_string={"member": bad}), 400)
    status = 404 if "/" in bad else 400
    assert_envelope(client.get(f"/timeline/history/group/{path(bad)}"), status)
    assert_envelope(client.get(f"/timeline/history/single/a/{path(bad)}"), status)
    assert_untouched(redis_client, key_prefix, store, "a", "b", "g", bad, conversation_id("a", bad))


def test_a_client_msg_id_may_hold_a_slash_it_is_never_in_a_path(client: Any) -> None:
    body = {"from": "a", "to": "b", "message": {"t": 1}, "client_msg_id": "device/1/0001"}
    assert client.post(SEND, data=json.dumps(body)).get_json() == {"sequence": "1"}
    assert client.post(SEND, data=json.dumps(body)).get_json() == {"sequence": "1"}  # replayed


TRICKY = [
    *"/.:%?#&=+;@!$'\"()[]{}<>~`^|,* \\\t\x00\x7f",
    "é",
    "中",
    "😀",
    "\ufffd",
    "\u2028",
    "\u00a0",
    "\u200b",
    "%2F",
    "%FF",
    "%25",
]
ids = st.lists(st.sampled_from(TRICKY) | st.characters(), min_size=1, max_size=6).map("".join)


def newest(client: Any, url: str) -> Any:
    """The message of a timeline's newest entry, read with the query the route takes."""
    reply = client.get(url + ("&" if "?" in url else "?") + "direction=backward&count=1")
    assert reply.status_code == 200, (url, reply.get_data(as_text=True))
    [entry] = reply.get_json()["entrySet"]
    return json.loads(entry["message"])


def newest_synced(client: Any, member: str) -> Any:
    latest = client.get("/timeline/sync", query_string={"member": member, "count": 1})
    assert latest.status_code == 200, latest.get_data(as_text=True)
    last = int(latest.get_json()["latestSeq"])
    reply = client.get(
        "/timeline/sync", query_string={"member": member, "last_read": last - 1, "count": 1}
    )
    [entry] = reply.get_json()["entrySet"]
    return json.loads(entry["message"])


@FUZZ
@given(value=ids)
@example(value="a/b")
@example(value="..")
@example(value="...")
@example(value="a b")
@example(value="%FF")
@example(value="?#")
@example(value="é中😀")
def test_every_id_validation_accepts_round_trips_through_every_route(
    client: Any, redis_client: redis.Redis, key_prefix: str, settings: Settings, value: str
) -> None:
    limits = Limits.from_settings(settings)
    try:
        parse_id(value, "id", limits)
    except InvalidParam:
        event("refused")
        # Refused: by every write, and nothing of it is stored.
        before = sorted(redis_client.keys(f"{key_prefix}*"))
        body = {"from": value, "to": "peer", "message": {"t": 0}}
        assert_envelope(client.post(SEND, data=json.dumps(body)), 400)
        group = {"group_name": value, "group_members": [value], "message": {"t": 0}}
        assert_envelope(client.post(GROUP, data=json.dumps(group)), 400)
        assert sorted(redis_client.keys(f"{key_prefix}*")) == before
        return
    event("accepted")
    marker = {"id": value, "n": redis_client.incr(f"{key_prefix}test-counter")}
    # Accepted: a one-to-one message from it and a group message to it,
    body = {"from": value, "to": "peer", "message": marker}
    assert client.post(SEND, data=json.dumps(body)).status_code == 200
    # are read back on each route: sync (a query), history single either way round, and
    # (after a group message) history group (paths), the id percent-encoded as clients do.
    assert newest_synced(client, value) == marker
    assert newest(client, f"/timeline/history/single/{path(value)}/peer") == marker
    assert newest(client, f"/timeline/history/single/peer/{path(value)}") == marker
    group_marker = marker | {"group": True}
    group = {"group_name": value, "group_members": [value, "peer"], "message": group_marker}
    assert client.post(GROUP, data=json.dumps(group)).get_json() == {"failedMembers": []}
    assert newest(client, f"/timeline/history/group/{path(value)}") == group_marker
    assert newest_synced(client, value) == group_marker


@FUZZ
@given(values=st.lists(ids, min_size=1, max_size=5))
def test_a_member_list_is_held_to_the_rule_of_one_id(values: list[str]) -> None:
    # parse_members checks a whole list at once in C; it must agree with parse_id.
    limits = Limits.from_settings(Settings())
    try:
        expected: list[str] | None = list(dict.fromkeys(parse_id(v, "m", limits) for v in values))
    except InvalidParam:
        expected = None
    try:
        got: list[str] | None = parse_members(values, "m", limits)
    except InvalidParam:
        got = None
    assert got == expected


@pytest.fixture
def served(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Service]:
    env = service_env(tmp_path, redis_url, key_prefix)
    running = Service(env, tmp_path / "gunicorn.log").start()
    yield running
    running.stop()


@pytest.mark.e2e
def test_tricky_ids_round_trip_over_http_under_gunicorn(served: Service) -> None:
    accepted = ["a b", "a?b", "a#b", "a%b", "a%2Fb", "100%", "a+b", "a&b=c", "...", ".a", "a."]
    accepted += ["~u", "a\\b", "中文", "é", "😀", "%FF", "\u00e9\u0301", " a", "a ", "a;b", "a,b"]
    for value in accepted:
        status, _ = served.request(
            "POST", SEND, {"from": value, "to": "p", "message": {"v": value}}
        )
        assert status == 200, value
        body = {"group_name": value, "group_members": [value], "message": {"g": value}}
        assert served.request("POST", GROUP, body) == (200, {"failedMembers": []}), value
        member = urllib.parse.urlencode({"member": value})
        status, synced = served.request("GET", f"/timeline/sync?{member}")
        assert status == 200, value
        assert [json.loads(e["message"]) for e in synced["entrySet"]] == [
            {"v": value},
            {"g": value},
        ]
        for url in (
            f"/timeline/history/single/{path(value)}/p",
            f"/timeline/history/single/p/{path(value)}",
        ):
            status, history = served.request("GET", url)
            assert status == 200, (value, url)
            assert [json.loads(e["message"]) for e in history["entrySet"]] == [{"v": value}]
        status, history = served.request("GET", f"/timeline/history/group/{path(value)}")
        assert (status, [json.loads(e["message"]) for e in history["entrySet"]]) == (
            200,
            [{"g": value}],
        ), value
    # What the server cannot route is refused on write: %2F reaches it as '/'.
    for value in ("a/b", ".", ".."):
        status, body = served.request("POST", SEND, {"from": value, "to": "p", "message": {}})
        assert (status, body["reason"]) == (400, "TIMELINE_INVALID_PARAM"), value
    status, body = served.request("GET", "/timeline/history/group/a%2Fb")
    assert (status, body["reason"]) == (404, "TIMELINE_NOT_FOUND")


# --- 3. a query's %-sequences must be UTF-8, as a path's ---------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("member=%FF", "member"),
        ("member=%FE", "member"),
        ("member=a%E4%B8", "member"),  # a UTF-8 sequence cut short
        ("member=%ED%A0%80", "member"),  # a surrogate, which UTF-8 cannot carry
        ("member=a&last_read=%FF", "last_read"),
        ("member=a&count=1%C0", "count"),
        ("member=a&unknown=%FF", "unknown"),
    ],
)
def test_a_query_percent_sequence_that_is_not_utf8_is_a_400(
    client: Any, query: str, field: str
) -> None:
    for route in ("/timeline/sync", "/timeline/history/group/g", "/timeline/history/single/a/b"):
        envelope = assert_envelope(client.get(f"{route}?{query}"), 400)
        assert envelope["reason"] == "TIMELINE_INVALID_PARAM"
        assert envelope["metadata"] == {"field": field}, route


def test_raw_bytes_that_are_not_utf8_in_a_query_are_a_400(client: Any) -> None:
    # As a WSGI server passes them: each byte as one latin-1 character.
    reply = client.get("/timeline/sync", environ_overrides={"QUERY_STRING": "member=\xff"})
    assert assert_envelope(reply, 400)["metadata"] == {"field": "member"}


def test_percent_ff_and_percent_25ff_no_longer_name_one_member(
    client: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given a message to the member whose id is the text "%FF",
    body = {"from": "a", "to": "%FF", "message": {"t": "for %FF"}}
    assert client.post(SEND, data=json.dumps(body)).get_json() == {"sequence": "1"}
    # then %25FF, its encoding, reads it, and %FF (invalid UTF-8) is no way to name it;
    reply = client.get("/timeline/sync?member=%25FF").get_json()
    assert [json.loads(e["message"]) for e in reply["entrySet"]] == [{"t": "for %FF"}]
    assert_envelope(client.get("/timeline/sync?member=%FF"), 400)
    # valid UTF-8, encoded or not, reads the member it names.
    body = {"from": "a", "to": "中", "message": {"t": "for 中"}}
    assert client.post(SEND, data=json.dumps(body)).get_json() == {"sequence": "1"}
    for url in ("/timeline/sync?member=%E4%B8%AD", "/timeline/sync?member=中"):
        assert client.get(url).get_json()["latestSeq"] == "1", url


# --- 4. CORS exposes X-Request-ID and Retry-After -----------------------------------------------


def exposed(reply: Any) -> set[str]:
    value = reply.headers.get("Access-Control-Expose-Headers", "")
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def test_cors_replies_expose_the_request_id_and_retry_after(client: Any) -> None:
    origin = {"Origin": "http://localhost:3000"}
    for reply in (
        client.get("/timeline/sync?member=a", headers=origin),
        client.post(SEND, data=json.dumps({"from": "a:b"}), headers=origin),  # an error
        client.get("/timeline/nope", headers=origin),
        client.options(SEND, headers=origin | {"Access-Control-Request-Method": "POST"}),
    ):
        assert exposed(reply) == {"x-request-id", "retry-after"}, reply.status
        assert reply.headers["X-Request-ID"]  # what the page can now read
    # No Origin, no browser: no CORS headers.
    assert "Access-Control-Expose-Headers" not in client.get("/timeline/sync?member=a").headers


def test_a_503_to_a_browser_exposes_its_retry_after(tmp_path: Path) -> None:
    # Given Redis down (nothing listens on its port),
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_connect_timeout_ms=100,
        sqlite_path=str(tmp_path / "t.sqlite3"),
        data_dir=str(tmp_path / "var"),
    )
    client = create_app(settings).test_client()
    body = json.dumps({"from": "a", "to": "b", "message": "{}"})
    reply = client.post(SEND, data=body, headers={"Origin": "http://x"})
    # then the 503 says when to retry, and a page's script may read it.
    assert assert_envelope(reply, 503)["reason"] == "TIMELINE_UNAVAILABLE"
    assert reply.headers["Retry-After"] == "1"
    assert {"retry-after", "x-request-id"} <= exposed(reply)


def test_no_expose_header_when_cors_is_off(settings: Settings, sqlite_store: Any) -> None:
    client = create_app(settings.replace(cors_allow_origin=""), store=sqlite_store).test_client()
    reply = client.get("/timeline/sync?member=a", headers={"Origin": "http://x"})
    assert "Access-Control-Expose-Headers" not in reply.headers


# --- 5. the sync copies one request may write --------------------------------------------------

CAP = 12


@pytest.fixture
def capped(settings: Settings, store: Store) -> Any:
    return create_app(settings.replace(request_documents_max=CAP), store=store).test_client()


def test_the_setting_reaches_the_limits() -> None:
    assert Limits.from_settings(Settings()).request_documents_max == 200_000
    assert Limits.from_settings(Settings(request_documents_max=7)).request_documents_max == 7


def batch(n: int) -> list[dict[str, int]]:
    return [{"n": i} for i in range(n)]


@pytest.mark.parametrize(
    ("members", "messages"),
    [(["m0", "m1", "m2", "m3"], 3), ([f"m{i}" for i in range(12)], 1), (["m0", "m1"] * 5, 6)],
    ids=["4x3", "12x1", "2 listed 5 times x6"],
)
def test_a_group_batch_of_exactly_the_cap_is_stored(
    capped: Any, store: Store, members: list[str], messages: int
) -> None:
    body = {"group_name": "g", "group_members": members, "messages": batch(messages)}
    assert capped.post(GROUP, data=json.dumps(body)).get_json() == {"failedMembers": []}
    for member in dict.fromkeys(members):
        assert len(store.read(Kind.SYNC, member, 0, 100)) == messages, member
    assert len(store.read(Kind.HISTORY, "g", 0, 100)) == messages


@pytest.mark.parametrize(
    ("members", "messages"),
    [([f"m{i}" for i in range(13)], 1), (["m0", "m1", "m2", "m3", "m4"], 3)],
    ids=["13x1 (one over)", "5x3"],
)
def test_a_group_batch_over_the_cap_is_a_413_and_stores_nothing(
    capped: Any,
    redis_client: redis.Redis,
    key_prefix: str,
    store: Store,
    members: list[str],
    messages: int,
) -> None:
    body = {"group_name": "g", "group_members": members, "messages": batch(messages)}
    envelope = assert_envelope(capped.post(GROUP, data=json.dumps(body)), 413)
    assert envelope["reason"] == "TIMELINE_PAYLOAD_TOO_LARGE"
    assert envelope["metadata"] == {"limit": str(CAP)}
    assert str(CAP) in envelope["message"]
    assert str(len(members) * messages) in envelope["message"]
    assert_untouched(redis_client, key_prefix, store, "g", *members)


@pytest.mark.parametrize(
    ("sender", "messages", "status"),
    [("a", 6, 200), ("a", 7, 413), ("b", 12, 200), ("b", 13, 413)],
    ids=["2x6 at the cap", "2x7 over", "to oneself 1x12 at the cap", "to oneself 1x13 over"],
)
def test_a_send_batch_counts_two_copies_or_one_to_oneself(
    capped: Any,
    redis_client: redis.Redis,
    key_prefix: str,
    store: Store,
    sender: str,
    messages: int,
    status: int,
) -> None:
    # (All within the batch limit of 100: the cap alone refuses.)
    body = {"from": sender, "to": "b", "messages": batch(messages)}
    reply = capped.post(SEND, data=json.dumps(body))
    if status == 200:
        assert reply.get_json()["sequences"] == [str(i) for i in range(1, messages + 1)]
        assert len(store.read(Kind.SYNC, "b", 0, 100)) == messages
        return
    envelope = assert_envelope(reply, 413)
    assert (envelope["reason"], envelope["metadata"]) == (
        "TIMELINE_PAYLOAD_TOO_LARGE",
        {"limit": str(CAP)},
    )
    assert_untouched(redis_client, key_prefix, store, "a", "b", conversation_id(sender, "b"))


def test_the_default_cap_refuses_10000_members_times_21_messages(
    client: Any, redis_client: redis.Redis, key_prefix: str, store: Store
) -> None:
    members = [f"m{i}" for i in range(10_000)]
    body = {"group_name": "g", "group_members": members, "messages": batch(21)}
    envelope = assert_envelope(client.post(GROUP, data=json.dumps(body)), 413)
    assert envelope["metadata"] == {"limit": "200000"}
    assert "210000" in envelope["message"]
    assert_untouched(redis_client, key_prefix, store, "g", "m0", "m9999")
