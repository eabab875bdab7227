"""One contract, every backend: the `store` fixture runs each test on SQLite and MongoDB."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymongo.errors import AutoReconnect

from timeline.errors import PartialWrite, Unavailable
from timeline.model import HOLE_MID, Copies, Kind, Message
from timeline.store import Claim, Purger, Store, WriteResult
from timeline.store.mongo import MongoStore
from timeline.store.sqlite import SQLiteStore
from timeline.store.sqlite import store as sqlite_module
from timeline.store.sqlite import writing as sqlite_writing
from timeline.store.sqlite.group import GroupCommit


def message(**fields: object) -> Message:
    return Message(document=dict(fields), json=orjson.dumps(fields).decode())


def copies(
    ids: str | list[str],
    first: int | list[int],
    *messages: Message,
    created_at_ms: int = 1_000,
    mid: str = "m",
) -> Copies:
    """Copies for these timelines, starting at `first` (one per timeline, or the same)."""
    ids = [ids] if isinstance(ids, str) else ids
    firsts = first if isinstance(first, list) else [first] * len(ids)
    return Copies(ids, firsts, list(messages) or [message(n=1)], created_at_ms, mid)


def stored(store: Store, kind: Kind, timeline_id: str) -> list[tuple[int, object, str]]:
    """Every document of a timeline: its sequence, message and mid."""
    return [(e.seq, orjson.loads(e.message), e.mid) for e in store.read(kind, timeline_id, 0, 99)]


def test_written_copies_read_back_in_sequence_order(store: Store) -> None:
    one, two = message(n=1), message(n=2)
    assert store.write(copies("g", 1, one), copies(["a", "b"], [2, 1], two)) == WriteResult()
    assert store.write(copies("g", 2, one), copies("a", 1, one)) == WriteResult()

    entries = store.read(Kind.SYNC, "a", after=0, limit=10)
    assert [(e.seq, orjson.loads(e.message)) for e in entries] == [(1, {"n": 1}), (2, {"n": 2})]
    assert [e.seq for e in store.read(Kind.HISTORY, "g", after=0, limit=10)] == [1, 2]
    assert [e.seq for e in store.read(Kind.SYNC, "b", after=0, limit=10)] == [1]


def test_a_batch_gives_each_timeline_its_messages_in_order(store: Store) -> None:
    batch = [message(n=1), message(n=2), message(n=3)]
    assert store.write(copies("g", 5, *batch), copies(["a", "b"], [1, 8], *batch)) == WriteResult()
    for timeline, kind, first in (("g", Kind.HISTORY, 5), ("a", Kind.SYNC, 1), ("b", Kind.SYNC, 8)):
        entries = store.read(kind, timeline, 0, 10)
        assert [e.seq for e in entries] == [first, first + 1, first + 2]
        assert [orjson.loads(e.message)["n"] for e in entries] == [1, 2, 3]


def test_read_honours_after_and_limit(store: Store) -> None:
    store.write(None, copies("a", 1, *[message(n=i) for i in range(1, 11)]))
    assert [e.seq for e in store.read(Kind.SYNC, "a", after=3, limit=4)] == [4, 5, 6, 7]
    assert [e.seq for e in store.read(Kind.SYNC, "a", after=8, limit=100)] == [9, 10]
    assert store.read(Kind.SYNC, "a", after=10, limit=100) == []
    assert store.read(Kind.SYNC, "nobody", after=0, limit=100) == []


def test_a_read_bounded_in_bytes_stops_after_the_entry_that_crosses(store: Store) -> None:
    # Ten messages of about 1,000 bytes each: a bound of 2,500 gives the first three (the
    # third takes the total past it), never a part of one, and at least one whatever it is.
    big = [message(i=i, pad="x" * 1_000) for i in range(10)]
    store.write(None, copies("a", 1, *big))
    size = len(big[0].json)
    assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10, 0, 2 * size + size // 2)] == [1, 2, 3]
    assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10, 0, 1)] == [1]
    assert [e.seq for e in store.read(Kind.SYNC, "a", 4, 10, 0, 10**9)] == [5, 6, 7, 8, 9, 10]
    page = store.page(Kind.SYNC, "a", 2, 10, 0, size + 1)
    assert ([e.seq for e in page.entries], page.lowest and page.lowest.seq) == ([3, 4], 1)


def test_sync_and_history_are_separate_collections(store: Store) -> None:
    store.write(copies("a", 1, message(text="history")), copies("a", 1, message(text="sync")))
    [history] = store.read(Kind.HISTORY, "a", 0, 10)
    [sync] = store.read(Kind.SYNC, "a", 0, 10)
    assert orjson.loads(history.message) == {"text": "history"}
    assert orjson.loads(sync.message) == {"text": "sync"}


def test_message_creation_time_and_mid_round_trip(store: Store) -> None:
    content = {"text": "吃了吗？", "n": -(2**63), "f": 1.5, "list": [1, {"x": None}], "ok": True}
    store.write(None, copies("a", 1, message(**content), created_at_ms=1_700_000_000_123, mid="x"))
    [entry] = store.read(Kind.SYNC, "a", 0, 10)
    assert orjson.loads(entry.message) == content
    assert (entry.created_at_ms, entry.mid) == (1_700_000_000_123, "x")


def test_taken_sync_keys_are_reported_and_the_rest_kept(store: Store) -> None:
    store.write(None, copies(["a", "c"], 1, message(text="first")))
    # Given a and c already hold seq 1, when a fan-out writes seq 1 to a, b, c, d
    # (the first copy of the bulk write taken: an ordered insert would stop there),
    result = store.write(
        copies("g", 1), copies(["a", "b", "c", "d"], 1, message(text="second"), mid="m2")
    )
    # then b and d are stored all the same,
    for member in ("b", "d"):
        assert stored(store, Kind.SYNC, member) == [(1, {"text": "second"}, "m2")], member
    # a and c keep what they had, never overwritten nor doubled,
    for member in ("a", "c"):
        assert stored(store, Kind.SYNC, member) == [(1, {"text": "first"}, "m")], member
    # and exactly a and c are reported, by position (0 and 2).
    assert result == WriteResult(sync_taken=[0, 2])
    assert [e.seq for e in store.read(Kind.HISTORY, "g", 0, 10)] == [1]


def test_a_key_is_stored_once_whoever_writes_it_again(store: Store) -> None:
    # Given seq 1 of sync timeline a and of history g stored by message m1,
    store.write(copies("g", 1, message(text="one"), mid="m1"), copies("a", 1, mid="m1"))
    # when other messages write the same keys, alone or in a batch that covers them,
    assert store.write(None, copies("a", 1, mid="m2")) == WriteResult(sync_taken=[0])
    assert store.write(copies("g", 1, mid="m3"), None) == WriteResult(history_taken=True)
    batch = copies("g", 1, message(n=1), message(n=2), mid="m4")
    assert store.write(batch, None) == WriteResult(history_taken=True)
    # then each key still holds one document, the first one's.
    assert stored(store, Kind.SYNC, "a") == [(1, {"n": 1}, "m1")]
    assert store.gap(Kind.SYNC, "a", 1, 2, 0) == (1, 0)
    assert stored(store, Kind.HISTORY, "g") == [(1, {"text": "one"}, "m1")]
    assert store.gap(Kind.HISTORY, "g", 1, 3, 0) == (1, 0)


def test_ack_removes_the_member_s_entries_up_to_and_including_seq(store: Store) -> None:
    # Given a holds 1..5 and b holds 1..2,
    store.write(None, copies(["a", "b"], 1, *[message(n=i) for i in (1, 2)]))
    store.write(None, copies("a", 3, *[message(n=i) for i in (3, 4, 5)]))
    # when a acks 3,
    store.ack("a", 3, 3)
    # then 1, 2 and 3 are gone and 4 and 5 kept; b is untouched,
    assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10)] == [4, 5]
    assert store.gap(Kind.SYNC, "a", 1, 4, 0) == (0, 0)
    assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 10)] == [1, 2]
    # and the floor keeps a's place: nothing is written at or below 3 again.
    assert store.max_seqs(Kind.SYNC, ["a"]) == {"a": 5}
    assert store.write(None, copies("a", 3, mid="late")) == WriteResult(sync_taken=[0])
    # An ack of 0 removes nothing; an ack beyond the last removes everything.
    store.ack("b", 0, 0)
    assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 10)] == [1, 2]
    store.ack("a", 99, 5)
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert store.max_seqs(Kind.SYNC, ["a"]) == {"a": 5}


def test_a_taken_history_key_stops_the_write_before_any_sync_copy(store: Store) -> None:
    store.write(copies("g", 1), None)
    assert store.write(copies("g", 1), copies("a", 1)) == WriteResult(history_taken=True)
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert len(store.read(Kind.HISTORY, "g", 0, 10)) == 1


def test_large_fan_out_in_one_write(store: Store) -> None:
    # mongomock checks unique indexes in quadratic time; real stores take the full 10,000.
    members = 1_000 if getattr(store, "simulated", False) else 10_000
    sync = copies([f"m{i}" for i in range(members)], 1)
    assert store.write(copies("g", 1), sync) == WriteResult()
    assert [e.seq for e in store.read(Kind.SYNC, f"m{members - 1}", 0, 10)] == [1]


def test_owners_name_the_message_holding_each_key(store: Store) -> None:
    store.write(copies("g", 1, mid="m1"), copies("a", 1, mid="m1"))
    store.write(None, copies("a", 2, mid="m2"))
    assert store.owners(Kind.SYNC, [("a", 1), ("a", 2), ("a", 3), ("b", 1)]) == {
        ("a", 1): "m1",
        ("a", 2): "m2",
    }
    assert store.owners(Kind.HISTORY, [("g", 1)]) == {("g", 1): "m1"}
    assert store.owners(Kind.SYNC, []) == {}


def test_max_seqs_give_each_timeline_its_highest_stored_sequence(store: Store) -> None:
    store.write(copies("g", 4), copies(["a", "a", "a", "b"], [1, 2, 9, 3]))
    assert store.max_seqs(Kind.SYNC, ["a", "b", "nobody"]) == {"a": 9, "b": 3, "nobody": 0}
    assert store.max_seqs(Kind.HISTORY, ["g", "a"]) == {"g": 4, "a": 0}
    many = [f"m{i}" for i in range(1_200)]  # more than one statement's worth
    assert store.max_seqs(Kind.SYNC, many) == dict.fromkeys(many, 0)


def test_ping_answers_and_the_store_is_ready(store: Store) -> None:
    store.ping()
    assert store.readiness() == "ready"


def test_owners_of_many_timelines_at_once(store: Store) -> None:
    # A replay to a big group asks about every member's range at once.
    members = [f"m{i}" for i in range(700)]
    store.write(None, Copies(members, list(range(1, 701)), [message(n=1)], 1_000, "x"))
    keys = [(member, i + 1) for i, member in enumerate(members)]
    keys += [(member, i + 2) for i, member in enumerate(members)]  # not stored
    assert store.owners(Kind.SYNC, keys) == {key: "x" for key in keys[:700]}


def test_a_gap_tells_hidden_documents_from_visible_ones(store: Store) -> None:
    store.write(None, copies("a", 1, message(n=1), created_at_ms=100))  # expired at 500
    store.write(None, copies("a", 2, message(n=2), created_at_ms=900))
    store.seal(Kind.SYNC, [("a", 3)], 900)
    store.write(None, copies("a", 5, message(n=5), created_at_ms=900))
    assert store.gap(Kind.SYNC, "a", 1, 6, 500) == (4, 2)  # 1 expired, 3 a placeholder
    assert store.gap(Kind.SYNC, "a", 1, 6, 0) == (4, 1)  # nothing expires
    assert store.gap(Kind.SYNC, "a", 3, 5, 500) == (1, 1)  # 4 is missing
    assert store.gap(Kind.SYNC, "nobody", 1, 9, 500) == (0, 0)


def test_copies_at_or_below_a_floor_count_as_taken(store: Store) -> None:
    store.write(copies("g", 1), copies(["a", "b"], 1))
    store.write(copies("g", 2), copies(["a", "b"], 2))
    store.ack("a", 2, 2)  # a's floor: 2
    # A lagging counter hands out 2 again: a's copy is refused, b's (taken) too.
    result = store.write(None, copies(["b", "a", "c"], 2, mid="late"))
    assert result == WriteResult(sync_taken=[0, 1])
    assert store.owners(Kind.SYNC, [("a", 2), ("c", 2)]) == {("c", 2): "late"}
    assert store.read(Kind.SYNC, "a", 0, 10) == []


def test_copies_at_or_below_a_floor_count_as_taken_when_no_key_is(store: Store) -> None:
    store.write(None, copies("a", 1))
    store.write(None, copies("a", 2))
    store.ack("a", 2, 2)  # a's 1 and 2 removed; its floor: 2
    # Nothing stored at (a, 2) any more: the floor alone refuses it; c's copy goes in.
    result = store.write(None, copies(["a", "c"], 2, mid="late"))
    assert result == WriteResult(sync_taken=[0])
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert store.owners(Kind.SYNC, [("a", 2), ("c", 2)]) == {("c", 2): "late"}


def test_a_floor_refuses_its_timeline_in_a_big_write_too(store: Store) -> None:
    store.write(None, copies("m", 1))
    store.ack("m", 1, 1)  # m's 1 removed; its floor: 1
    # More timelines than SQLite writes in one statement (it looks the floors up first).
    others = [f"x{i}" for i in range(100)]
    result = store.write(None, copies([*others, "m"], 1, mid="late"))
    assert result == WriteResult(sync_taken=[100])  # m's, by its floor alone
    assert store.read(Kind.SYNC, "m", 0, 10) == []
    assert store.owners(Kind.SYNC, [("x99", 1)]) == {("x99", 1): "late"}


def test_a_floor_refuses_a_big_batch_of_history_too(store: Store) -> None:
    store.write(copies("g", 1, created_at_ms=100), None)
    assert store.purge(Kind.HISTORY, 500) == 1  # history floor: 1
    batch = [message(n=n) for n in range(100)]  # more rows than one SQLite statement takes
    assert store.write(copies("g", 1, *batch, mid="late"), copies("a", 1, *batch)) == (
        WriteResult(history_taken=True)
    )
    assert store.read(Kind.HISTORY, "g", 0, 200) == []
    assert store.read(Kind.SYNC, "a", 0, 200) == []


def test_history_at_or_below_its_floor_counts_as_taken(store: Store) -> None:
    for seq in (1, 2, 3):
        store.write(copies("g", seq, created_at_ms=100), None)
    assert store.purge(Kind.HISTORY, 500) == 3  # history floor: 3
    # A history copy at 3 is refused, and with it the whole write: no sync copy is made.
    assert store.write(copies("g", 3, mid="late"), copies("a", 1)) == WriteResult(
        history_taken=True
    )
    assert store.owners(Kind.HISTORY, [("g", 3)]) == {}
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert store.write(copies("g", 4), copies("a", 1)) == WriteResult()


def test_sqlite_scans_are_served_by_the_unique_index(sqlite_store: SQLiteStore) -> None:
    conn = sqlite3.connect(sqlite_store.path)
    for table in ("chat_sync", "chat_history"):
        for order in ("", " DESC"):
            plan = conn.execute(
                f"EXPLAIN QUERY PLAN SELECT seq, message, created_at FROM {table} "  # noqa: S608
                f"WHERE id = ? AND seq > ? ORDER BY seq{order} LIMIT ?",
                ("a", 0, 10),
            ).fetchall()
            detail = " ".join(row[-1] for row in plan)
            assert "USING INDEX sqlite_autoindex" in detail
            assert "TEMP B-TREE" not in detail
    conn.close()


def test_the_sqlite_purge_finds_the_expired_rows_by_creation_order(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    # 1,000 copies created at t = 0..999 ms, in 1,000 writes (rowids in creation order).
    for t in range(1000):
        store.write(None, copies(f"u{t % 7}", t // 7 + 1, created_at_ms=t))
    assert store.purge(Kind.SYNC, before_ms=0) == 0
    assert store.purge(Kind.SYNC, before_ms=637) == 637
    left = [e.created_at_ms for who in range(7) for e in store.read(Kind.SYNC, f"u{who}", 0, 999)]
    assert sorted(left) == list(range(637, 1000))
    assert store.purge(Kind.SYNC, before_ms=10_000) == 363
    # The floors remember where every timeline was.
    assert store.max_seqs(Kind.SYNC, ["u0", "u6"]) == {"u0": 143, "u6": 142}


def test_a_file_of_the_earlier_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE chat_sync (id TEXT NOT NULL, seq INTEGER NOT NULL, message TEXT NOT NULL,"
        " created_at INTEGER NOT NULL, PRIMARY KEY (id, seq)) WITHOUT ROWID"
    )
    old.execute("INSERT INTO chat_sync VALUES ('a', 1, '{\"n\":1}', 5)")
    old.commit()
    old.close()
    store = SQLiteStore(path)
    [entry] = store.read(Kind.SYNC, "a", 0, 10)
    assert (entry.seq, entry.message, entry.created_at_ms, entry.mid) == (1, '{"n":1}', 5, "")
    assert store.write(None, copies("a", 2)) == WriteResult()


# --- big writes: cut into parts of whole timelines ------------------------------------------


class Parts:
    """Counts the parts (SQLite transactions, MongoDB sync insert_many calls) the store's
    writes are cut into, and fails the `fail`-th one when asked: at the start of its
    transaction on SQLite, where another connection holds the write lock past the busy
    timeout (a real `database is locked`); on MongoDB as a lost connection does."""

    def __init__(self, store: Store, fail: int = 0) -> None:
        self.store, self.fail, self.started, self.injected = store, fail, 0, 0
        if isinstance(store, SQLiteStore):
            write_part, begin = store._parts.write, store._connections.begin
            armed = [False]

            def counted_write_part(*args: Any) -> Any:
                self.started += 1
                armed[0] = self.started == self.fail
                return write_part(*args)

            def locked_begin(conn: sqlite3.Connection) -> None:
                if not armed[0]:
                    return begin(conn)
                armed[0] = False
                self.injected += 1
                blocker = sqlite3.connect(store.path, isolation_level=None)
                blocker.execute("BEGIN IMMEDIATE")
                timeout = store._connections.busy_timeout_s
                store._connections.busy_timeout_s = 0.05
                try:
                    return begin(conn)
                finally:
                    store._connections.busy_timeout_s = timeout
                    blocker.execute("ROLLBACK")
                    blocker.close()

            store._parts.write = counted_write_part  # type: ignore[method-assign]
            store._connections.begin = locked_begin  # type: ignore[method-assign]
        else:
            assert isinstance(store, MongoStore)
            collection = store._collections[Kind.SYNC]
            insert_many = collection.insert_many

            def failing_insert_many(documents: Any, *args: Any, **kwargs: Any) -> Any:
                self.started += 1
                if self.started == self.fail:
                    self.injected += 1
                    raise AutoReconnect("injected: connection reset between two parts")
                return insert_many(documents, *args, **kwargs)

            proxy = _Proxy(collection, insert_many=failing_insert_many)
            store._collections[Kind.SYNC] = proxy  # type: ignore[assignment]


class _Proxy:
    def __init__(self, inner: Any, **overrides: Any) -> None:
        self.inner, self.overrides = inner, overrides

    def __getattr__(self, name: str) -> Any:
        return self.overrides.get(name) or getattr(self.inner, name)


def batch_of(n: int) -> list[Message]:
    return [message(n=i) for i in range(1, n + 1)]


def test_a_write_bigger_than_one_part_stores_every_timeline_s_batch_in_order(
    store: Store,
) -> None:
    # Parts of 7 copies: two timelines of a 3-message batch each; 5 timelines, 3 parts.
    store.write_chunk_rows = 7  # type: ignore[attr-defined]
    parts = Parts(store)
    members = ["a", "b", "c", "d", "e"]
    firsts = [1, 4, 1, 10, 2]
    sync = Copies(members, firsts, batch_of(3), 1_000, "m")
    assert store.write(copies("g", 1, *batch_of(3)), sync) == WriteResult()
    # SQLite: the history copies share the first part's transaction.
    assert parts.started == 3
    for member, first in zip(members, firsts, strict=True):
        assert stored(store, Kind.SYNC, member) == [
            (first + i, {"n": i + 1}, "m") for i in range(3)
        ], member
    assert [e.seq for e in store.read(Kind.HISTORY, "g", 0, 10)] == [1, 2, 3]


def test_taken_keys_in_a_later_part_are_reported_by_their_position_in_the_whole_write(
    store: Store,
) -> None:
    store.write_chunk_rows = 6  # type: ignore[attr-defined]
    store.write(None, copies("d", 2, message(text="other"), mid="other"))  # in d's range
    store.ack("e", 1, 1)  # e's range starts at its floor
    parts = Parts(store)
    members = ["a", "b", "c", "d", "e", "f"]
    result = store.write(None, Copies(members, [1] * 6, batch_of(3), 1_000, "m"))
    assert parts.started == 3  # a b | c d | e f
    # d's seq 2 and e's seq 1 (the fourth and fifth timelines of 3 copies each) are taken,
    # by position in the whole write: 10 and 12; where the store keeps a batch together
    # (SQLite), all of d's and e's copies are reported: 9..14.
    expected = list(range(9, 15)) if store.backend == "sqlite" else [10, 12]
    assert result == WriteResult(sync_taken=expected)
    for member in ("a", "b", "c", "f"):
        assert [e.seq for e in store.read(Kind.SYNC, member, 0, 10)] == [1, 2, 3], member
    assert store.owners(Kind.SYNC, [("d", 2)]) == {("d", 2): "other"}
    if store.backend == "sqlite":
        assert stored(store, Kind.SYNC, "d") == [(2, {"text": "other"}, "other")]
        assert stored(store, Kind.SYNC, "e") == []


def test_a_write_failing_between_its_parts_is_partial_and_writing_again_finishes_it(
    store: Store,
) -> None:
    store.write_chunk_rows = 6  # type: ignore[attr-defined]
    members = ["a", "b", "c", "d", "e"]
    history, sync = copies("g", 1, *batch_of(3)), Copies(members, [1] * 5, batch_of(3), 1, "m")
    parts = Parts(store, fail=2)  # a b | c d (fails) | e
    with pytest.raises(PartialWrite):  # the history copies are stored
        store.write(history, sync)
    assert parts.injected == 1
    assert [e.seq for e in store.read(Kind.HISTORY, "g", 0, 10)] == [1, 2, 3]
    assert [bool(store.read(Kind.SYNC, member, 0, 10)) for member in members] == [
        True,
        True,
        False,
        False,
        False,
    ]
    # Writing the same documents again (as the service does: the history copy is
    # stored, so the sync copies alone) finds the first part stored, by this message,
    assert store.write(history, sync) == WriteResult(history_taken=True)
    assert store.write(None, sync) == WriteResult(sync_taken=list(range(6)))
    # and stores the rest: every copy once.
    keys = [(member, seq) for member in members for seq in (1, 2, 3)]
    assert store.owners(Kind.SYNC, keys) == dict.fromkeys(keys, "m")
    for member in members:
        assert stored(store, Kind.SYNC, member) == [(i, {"n": i}, "m") for i in (1, 2, 3)]


def test_a_sync_only_write_failing_between_its_parts_is_unavailable(store: Store) -> None:
    store.write_chunk_rows = 3  # type: ignore[attr-defined]
    sync = Copies(["a", "b", "c"], [1, 1, 1], batch_of(3), 1, "m")
    parts = Parts(store, fail=2)
    with pytest.raises(Unavailable) as raised:
        store.write(None, sync)
    assert not isinstance(raised.value, PartialWrite)  # no history copy in this write
    assert parts.injected == 1
    assert store.write(None, sync) == WriteResult(sync_taken=[0, 1, 2])  # a's, stored
    for member in ("a", "b", "c"):
        assert [e.seq for e in store.read(Kind.SYNC, member, 0, 10)] == [1, 2, 3]


def test_a_batch_bigger_than_a_part_is_never_cut(store: Store) -> None:
    store.write_chunk_rows = 2  # type: ignore[attr-defined]
    store.write_chunk_bytes = 10  # type: ignore[attr-defined]
    parts = Parts(store)
    sync = Copies(["a", "b"], [1, 5], batch_of(4), 1, "m")
    assert store.write(None, sync) == WriteResult()
    assert parts.started == 2  # one timeline each, 4 copies
    assert [e.seq for e in store.read(Kind.SYNC, "b", 0, 10)] == [5, 6, 7, 8]


def test_parts_are_cut_by_the_bytes_of_their_messages_too(store: Store) -> None:
    store.write_chunk_bytes = 2_500  # type: ignore[attr-defined]
    big = message(text="x" * 1_000)  # about 1 KB a copy: two timelines a part
    parts = Parts(store)
    assert store.write(None, copies(["a", "b", "c", "d", "e"], 1, big)) == WriteResult()
    assert parts.started == 3
    for member in "abcde":
        assert len(store.read(Kind.SYNC, member, 0, 10)) == 1


# --- many keys at once --------------------------------------------------------------------


def test_owners_of_many_ranges_are_exact(store: Store) -> None:
    # 120 timelines, each with a run of its own: whole, partly stored, held by two messages,
    # with a placeholder, or empty; asked for in runs, unordered, and twice over.
    expected: dict[tuple[str, int], str] = {}
    keys: list[tuple[str, int]] = []
    for i in range(120):
        member, first, length = f"m{i}", 1 + i % 7, 1 + i % 5
        run = [(member, first + j) for j in range(length)]
        keys += run
        shape = i % 4
        if shape == 0:  # all of it, by one message
            store.write(None, Copies([member], [first], batch_of(length), 1, "x"))
            expected |= dict.fromkeys(run, "x")
        elif shape == 1 and length > 1:  # the first half by x, the rest by y
            half = length // 2
            store.write(None, Copies([member], [first], batch_of(half), 1, "x"))
            store.write(None, Copies([member], [first + half], batch_of(length - half), 1, "y"))
            expected |= dict.fromkeys(run[:half], "x") | dict.fromkeys(run[half:], "y")
        elif shape == 2:  # only the last one, a placeholder
            store.seal(Kind.SYNC, run[-1:], 1)
            expected[run[-1]] = HOLE_MID
        # shape 3: nothing stored; and what lies just outside each run must not count
        store.write(None, Copies([member], [first + length], [message(n=0)], 1, "outside"))
    assert store.owners(Kind.SYNC, keys) == expected
    assert store.owners(Kind.SYNC, keys[::-1] + keys[:50]) == expected
    assert store.owners(Kind.SYNC, [("m0", 1), ("m0", 3), ("m8", 2)]) == {
        key: expected[key] for key in [("m0", 1), ("m8", 2)] if key in expected
    }
    assert store.owners(Kind.HISTORY, keys) == {}


def test_seal_and_unwrite_of_many_keys_go_in_parts_and_stay_exact(store: Store) -> None:
    store.write_chunk_rows = 4  # type: ignore[attr-defined]
    store.write(None, Copies(["a", "b"], [3, 1], batch_of(2), 1, "m"))  # a 3..4, b 1..2
    store.write(None, copies("c", 2, mid="other"))
    keys = [(member, seq) for member in "abc" for seq in range(1, 6)]
    taken = store.seal(Kind.SYNC, keys, 5)
    assert taken == [("a", 3), ("a", 4), ("b", 1), ("b", 2), ("c", 2)]
    owners = store.owners(Kind.SYNC, keys)
    assert {key for key, mid in owners.items() if mid == HOLE_MID} == set(keys) - set(taken)
    # unwrite removes exactly m's documents among the keys, whatever else they hold.
    store.unwrite(Kind.SYNC, keys, "m")
    assert store.owners(Kind.SYNC, [("a", 3), ("a", 4), ("b", 1), ("b", 2)]) == {}
    assert store.owners(Kind.SYNC, [("c", 2), ("c", 3)]) == {("c", 2): "other", ("c", 3): HOLE_MID}


# --- idempotency records: the store's claim on a message's sequences ----------------------

#: An hour from now, for the records' times: MongoDB's TTL index removes a record once its
#: expires_at has passed on the wall clock (mongomock at every access), and these tests
#: expire records by the `now_ms` they give claim(), never by the wall clock.
NOW = int(time.time() * 1000) + 3_600_000
DAY = 86_400_000


def claim_of(
    n: int,
    fingerprint: str = "f" * 16,
    lasts: tuple[int, ...] = (7, 12, 3),
    allocated_ms: int = NOW,
    expires_ms: int = NOW + DAY,
) -> Claim:
    return Claim(f"{n:032x}", fingerprint, lasts, allocated_ms, expires_ms)


def held(store: Store, claim: Claim, now_ms: int = NOW) -> Claim:
    """The record stored for claim.mid, asked for by a claim that differs in everything
    else (which would be stored, and returned, were there none)."""
    probe = Claim(claim.mid, "0" * 16, (0,), 1, NOW + 2 * DAY)
    return store.claim(probe, now_ms)


def test_a_first_claim_is_stored_and_returned(store: Store) -> None:
    first = claim_of(1)
    assert store.claim(first, NOW) == first
    assert held(store, first) == first
    # Another message's record is its own.
    other = claim_of(2, fingerprint="e" * 16, lasts=(1,))
    assert store.claim(other, NOW + 1) == other
    assert held(store, first) == first


def test_a_later_claim_gets_the_earlier_record_unchanged(store: Store) -> None:
    first = claim_of(1, allocated_ms=NOW - 5, expires_ms=NOW + 1_000)
    assert store.claim(first, NOW) == first
    # Other lasts (a retry that allocated again), another fingerprint (another message), or
    # other times, up to the last millisecond before the record expires: the first one.
    for later in (
        replace(first, lasts=(8, 13, 4), allocated_ms=NOW + 1),
        replace(first, fingerprint="e" * 16, lasts=(1, 2), expires_ms=NOW + DAY),
        claim_of(1, fingerprint="d" * 16, lasts=(), allocated_ms=NOW + 999),
    ):
        assert store.claim(later, NOW + 999) == first
    assert held(store, first, NOW + 999) == first


def test_a_write_stores_its_claim_with_its_copies(store: Store) -> None:
    claim = claim_of(1, lasts=(1, 1, 1))
    result = store.write(
        copies("g", 1, mid=claim.mid), copies(["a", "b"], 1, mid=claim.mid), claim, NOW
    )
    assert result == WriteResult()
    assert held(store, claim) == claim
    assert [seq for seq, _, _ in stored(store, Kind.SYNC, "b")] == [1]
    # The same claim again (a write tried again after an unknown outcome) writes on.
    again = store.write(None, copies("c", 1, mid=claim.mid), claim, NOW + 1)
    assert again == WriteResult()
    assert [seq for seq, _, _ in stored(store, Kind.SYNC, "c")] == [1]


def test_a_write_whose_mid_holds_another_record_writes_nothing(store: Store) -> None:
    first = claim_of(1, lasts=(1, 1, 1))
    assert store.claim(first, NOW) == first
    later = replace(first, lasts=(2, 2, 2), allocated_ms=NOW + 5, expires_ms=NOW + 3 * DAY)
    result = store.write(
        copies("g", 2, mid=first.mid), copies(["a", "b"], 2, mid=first.mid), later, NOW + 5
    )
    assert result == WriteResult(claimed=first)
    assert held(store, first, NOW + 5) == first
    for kind, timeline in ((Kind.HISTORY, "g"), (Kind.SYNC, "a"), (Kind.SYNC, "b")):
        assert stored(store, kind, timeline) == []
    # Once the record expired, the write's claim replaces it and the copies go in.
    result = store.write(copies("g", 2, mid=first.mid), None, later, NOW + DAY)
    assert result == WriteResult()
    assert held(store, later, NOW + DAY) == later


def test_a_write_that_finds_its_history_taken_leaves_its_claim_to_claim(store: Store) -> None:
    store.write(copies("g", 1, mid="other"), None)
    claim = claim_of(1, lasts=(1, 1))
    result = store.write(copies("g", 1, mid=claim.mid), copies("a", 1, mid=claim.mid), claim, NOW)
    assert result.history_taken
    assert stored(store, Kind.SYNC, "a") == []
    # Stored with it or not (SQLite rolls it back with the copies, MongoDB keeps it: its own
    # collection), claim() then settles it: this claim, no other.
    assert store.claim(claim, NOW + 1) == claim
    assert held(store, claim, NOW + 1) == claim


def test_an_expired_record_is_replaced(store: Store) -> None:
    first = claim_of(1, expires_ms=NOW + 1_000)
    store.claim(first, NOW)
    second = claim_of(1, fingerprint="e" * 16, lasts=(20, 30), allocated_ms=NOW + 1_000)
    # At its expires_ms a record has expired (unexpired means expires_ms > now).
    assert store.claim(second, NOW + 1_000) == second
    assert held(store, second, NOW + 1_001) == second
    # and the record that replaced it holds in turn.
    third = claim_of(1, fingerprint="d" * 16, lasts=(5,), allocated_ms=NOW + 2_000)
    assert store.claim(third, NOW + 2_000) == second


def test_reclaim_is_a_compare_and_set_on_the_lasts_the_caller_read(store: Store) -> None:
    first = claim_of(1, lasts=(7, 12, 3), allocated_ms=NOW - 5, expires_ms=NOW + DAY)
    store.claim(first, NOW)
    # The lasts change from what was read to the new ones, and nothing else changes: not
    # the fingerprint, not the times; the record stored afterwards is returned.
    moved = replace(first, lasts=(7, 15, 3))
    assert (
        store.reclaim(replace(first, allocated_ms=NOW + 7, expires_ms=NOW + 9), moved.lasts)
        == moved
    )
    assert held(store, first) == moved
    # An attempt that read the record before that change loses: nothing changes, and it
    # learns the record that won (as redis-py's lock checks its token before it acts).
    assert store.reclaim(first, (7, 20, 3)) == moved
    assert held(store, first) == moved
    # Another fingerprint (another message's claim on the mid) changes nothing either,
    other = replace(moved, fingerprint="e" * 16)
    assert store.reclaim(other, (99, 99, 99)) == moved
    assert held(store, first) == moved
    # and a reclaim of a mid nobody claimed stores nothing.
    unclaimed = claim_of(2)
    assert store.reclaim(unclaimed, (5,)) is None
    probe = held(store, unclaimed)
    assert probe.fingerprint == "0" * 16  # the probe itself: nothing was there


def test_of_two_reclaims_from_the_same_record_one_wins(store: Store) -> None:
    first = claim_of(1, lasts=(4, 4, 4))
    store.claim(first, NOW)
    won = store.reclaim(first, (9, 9, 9))
    lost = store.reclaim(first, (11, 11, 11))
    assert won == lost == replace(first, lasts=(9, 9, 9))


def test_ten_thousand_and_one_lasts_round_trip_exactly(store: Store) -> None:
    # A sendGroup to 10,000 members: the history's last, then each member's, in order;
    # small and large sequences (int32 and int64 in BSON), the largest an int64 holds.
    rng = random.Random(7)
    lasts = tuple(
        rng.choice([rng.randrange(1, 1_000), rng.randrange(1, 2**62)]) for _ in range(10_001)
    )
    lasts = (*lasts[:-4], 1, 2**31 - 1, 2**31, 2**63 - 1)
    big = claim_of(1, lasts=lasts)
    assert store.claim(big, NOW) == big
    found = held(store, big)
    assert found.lasts == lasts
    assert all(type(last) is int for last in found.lasts)
    moved = (*(last + 1 if i % 2 else last for i, last in enumerate(lasts[:-1])), 5)
    assert store.reclaim(big, moved) == replace(big, lasts=moved)
    assert held(store, big).lasts == moved


def test_claims_racing_for_one_mid_all_get_the_same_winner(store: Store) -> None:
    if getattr(store, "simulated", False):
        pytest.skip("mongomock is not thread-safe; a real MongoDB runs this")
    threads, rounds = 6, 15
    barrier = threading.Barrier(threads)
    got: dict[int, list[Claim]] = {n: [] for n in range(rounds)}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def contender(t: int) -> None:
        try:
            for n in range(rounds):
                mine = claim_of(n, fingerprint=f"{t:016x}", lasts=(n, t, 10 * t))
                barrier.wait(10)  # all claims of a round start together
                winner = store.claim(mine, NOW)
                with lock:
                    got[n].append(winner)
        except BaseException as exc:  # reported below, the test failing
            failures.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=contender, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not failures
    for n, winners in got.items():
        assert len(winners) == threads
        assert len(set(winners)) == 1, winners  # one winner, whoever asks
        [winner] = set(winners)
        assert winner.fingerprint in {f"{t:016x}" for t in range(threads)}
        assert winner.lasts == (n, int(winner.fingerprint, 16), 10 * int(winner.fingerprint, 16))
        assert held(store, winner) == winner


def test_sqlite_purges_expired_claims_in_batches(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_FORGET_BATCH", 100)
    batches: list[int] = []
    let_in = sqlite_store._connections.let_waiting_writers_in
    monkeypatch.setattr(
        sqlite_store._connections, "let_waiting_writers_in", lambda: batches.append(1) or let_in()
    )
    for n in range(250):
        sqlite_store.claim(claim_of(n, expires_ms=NOW + n % 5), NOW - 1)  # NOW .. NOW + 4
    for n in range(250, 255):
        sqlite_store.claim(claim_of(n, expires_ms=NOW + DAY), NOW - 1)
    assert sqlite_store.forget_expired_claims(NOW - 1) == 0  # none has expired
    # At NOW + 4 all of the first 250 have (expires_ms <= now): three batches, writers let in
    # between them; the five unexpired stay.
    assert sqlite_store.forget_expired_claims(NOW + 4) == 250
    assert len(batches) == 2
    conn = sqlite3.connect(sqlite_store.path)
    left = sorted(row[0] for row in conn.execute("SELECT mid FROM idempotency"))
    conn.close()
    assert left == [f"{n:032x}" for n in range(250, 255)]
    assert sqlite_store.forget_expired_claims(NOW + 4) == 0


def test_the_purger_forgets_expired_claims_whatever_the_retention(
    sqlite_store: SQLiteStore,
) -> None:
    # Entries kept for ever (no retention at all): the records still expire.
    clock = [NOW]
    purger = Purger(sqlite_store, {}, 0.05, lambda: clock[0])
    expired, kept = claim_of(1, expires_ms=NOW), claim_of(2, expires_ms=NOW + 1)
    sqlite_store.claim(expired, NOW - 1)
    sqlite_store.claim(kept, NOW - 1)
    purger.start()
    try:
        conn = sqlite3.connect(sqlite_store.path)
        deadline = time.monotonic() + 5
        query = "SELECT mid FROM idempotency ORDER BY mid"
        while len(conn.execute(query).fetchall()) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [row[0] for row in conn.execute(query)] == [kept.mid]
        conn.close()
    finally:
        purger.stop()


def test_a_file_without_the_idempotency_table_gets_it(tmp_path: Path) -> None:
    # A file an earlier version made: no idempotency table, documents already stored.
    path = tmp_path / "old.sqlite3"
    SQLiteStore(path).write(None, copies("a", 1))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE idempotency")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    first = claim_of(1)
    assert store.claim(first, NOW) == first
    assert held(store, first) == first
    assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10)] == [1]


def test_sqlite_reads_wait_out_a_moment_of_sqlite_busy(sqlite_store: SQLiteStore) -> None:
    """Writers wait for the lock in _begin; reads, which SQLite lets through in WAL mode,
    see SQLITE_BUSY only when another connection holds the file exclusively (recovering
    the WAL, closing the last connection), mostly as a connection is made: they wait it
    out, up to the busy timeout, though connections have no busy handler once made."""
    sqlite_store.write(None, copies("a", 1))
    sqlite_store.close()  # its connection is made again by the read below
    other = sqlite3.connect(sqlite_store.path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA locking_mode = EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("SELECT COUNT(*) FROM chat_sync").fetchall()  # the exclusive lock, taken
    # Another connection of this process (the store's is per thread) is refused meanwhile.
    probe = sqlite3.connect(sqlite_store.path, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        probe.execute("SELECT COUNT(*) FROM chat_sync").fetchall()
    probe.close()
    release = threading.Timer(0.2, other.close)
    release.start()
    started = time.monotonic()
    assert [e.seq for e in sqlite_store.read(Kind.SYNC, "a", 0, 10)] == [1]
    assert time.monotonic() - started >= 0.15  # it waited for the lock, then read
    release.join()


def test_sqlite_drops_the_per_row_floor_trigger_of_earlier_versions(tmp_path: Path) -> None:
    path = tmp_path / "timeline.sqlite3"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as db:  # what an earlier version left in the file
        db.execute(
            "CREATE TRIGGER chat_sync_floor_guard BEFORE INSERT ON chat_sync "
            "BEGIN SELECT RAISE(ABORT, 'at or below the floor'); END"
        )
    store = SQLiteStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    assert store.write(None, copies("a", 1)) == WriteResult()  # the trigger would refuse it
    store.close()


# --- SQLite group commit: small writes of several threads in one transaction -----------------


def write_grouped(
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
    writes: list[tuple[Copies | None, Copies | None, Claim | None]],
) -> tuple[list[Any], list[int]]:
    """Force a group: while the test holds the process's writer lock, a first write leads
    a transaction of its own and waits for the lock; the `writes`, made meanwhile by other
    threads, queue behind it. Then the lock is let go. Returns each queued write's result
    (or the exception it raised), and the size of each group stored."""
    groups: list[int] = []
    group = store._group
    assert group is not None
    write_batch = group.write_batch
    monkeypatch.setattr(
        group, "write_batch", lambda batch: groups.append(len(batch)) or write_batch(batch)
    )
    results: list[Any] = [None] * len(writes)

    def write(i: int, history: Copies | None, sync: Copies | None, claim: Claim | None) -> None:
        try:
            results[i] = store.write(history, sync, claim, NOW)
        except Exception as exc:  # the test looks at it
            results[i] = exc

    def wait_for(condition: Any) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    store._connections.writer.acquire()
    leader = threading.Thread(target=store.write, args=(None, copies("lead", 1, mid="lead")))
    leader.start()
    wait_for(lambda: group.leading and not group.queued)  # it leads, waiting for the lock
    threads = [threading.Thread(target=write, args=(i, *w)) for i, w in enumerate(writes)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(group.queued) == len(writes))  # all queued behind it
    store._connections.writer.release()
    for thread in [leader, *threads]:
        thread.join(10)
    return results, groups


def test_sqlite_commits_the_writes_queued_meanwhile_in_one_transaction(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = [
        (copies(f"g{i}", 1, mid=f"m{i}"), copies(["a", "b"], [i, 10 + i], mid=f"m{i}"), claim_of(i))
        for i in (1, 2, 3)
    ]
    results, groups = write_grouped(sqlite_store, monkeypatch, writes)
    assert results == [WriteResult()] * 3
    assert groups == [1, 3]  # the leader alone, then the three together
    assert [(e.seq, e.mid) for e in sqlite_store.read(Kind.SYNC, "a", 0, 9)] == [
        (1, "m1"),
        (2, "m2"),
        (3, "m3"),
    ]
    assert [e.seq for e in sqlite_store.read(Kind.SYNC, "b", 0, 99)] == [11, 12, 13]
    assert [e.mid for i in (1, 2, 3) for e in sqlite_store.read(Kind.HISTORY, f"g{i}", 0, 9)] == [
        "m1",
        "m2",
        "m3",
    ]
    for i in (1, 2, 3):
        assert held(sqlite_store, claim_of(i)) == claim_of(i)


def test_a_write_of_a_group_that_cannot_store_all_it_holds_is_written_alone(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_store.write(None, copies("a", 2, mid="earlier"))  # a's 2 is taken
    other = claim_of(3, fingerprint="e" * 16)
    sqlite_store.claim(other, NOW)  # message 3's record: another attempt's
    sqlite_store.write(None, copies("c", 5, mid="old"))
    sqlite_store.ack("c", 5, 5)  # c's floor: 5
    writes = [
        (copies("g1", 1, mid="m1"), copies(["a", "b"], 1, mid="m1"), claim_of(1)),  # stored
        (copies("g2", 1, mid="m2"), copies(["a", "b"], 2, mid="m2"), claim_of(2)),  # a's taken
        (copies("g3", 1, mid="m3"), copies(["d"], 1, mid="m3"), claim_of(3)),  # claimed
        (None, copies(["e", "c"], 5, mid="m4"), None),  # c's at its floor
    ]
    results, groups = write_grouped(sqlite_store, monkeypatch, writes)
    assert groups == [1, 4]
    assert results == [
        WriteResult(),
        WriteResult(sync_taken=[0]),  # written alone: b's copy stored, a's reported
        WriteResult(claimed=other),  # nothing of it stored
        WriteResult(sync_taken=[1]),
    ]
    assert [(e.seq, e.mid) for e in sqlite_store.read(Kind.SYNC, "a", 0, 9)] == [
        (1, "m1"),
        (2, "earlier"),
    ]
    assert [(e.seq, e.mid) for e in sqlite_store.read(Kind.SYNC, "b", 0, 9)] == [
        (1, "m1"),
        (2, "m2"),
    ]
    assert [e.mid for e in sqlite_store.read(Kind.HISTORY, "g2", 0, 9)] == ["m2"]
    assert sqlite_store.read(Kind.HISTORY, "g3", 0, 9) == []
    assert sqlite_store.read(Kind.SYNC, "d", 0, 9) == []
    assert held(sqlite_store, claim_of(3)) == other
    assert [e.mid for e in sqlite_store.read(Kind.SYNC, "e", 0, 9)] == ["m4"]
    assert sqlite_store.read(Kind.SYNC, "c", 0, 9) == []


def test_an_error_in_a_group_fails_each_of_its_writes_and_stores_none(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert = sqlite_writing.insert

    def failing(conn: sqlite3.Connection, table: str, copies: Copies, rows: Any) -> bool:
        if copies.mid == "m2":
            raise sqlite3.OperationalError("disk I/O error")
        return insert(conn, table, copies, rows)

    monkeypatch.setattr(sqlite_writing, "insert", failing)
    writes = [
        (copies(f"g{i}", 1, mid=f"m{i}"), copies([f"u{i}"], 1, mid=f"m{i}"), claim_of(i))
        for i in (1, 2, 3)
    ]
    results, groups = write_grouped(sqlite_store, monkeypatch, writes)
    assert groups == [1, 3]
    assert all(isinstance(result, Unavailable) for result in results), results
    for i in (1, 2, 3):
        assert sqlite_store.read(Kind.HISTORY, f"g{i}", 0, 9) == []
        assert sqlite_store.read(Kind.SYNC, f"u{i}", 0, 9) == []
        assert held(sqlite_store, claim_of(i)).fingerprint == "0" * 16  # no record: the probe's
    # The store goes on: the next writes are stored.
    monkeypatch.setattr(sqlite_writing, "insert", insert)
    assert sqlite_store.write(copies("g1", 1, mid="m1"), copies(["u1"], 1, mid="m1")) == (
        WriteResult()
    )


def test_without_group_commit_each_small_write_is_a_transaction_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLiteStore(group_commit=False), what tests/bench_ab.py measures group commit against:
    writes made at the same time each take the writer lock and commit alone."""
    store = SQLiteStore(tmp_path / "timeline.sqlite3", group_commit=False)
    store.write(None, copies("a", 2, mid="earlier"))  # a's 2 is taken
    groups: list[int] = []
    monkeypatch.setattr(GroupCommit, "write_batch", lambda _, batch: groups.append(len(batch)))
    results: dict[int, Any] = {}

    def write(i: int) -> None:
        results[i] = store.write(
            copies(f"g{i}", 1, mid=f"m{i}"), copies(["a", "b"], i, mid=f"m{i}")
        )

    store._connections.writer.acquire()  # they all wait for it at once
    threads = [threading.Thread(target=write, args=(i,)) for i in (1, 2, 3)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    store._connections.writer.release()
    for thread in threads:
        thread.join(5)
    assert groups == []
    assert results == {1: WriteResult(), 2: WriteResult(sync_taken=[0]), 3: WriteResult()}
    assert [e.mid for e in store.read(Kind.SYNC, "a", 0, 9)] == ["m1", "earlier", "m3"]
    assert [e.mid for e in store.read(Kind.SYNC, "b", 0, 9)] == ["m1", "m2", "m3"]
    store.close()


def test_writes_queued_behind_a_stuck_writer_fail_fast(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store._connections, "busy_timeout_s", 0.2)
    sqlite_store._connections.writer.acquire()  # a writer of this process that does not let go
    results: list[Any] = []

    def write(i: int) -> None:
        try:
            results.append(sqlite_store.write(None, copies([f"u{i}"], 1, mid=f"m{i}")))
        except Exception as exc:  # the test looks at it
            results.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    elapsed = time.monotonic() - started
    sqlite_store._connections.writer.release()
    assert len(results) == 4
    assert all(isinstance(result, Unavailable) for result in results), results
    assert elapsed < 1.5  # the busy timeout (0.2 s) for each, not a wait for ever
    assert all(sqlite_store.read(Kind.SYNC, f"u{i}", 0, 9) == [] for i in range(4))
    assert sqlite_store.write(None, copies(["u0"], 1, mid="m0")) == WriteResult()
