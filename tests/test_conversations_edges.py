"""Conversations and devices at their edges: an ack past the latest, a store that fails a
device's sighting, a forged cursor, a retry across the upgrade, a file an earlier version made
opened by every worker at once."""

from __future__ import annotations

import base64
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from timeline.allocator import Record
from timeline.errors import Unavailable
from timeline.service.writing import _digest
from timeline.store import Store


def post(client: Any, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, data=orjson.dumps(body), content_type="application/json")


def send(client: Any, sender: str, receiver: str, n: int) -> None:
    body = {"from": sender, "to": receiver, "message": {"n": n}}
    assert post(client, "/timeline/send", body).status_code == 200


def ack(client: Any, member: str, seq: int, device: str | None = None) -> str:
    body: dict[str, Any] = {"member": member, "seq": seq}
    if device is not None:
        body["device"] = device
    reply = post(client, "/timeline/ack", body)
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["minSeq"])


def sequences(client: Any, member: str, last_read: int = 0) -> list[str]:
    page = client.get(f"/timeline/sync?member={member}&last_read={last_read}").get_json()
    return [e["sequence"] for e in page["entrySet"]]


def test_an_ack_past_the_latest_does_not_release_what_arrives_after_it(client: Any) -> None:
    for n in range(3):
        send(client, "f", "m", n)
    assert ack(client, "m", 100) == "4"  # everything there is
    for n in range(3, 6):
        send(client, "f", "m", n)
    # The device pulled 4 and acks it: 5 and 6, which it never pulled, stay.
    assert ack(client, "m", 4) == "5"
    assert sequences(client, "m", 4) == ["5", "6"]


def test_a_device_whose_sighting_failed_is_recorded_on_its_next_sync(
    client: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(4):
        send(client, "f", "m", n)
    client.get("/timeline/sync?member=m&device=phone")
    recorded = store.device_seen
    failures = [Unavailable("the store failed once")]

    def failing_once(member: str, device: str, now_ms: int) -> None:
        if failures:
            raise failures.pop()
        recorded(member, device, now_ms)

    monkeypatch.setattr(store, "device_seen", failing_once)
    assert client.get("/timeline/sync?member=m&device=laptop").status_code == 503
    assert client.get("/timeline/sync?member=m&device=laptop&count=2").status_code == 200
    devices = client.get("/timeline/devices?member=m").get_json()["devices"]
    assert [d["device"] for d in devices] == ["laptop", "phone"]
    assert ack(client, "m", 4, "phone") == "1"  # the laptop holds them
    assert sequences(client, "m", 2) == ["3", "4"]


@pytest.mark.parametrize(
    "raw",
    [
        "99999999999999999999:x",  # past int64
        "9223372036854775808:x",
        "١٢٣:x",  # digits, not ASCII ones
        "12:",
        ":x",
        "12",
    ],
)
def test_a_forged_cursor_is_a_400(client: Any, raw: str) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    reply = client.get(f"/timeline/conversations?member=a&before={cursor}")
    assert reply.status_code == 400
    assert reply.get_json()["metadata"] == {"field": "before"}


def test_the_largest_cursor_is_accepted(client: Any) -> None:
    cursor = base64.urlsafe_b64encode(b"9223372036854775807:x").decode().rstrip("=")
    reply = client.get(f"/timeline/conversations?member=a&before={cursor}")
    assert reply.status_code == 200
    assert reply.get_json() == {"conversations": [], "next": ""}


def test_a_one_to_one_retry_keeps_the_fingerprint_earlier_versions_recorded(
    client: Any, settings: Any
) -> None:
    """A retry that reaches this version after the first attempt reached the one before it
    (a rolling deploy) must be the same message: a one-to-one send's fingerprint is what it
    was (the sender is in the conversation already)."""
    body = {"from": "b", "to": "a", "message": {"n": 1}, "client_msg_id": "c-1"}
    assert post(client, "/timeline/send", body).status_code == 200
    canonical = orjson.dumps({"n": 1}, option=orjson.OPT_SORT_KEYS).decode()
    earlier = _digest("a:b", "a", "b", "\x01", canonical)[:16]
    record = Record(conversation="a:b", client_msg_id="c-1", fingerprint=earlier, ttl_ms=1)
    stored = redis.Redis.from_url(settings.redis_url).keys(f"{settings.redis_key_prefix}*")
    assert any(record.client_msg_id.encode() in key for key in stored)
    values = [
        redis.Redis.from_url(settings.redis_url).get(key)
        for key in stored
        if record.client_msg_id.encode() in key
    ]
    assert any(value is not None and value.startswith(earlier.encode()) for value in values)


_EARLIER_SCHEMA = """
CREATE TABLE {table} (
    id TEXT NOT NULL, seq INTEGER NOT NULL, message TEXT NOT NULL,
    created_at INTEGER NOT NULL, mid TEXT NOT NULL DEFAULT '', UNIQUE (id, seq)
)
"""


def _open(path: str, ready: Any, results: Any) -> None:  # pragma: no cover - in a child
    from timeline.store.sqlite import SQLiteStore

    ready.wait()
    try:
        SQLiteStore(path).close()
        results.put("ok")
    except Exception as exc:
        results.put(f"{exc!r} (cause: {exc.__cause__!r})")


def test_every_worker_opening_an_earlier_versions_file_at_once_succeeds(tmp_path: Path) -> None:
    for trial in range(3):
        path = tmp_path / f"earlier-{trial}.sqlite3"
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # as every version left its file
            for table in ("chat_sync", "chat_history"):
                conn.execute(_EARLIER_SCHEMA.format(table=table))
                conn.execute(f"INSERT INTO {table} VALUES ('a', 1, '{{}}', 1, 'm')")  # noqa: S608
        context = multiprocessing.get_context("spawn")
        ready, results = context.Barrier(6), context.Queue()
        workers = [
            context.Process(target=_open, args=(str(path), ready, results)) for _ in range(6)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert sorted(results.get(timeout=5) for _ in workers) == ["ok"] * 6
        with sqlite3.connect(path) as conn:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(chat_sync)")]
            assert columns[-3:] == ["conv_kind", "conv", "conv_seq"]
            assert conn.execute("SELECT conv_kind, conv_seq FROM chat_sync").fetchall() == [("", 0)]
