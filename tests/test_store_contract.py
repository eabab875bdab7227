"""One contract, every backend: the `store` fixture runs each test on SQLite and MongoDB."""

from __future__ import annotations

import sqlite3

import orjson

from timeline.model import Document, Kind, Message
from timeline.store import Store, WriteResult
from timeline.store.mongo import INDEX_NAME, MongoStore
from timeline.store.sqlite import SQLiteStore


def message(**fields: object) -> Message:
    return Message(document=dict(fields), json=orjson.dumps(fields).decode())


def doc(
    id_: str, seq: int, created_at_ms: int = 1_000, mid: str = "m", **fields: object
) -> Document:
    return Document(id_, seq, message(**(fields or {"n": seq})), created_at_ms, mid)


def test_written_documents_read_back_in_sequence_order(store: Store) -> None:
    assert store.write([doc("g", 1)], [doc("a", 2), doc("b", 1)]) == WriteResult()
    assert store.write([doc("g", 2)], [doc("a", 1)]) == WriteResult()

    entries = store.read(Kind.SYNC, "a", after=0, limit=10)
    assert [(e.seq, orjson.loads(e.message)) for e in entries] == [(1, {"n": 1}), (2, {"n": 2})]
    assert [e.seq for e in store.read(Kind.HISTORY, "g", after=0, limit=10)] == [1, 2]
    assert [e.seq for e in store.read(Kind.SYNC, "b", after=0, limit=10)] == [1]


def test_read_honours_after_and_limit(store: Store) -> None:
    store.write([], [doc("a", seq) for seq in range(1, 11)])
    assert [e.seq for e in store.read(Kind.SYNC, "a", after=3, limit=4)] == [4, 5, 6, 7]
    assert [e.seq for e in store.read(Kind.SYNC, "a", after=8, limit=100)] == [9, 10]
    assert store.read(Kind.SYNC, "a", after=10, limit=100) == []
    assert store.read(Kind.SYNC, "nobody", after=0, limit=100) == []


def test_sync_and_history_are_separate_collections(store: Store) -> None:
    store.write([doc("a", 1, text="history")], [doc("a", 1, text="sync")])
    [history] = store.read(Kind.HISTORY, "a", 0, 10)
    [sync] = store.read(Kind.SYNC, "a", 0, 10)
    assert orjson.loads(history.message) == {"text": "history"}
    assert orjson.loads(sync.message) == {"text": "sync"}


def test_message_and_creation_time_round_trip(store: Store) -> None:
    content = {"text": "吃了吗？", "n": -(2**63), "f": 1.5, "list": [1, {"x": None}], "ok": True}
    store.write([], [Document("a", 1, message(**content), 1_700_000_000_123)])
    [entry] = store.read(Kind.SYNC, "a", 0, 10)
    assert orjson.loads(entry.message) == content
    assert entry.created_at_ms == 1_700_000_000_123


def test_taken_sync_keys_are_reported_and_the_rest_kept(store: Store) -> None:
    store.write([], [doc("a", 1, text="first"), doc("c", 1)])
    # Given a and c already hold seq 1, when a fan-out writes seq 1 to a, b, c, d,
    # then a and c are reported (positions 0 and 2) and b and d are stored.
    result = store.write(
        [doc("g", 1)], [doc("a", 1, text="second"), doc("b", 1), doc("c", 1), doc("d", 1)]
    )
    assert result == WriteResult(sync_taken=[0, 2])
    assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 10)] == [1]
    assert [e.seq for e in store.read(Kind.SYNC, "d", 0, 10)] == [1]
    [kept] = store.read(Kind.SYNC, "a", 0, 10)
    assert orjson.loads(kept.message) == {"text": "first"}  # never overwritten
    assert [e.seq for e in store.read(Kind.HISTORY, "g", 0, 10)] == [1]


def test_a_taken_history_key_stops_the_write_before_any_sync_copy(store: Store) -> None:
    store.write([doc("g", 1)], [])
    assert store.write([doc("g", 1)], [doc("a", 1)]) == WriteResult(history_taken=True)
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert len(store.read(Kind.HISTORY, "g", 0, 10)) == 1


def test_large_fan_out_in_one_write(store: Store) -> None:
    # mongomock checks unique indexes in quadratic time; real stores take the full 10,000.
    members = 1_000 if getattr(store, "simulated", False) else 10_000
    sync = [doc(f"m{i}", 1) for i in range(members)]
    assert store.write([doc("g", 1)], sync) == WriteResult()
    assert [e.seq for e in store.read(Kind.SYNC, f"m{members - 1}", 0, 10)] == [1]


def test_owners_name_the_message_holding_each_key(store: Store) -> None:
    store.write([doc("g", 1, mid="m1")], [doc("a", 1, mid="m1"), doc("a", 2, mid="m2")])
    assert store.owners(Kind.SYNC, [("a", 1), ("a", 2), ("a", 3), ("b", 1)]) == {
        ("a", 1): "m1",
        ("a", 2): "m2",
    }
    assert store.owners(Kind.HISTORY, [("g", 1)]) == {("g", 1): "m1"}
    assert store.owners(Kind.SYNC, []) == {}


def test_max_seqs_give_each_timeline_its_highest_stored_sequence(store: Store) -> None:
    store.write([doc("g", 4)], [doc("a", seq) for seq in (1, 2, 9)] + [doc("b", 3)])
    assert store.max_seqs(Kind.SYNC, ["a", "b", "nobody"]) == {"a": 9, "b": 3, "nobody": 0}
    assert store.max_seqs(Kind.HISTORY, ["g", "a"]) == {"g": 4, "a": 0}
    many = [f"m{i}" for i in range(1_200)]  # more than one statement's worth
    assert store.max_seqs(Kind.SYNC, many) == dict.fromkeys(many, 0)


def test_ping_answers(store: Store) -> None:
    store.ping()


def test_mongo_creates_the_unique_index_idempotently(mongo_store: MongoStore) -> None:
    mongo_store.ensure_indexes()
    mongo_store._indexes_ready = False
    mongo_store.ensure_indexes()  # a second worker doing the same must not fail
    for collection in mongo_store._collections.values():
        index = collection.index_information()[INDEX_NAME]
        assert index["key"] == [("id", 1), ("seq", 1)]
        assert index["unique"] is True


def test_sqlite_scans_are_served_by_the_primary_key(sqlite_store: SQLiteStore) -> None:
    conn = sqlite3.connect(sqlite_store.path)
    for table in ("chat_sync", "chat_history"):
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT seq, message, created_at FROM {table} "  # noqa: S608
            "WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?",
            ("a", 0, 10),
        ).fetchall()
        detail = " ".join(row[-1] for row in plan)
        assert "PRIMARY KEY" in detail
        assert "TEMP B-TREE" not in detail
    conn.close()
