"""Dependencies down: a fast 503 with the envelope, and recovery without a restart."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from support import free_port
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

    server.start()  # same port, and empty: the counters are gone
    reply = post_send(client)
    assert reply.get_json() == {"sequence": "2"}  # continued from the store, not from 1
    sync = client.get("/timeline/sync?member=b").get_json()
    assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2"]
    assert sync["latestSeq"] == "2"


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
        store_retry_budget_ms=250,  # one retry fits: 200 ms wait + 100 ms backoff > 250
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


def test_a_counter_behind_the_store_moves_on_instead_of_overwriting(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Any
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    app = create_app(Settings(redis_url=redis_url, redis_key_prefix=key_prefix), store=store)
    client = app.test_client()
    body = {"group_name": "g", "group_members": ["a", "c", "d"], "message": "{}"}
    for _ in range(3):
        assert client.post("/timeline/sendGroup", data=json.dumps(body)).status_code == 200
    # Given c's counter went back to 1 (a failover to a replica that lagged behind),
    allocator = app.extensions["timeline"]["service"].allocator
    from timeline.model import Kind, Timeline

    redis_client.set(allocator.key(Timeline(Kind.SYNC, "c")), 1)
    # when the next message finds seq 2 taken, it moves c's copy to 4 rather than fail.
    reply = client.post("/timeline/sendGroup", data=json.dumps(body))
    assert reply.get_json() == {"failedMembers": []}
    for member in ("a", "c", "d"):
        sync = client.get(f"/timeline/sync?member={member}").get_json()
        assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2", "3", "4"]
        assert sync["latestSeq"] == "4"


@pytest.mark.parametrize("url", ["http://x", "redis:/nohost"])
def test_a_bad_redis_url_is_refused_at_start(url: str) -> None:
    from timeline.settings import SettingsError

    with pytest.raises(SettingsError):
        Settings(redis_url=url).validate()
