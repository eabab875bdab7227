"""Access control, secrets kept out of replies and logs, and fuzzed hostile input."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import free_port
from timeline.factory import create_app
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore

TOKEN = "s3cret-token-value"


@pytest.fixture
def guarded(settings: Settings, sqlite_store: SQLiteStore) -> Any:
    return create_app(settings.replace(api_token=TOKEN), store=sqlite_store).test_client()


BODY = json.dumps({"from": "a", "to": "b", "message": "{}"})


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
def test_without_the_token_every_route_is_a_401(guarded: Any, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for reply in (
        guarded.post("/timeline/send", data=BODY, headers=headers),
        guarded.get("/timeline/sync?member=a", headers=headers),
        guarded.get("/timeline/history/group/g", headers=headers),
        guarded.get("/timeline/no-such-route", headers=headers),
    ):
        assert reply.status_code == 401
        assert reply.get_json()["reason"] == "TIMELINE_UNAUTHORIZED"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in reply.get_data(as_text=True)
    # Nothing was stored by the refused send: with the token, b's timeline is still empty.
    reply = guarded.get("/timeline/sync?member=b", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200
    assert reply.get_json() == {
        "latestSeq": "0",
        "entrySetLastSeq": "0",
        "entrySet": [],
        "minSeq": "1",
    }


def test_with_the_token_requests_go_through(guarded: Any) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.post("/timeline/send", data=BODY, headers=headers).get_json() == {
        "sequence": "1"
    }
    # The scheme in any case, and spaces around the token, are accepted.
    reply = guarded.get("/timeline/sync?member=b", headers={"Authorization": f"bearer  {TOKEN}"})
    assert reply.status_code == 200
    [entry] = reply.get_json()["entrySet"]
    assert (entry["sequence"], entry["message"]) == ("1", "{}")


def test_a_browser_preflight_needs_no_token(guarded: Any) -> None:
    assert guarded.options("/timeline/send").status_code == 204


def test_passwords_in_urls_stay_out_of_replies_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        redis_url=f"redis://:redispass123@127.0.0.1:{free_port()}/0",
        mongo_uri=f"mongodb://root:mongopass456@127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=200,
        api_token=TOKEN,
    )
    caplog.set_level(logging.DEBUG)
    client = create_app(settings).test_client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    replies = [
        client.post("/timeline/send", data=BODY, headers=headers),
        client.get("/timeline/sync?member=a", headers=headers),
        client.get("/timeline/history/group/g", headers=headers),
    ]
    assert {r.status_code for r in replies} == {503}
    text = " ".join(r.get_data(as_text=True) for r in replies) + caplog.text
    for secret in ("redispass123", "mongopass456", TOKEN):
        assert secret not in text


def test_message_contents_are_not_logged_at_info(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = {"from": "a", "to": "b", "message": {"text": "very-private-words"}}
    client.post("/timeline/send", data=json.dumps(body))
    client.post("/timeline/send", data=json.dumps(body | {"message": "not json private"}))
    assert "very-private-words" not in caplog.text
    assert "not json private" not in caplog.text


# --- fuzzing: no input yields a 5xx or stores anything when refused -------------------------

names = st.sampled_from(
    [
        "from",
        "to",
        "message",
        "group_name",
        "groupName",
        "group_members",
        "groupMembers",
        "client_msg_id",
        "clientMsgId",
        "member",
        "last_read",
        "count",
        "$gt",
        "a.b",
        "",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["a", "b", "a:b", "{}", '{"t":1}', "[]", "\x00", "\ufffd", "1e400"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(names | st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.sampled_from(["a", "b", "c"]) | st.text(min_size=1, max_size=8)
objects = st.dictionaries(names | st.text(max_size=8), json_values, max_size=4)
messages = objects | objects.map(json.dumps)
# Mostly well-formed requests, so the fuzz reaches the store and not only validation.
sends = st.fixed_dictionaries(
    {"from": ids, "to": ids, "message": messages}, optional={"client_msg_id": ids}
)
groups = st.fixed_dictionaries(
    {
        "group_name": ids,
        "group_members": st.lists(ids, min_size=1, max_size=6),
        "message": messages,
    },
    optional={"clientMsgId": ids},
)
bodies = st.dictionaries(names, json_values, max_size=6) | sends | groups
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_no_5xx(reply: Any) -> None:
    assert reply.status_code < 500, reply.get_data(as_text=True)
    body = reply.get_json()
    if reply.status_code >= 400:
        assert set(body) == {"code", "reason", "message", "metadata"}


@FUZZ
@given(path=st.sampled_from(["/timeline/send", "/timeline/sendGroup"]), body=bodies)
def test_fuzzed_bodies_never_get_a_5xx_and_refusals_store_nothing(
    client: Any, redis_client: redis.Redis, key_prefix: str, path: str, body: dict[str, Any]
) -> None:
    before = len(redis_client.keys(f"{key_prefix}*"))
    reply = client.post(path, data=json.dumps(body))
    assert_no_5xx(reply)
    if reply.status_code >= 400:
        assert len(redis_client.keys(f"{key_prefix}*")) == before


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_never_get_a_5xx(client: Any, raw: bytes) -> None:
    assert_no_5xx(client.post("/timeline/sendGroup", data=raw))


query_values = st.text(alphabet=string.printable + "\u00e9\ufffd\u202e", max_size=12)


@FUZZ
@given(
    route=st.sampled_from(
        ["/timeline/sync", "/timeline/history/group/g", "/timeline/history/single/a/b"]
    ),
    params=st.lists(st.tuples(names, query_values), max_size=5),
)
def test_fuzzed_query_strings_never_get_a_5xx(
    client: Any, route: str, params: list[tuple[str, str]]
) -> None:
    assert_no_5xx(client.get(route, query_string=params))


@FUZZ
@given(
    route=st.sampled_from(
        ["/timeline/sync", "/timeline/history/group/g", "/timeline/history/single/a/b"]
    ),
    raw=st.binary(max_size=24).map(lambda b: b"member=a&" + b)
    | st.lists(
        st.sampled_from([b"member=", b"%", b"%FF", b"%C3", b"%A9", b"\xff", b"a", b"&"])
    ).map(b"".join),
)
def test_fuzzed_raw_query_bytes_never_get_a_5xx(client: Any, route: str, raw: bytes) -> None:
    # As a WSGI server passes the query: its bytes, each as one latin-1 character. Bytes or
    # %-sequences that are not UTF-8 are a 400 (werkzeug itself would fail on raw ones).
    reply = client.get(route, environ_overrides={"QUERY_STRING": raw.decode("latin-1")})
    assert_no_5xx(reply)
