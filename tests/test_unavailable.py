"""Dependencies down: a fast 503 with the envelope, and recovery without a restart."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from servers import free_port
from timeline.factory import create_app
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore

SEND = {"from": "a", "to": "b", "message": '{"text":"hi"}'}


def post_send(client: Any) -> Any:
    return client.post("/timeline/send", data=json.dumps(SEND), content_type="application/json")


def assert_unavailable(reply: Any) -> None:
    assert reply.status_code == 503, reply.get_data(as_text=True)
    body = reply.get_json()
    assert body["code"] == 503
    assert body["reason"] in {"TIMELINE_UNAVAILABLE", "TIMELINE_WRITE_FAILED"}
    assert reply.headers["Retry-After"] == "1"


def timed(action: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def test_redis_down_is_a_fast_503_and_recovers(
    tmp_path: Path, redis_factory: Any, key_prefix: str
) -> None:
    server = redis_factory()
    settings = Settings(
        redis_url=server.url, redis_key_prefix=key_prefix, sqlite_path=str(tmp_path / "t.db")
    )
    client = create_app(settings).test_client()
    assert post_send(client).get_json() == {"sequence": "1"}

    server.stop()
    for action in (lambda: post_send(client), lambda: client.get("/timeline/sync?member=a")):
        reply, elapsed = timed(action)
        assert_unavailable(reply)
        assert elapsed < 1.0

    server.start()  # same port, and empty: this server keeps nothing on disk
    other = {"from": "c", "to": "d", "message": "{}"}
    reply = client.post("/timeline/send", data=json.dumps(other))
    assert reply.get_json() == {"sequence": "1"}
    assert client.get("/timeline/sync?member=d").get_json()["latestSeq"] == "1"
    # Its lost counters restart at 1: the unique (id, seq) index refuses the reused
    # sequence and the caller is told; nothing is stored twice.
    reply = post_send(client)
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "TIMELINE_WRITE_FAILED"
    assert len(client.get("/timeline/sync?member=b").get_json()["entrySet"]) == 1


def test_unreachable_mongo_is_a_fast_503(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    settings = Settings(
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=300,
    )
    app = create_app(settings)  # starting must not need the store
    client = app.test_client()
    for action in (lambda: post_send(client), lambda: client.get("/timeline/sync?member=a")):
        reply, elapsed = timed(action)
        assert_unavailable(reply)
        assert elapsed < 1.5


def test_locked_sqlite_is_a_503_within_the_busy_timeout(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    path = tmp_path / "t.db"
    settings = Settings(
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        sqlite_path=str(path),
        sqlite_busy_timeout_ms=200,
    )
    client = create_app(settings).test_client()
    assert post_send(client).status_code == 200

    # Given another process holding SQLite's write lock,
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reply, elapsed = timed(lambda: post_send(client))
        assert_unavailable(reply)
        assert elapsed < 1.0
        # readers are not blocked by a writer (WAL)
        assert client.get("/timeline/sync?member=b").status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert post_send(client).status_code == 200


def test_a_failed_sync_copy_is_reported_in_failed_members(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    client = create_app(
        Settings(redis_url=redis_url, redis_key_prefix=key_prefix), store=store
    ).test_client()
    # Given c's sync timeline already holds seq 1 (say, Redis lost its counter),
    from timeline.model import Document, Message

    store.write([], [Document("c", 1, Message({}, "{}"), 0)])
    body = {"group_name": "g", "group_members": ["a", "c", "d"], "message": "{}"}
    reply = client.post("/timeline/sendGroup", data=json.dumps(body))
    # then c is reported, a and d have their copy.
    assert reply.status_code == 200
    assert reply.get_json() == {"failedMembers": ["c"]}
    for member in ("a", "d"):
        sync = client.get(f"/timeline/sync?member={member}").get_json()
        assert [e["sequence"] for e in sync["entrySet"]] == ["1"]

    # A one-to-one send to c fails as a whole: the caller must know the receiver missed it.
    reply = client.post(
        "/timeline/send", data=json.dumps({"from": "a", "to": "c", "message": "{}"})
    )
    assert reply.status_code == 200  # c is at 2 now: no conflict
    store.write([], [Document("c", 3, Message({}, "{}"), 0)])
    reply = client.post(
        "/timeline/send", data=json.dumps({"from": "a", "to": "c", "message": "{}"})
    )
    assert reply.status_code == 503
    assert reply.get_json()["reason"] == "TIMELINE_WRITE_FAILED"
    assert reply.get_json()["metadata"] == {"failedMembers": ["c"]}


@pytest.mark.parametrize("url", ["http://x", "redis:/nohost"])
def test_a_bad_redis_url_is_refused_at_start(url: str) -> None:
    from timeline.settings import SettingsError

    with pytest.raises(SettingsError):
        Settings(redis_url=url).validate()
