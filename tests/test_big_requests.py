"""The biggest requests the limits allow: they never lock other writers out, and a retry of
one (a replay) is set-based work for the store, never work per copy.

Figures (how long, how often) are in README.md ("Big requests") and come from
tests/bench_big_requests.py; these tests assert outcomes: who failed, what is stored where,
how many statements or queries the store ran.
"""

from __future__ import annotations

import fcntl
import math
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from test_faults import Clock, msg, read_all, service, texts
from test_repairs import Counted
from test_store_contract import Parts
from timeline.errors import Unavailable
from timeline.model import Copies, Kind, Message
from timeline.settings import Settings
from timeline.store import Store, WriteResult
from timeline.store.mongo import MongoStore
from timeline.store.sqlite import SQLiteStore


def batch(n: int) -> list[Message]:
    return [msg(str(i)) for i in range(n)]


def rowids(path: Path, mid: str) -> list[int]:
    """Where the sync rows of a message lie in the table's append order."""
    conn = sqlite3.connect(path)
    try:
        found = conn.execute("SELECT rowid FROM chat_sync WHERE mid = ? ORDER BY rowid", (mid,))
        return [rowid for (rowid,) in found]
    finally:
        conn.close()


# --- the write lock: no writer fails behind the largest fan-out ------------------------------


def test_no_one_to_one_write_fails_during_the_largest_fan_out(tmp_path: Path) -> None:
    # The largest fan-out the limits allow: 10,000 members x 20 messages (200,000 copies,
    # request_documents_max), written by one store while another store of the same file (a
    # second worker) sends one-to-one messages, one after another, with the default busy
    # timeout. Raw store writes: the service's retries do not hide a busy timeout here.
    settings = Settings()
    members = settings.group_members_max
    count = settings.request_documents_max // members
    path = tmp_path / "timeline.sqlite3"
    fan_store = SQLiteStore(path, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    one_store = SQLiteStore(path, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    ids = [f"member-{i:05d}" for i in range(members)]
    messages = batch(count)
    fan_out = Copies(ids, [1] * members, messages, 1_000, "fan-out")
    failures: list[Unavailable] = []
    sent = 0
    first_sent, done = threading.Event(), threading.Event()

    def one_to_one() -> None:
        nonlocal sent
        while not done.is_set():
            seq = sent + 1
            try:
                one_store.write(
                    Copies(["x:y"], [seq], [msg("hi")], 1_000, f"one-{seq}"),
                    Copies(["x", "y"], [seq, seq], [msg("hi")], 1_000, f"one-{seq}"),
                )
                sent = seq
            except Unavailable as exc:  # the busy timeout ran out: a 503 for a client
                failures.append(exc)
            first_sent.set()
            time.sleep(0.002)  # a client's next message

    thread = threading.Thread(target=one_to_one)
    thread.start()
    try:
        assert first_sent.wait(10)
        assert fan_store.write(Copies(["g"], [1], messages, 1_000, "fan-out"), fan_out) == (
            WriteResult()
        )
    finally:
        done.set()
        thread.join()
    assert failures == []
    # The one-to-one messages went in while the fan-out was being written, between its
    # transactions (rows append in rowid order), not only before or after it.
    fan_rows = rowids(path, "fan-out")
    assert len(fan_rows) == members * count
    conn = sqlite3.connect(path)
    ones = conn.execute(
        "SELECT MIN(rowid) FROM chat_sync WHERE mid LIKE 'one-%' GROUP BY mid"
    ).fetchall()
    conn.close()
    assert len(ones) == sent
    between = [rowid for (rowid,) in ones if fan_rows[0] < rowid < fan_rows[-1]]
    assert len(between) >= 3, (sent, len(between))
    assert [e.seq for e in one_store.read(Kind.SYNC, "y", 0, 100_000)] == list(range(1, sent + 1))
    assert len(fan_store.read(Kind.SYNC, ids[-1], 0, 100)) == count
    fan_store.close()
    one_store.close()


def test_a_writer_waiting_for_the_lock_goes_in_between_two_parts(tmp_path: Path) -> None:
    # Forced: the big write holds the lock in its first part until the other writer is seen
    # waiting (it holds a shared lock on the -wait file while it waits); the other writer
    # must then go in before the big write's last part, not after all of it.
    path = tmp_path / "timeline.sqlite3"
    big = SQLiteStore(path, write_chunk_rows=4)
    small = SQLiteStore(path)
    write_part = big._parts.write
    parts = 0
    failures: list[BaseException] = []

    def waiting() -> bool:
        with open(str(path) + "-wait", "ab") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    def send() -> None:
        try:
            small.write(None, Copies(["x"], [1], [msg("hi")], 1_000, "small"))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=send)
    begin = big._connections.begin

    def first_part_waits_for_the_other(conn: sqlite3.Connection) -> None:
        begin(conn)
        if parts == 1:  # the first part holds the lock: the other writer starts, and waits
            thread.start()
            deadline = time.monotonic() + 10
            while not waiting():
                assert time.monotonic() < deadline, "the other writer never waited"
                time.sleep(0.001)

    def counted(*args: Any) -> Any:
        nonlocal parts
        parts += 1
        return write_part(*args)

    big._parts.write = counted  # type: ignore[method-assign]
    big._connections.begin = first_part_waits_for_the_other  # type: ignore[method-assign]
    sync = Copies(["a", "b", "c", "d", "e", "f"], [1] * 6, batch(2), 1_000, "big")
    assert big.write(None, sync) == WriteResult()
    thread.join()
    assert failures == []
    assert parts == 3  # a b | c d | e f
    small_row = rowids(path, "small")[0]
    big_rows = rowids(path, "big")
    assert big_rows[0] < small_row < big_rows[-4]  # before the last part's 4 rows
    big.close()
    small.close()


# --- a replay: set-based, whatever the request's size -----------------------------------------


class Traced:
    """Counts, per store call the service makes, the SQL statements SQLite ran for it (the
    service calls the store from its own thread, whose connection is traced)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner, self.backend = inner, inner.backend
        self.statements = 0
        self.calls: list[tuple[str, int]] = []  # (method, statements)
        self.parts: list[int] = []  # statements of each transaction of each write
        write_part = inner._parts.write

        def counted_part(*args: Any) -> Any:
            before = self.statements
            try:
                return write_part(*args)
            finally:
                self.parts.append(self.statements - before)

        inner._parts.write = counted_part  # type: ignore[method-assign]

    def trace(self, _: str) -> None:
        self.statements += 1

    def start(self) -> None:
        self.calls.clear()
        self.parts.clear()
        self.inner._connections.connection().set_trace_callback(self.trace)

    def stop(self) -> None:
        self.inner._connections.connection().set_trace_callback(None)

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            before = self.statements
            try:
                return real(*args, **kwargs)
            finally:
                self.calls.append((name, self.statements - before))

        return call


def test_a_replay_of_a_big_group_message_is_set_based_work(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # 1,000 members x 20 messages (20,000 copies, 5 transactions of 4,000 rows), sent with
    # a client_msg_id, then sent again: the retry after a lost reply.
    store = SQLiteStore(tmp_path / "timeline.sqlite3")
    traced = Traced(store)
    svc = service(redis_url, key_prefix, traced, Clock())
    members = [f"member-{i:04d}" for i in range(1_000)]
    messages = batch(20)
    traced.start()
    assert svc.send_group("g", members, messages, "big-1") == []
    first_parts = len(traced.parts)
    assert sum(traced.parts) > len(members) * len(messages)  # a statement per row inserted
    counted = Counted()
    traced.start()
    assert svc.send_group("g", members, messages, "big-1") == []  # the same answer
    traced.stop()
    # Every transaction of the replay found its copies taken in a few statements (the
    # insert stops at the first taken row, one query finds which timelines are taken),
    # not in a statement or a savepoint per timeline: 200 timelines a transaction here.
    assert traced.parts, traced.calls
    assert max(traced.parts) <= 14, traced.parts
    assert len(traced.parts) <= first_parts + 1  # + the history alone, found taken
    # Who holds the copies: a couple of statements per lookup, not one per 500 keys.
    owners = [statements for name, statements in traced.calls if name == "owners"]
    assert owners, traced.calls
    assert max(owners) <= 2, traced.calls
    assert len(owners) <= len([name for name, _ in traced.calls if name == "write"]) + 1
    # And nothing was stored twice, nor moved.
    assert counted("moved") == 0
    for member in (members[0], members[-1]):
        assert texts(read_all(store, Kind.SYNC, member)) == [m.document["text"] for m in messages]
    assert len(read_all(store, Kind.HISTORY, "g")) == len(messages)


def test_owners_of_a_replay_on_mongo_take_a_query_per_256_timelines_whatever_the_batch(
    mongo_store: MongoStore,
) -> None:
    # The keys a replay asks about: each timeline its own run of sequences (no two alike).
    finds: Counter[str] = Counter()
    collection = mongo_store._collections[Kind.SYNC]

    class Finds:
        def find(self, *args: Any, **kwargs: Any) -> Any:
            finds["find"] += 1
            return collection.find(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(collection, name)

    members = [f"m{i}" for i in range(260)]
    stored = members[:: len(members) // 10]  # mongomock's unique inserts are quadratic
    for count in (1, 4):
        firsts = [1 + 10 * i + 5 * (count > 1) for i in range(len(members))]
        mid = f"batch-{count}"
        start = dict(zip(members, firsts, strict=True))
        mongo_store.write(None, Copies(stored, [start[m] for m in stored], batch(count), 1, mid))
        keys = [(m, start[m] + j) for m in members for j in range(count)]
        mongo_store._collections[Kind.SYNC] = Finds()  # type: ignore[assignment]
        finds.clear()
        found = mongo_store.owners(Kind.SYNC, keys)
        mongo_store._collections[Kind.SYNC] = collection
        assert finds["find"] == math.ceil(len(members) / 256), count
        assert found == {(m, seq): mid for m, seq in keys if m in stored}


# --- through the service, in parts, on both stores -------------------------------------------


def test_a_replay_of_a_write_in_parts_stores_nothing_twice(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    store.write_chunk_rows = 12  # type: ignore[attr-defined]
    parts = Parts(store)
    svc = service(redis_url, key_prefix, store, Clock())
    members = [f"m{i:02d}" for i in range(30)]
    messages = batch(4)
    assert svc.send_group("g", members, messages, "parts-1") == []
    assert parts.started >= 10  # 3 timelines a part
    counted = Counted()
    assert svc.send_group("g", members, messages, "parts-1") == []
    assert counted("moved") == 0
    for member in members:
        entries = read_all(store, Kind.SYNC, member)
        assert ([e.seq for e in entries], texts(entries)) == ([1, 2, 3, 4], ["0", "1", "2", "3"])
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("with_id", [True, False])
def test_a_write_failing_between_its_parts_is_finished_by_the_service(
    redis_url: str, key_prefix: str, store: Store, with_id: bool
) -> None:
    # The store fails after the history copies and the first part are stored
    # (PartialWrite): the service writes again, finds the first part taken by its own mid,
    # and stores the rest where it belongs. With or without a client_msg_id.
    store.write_chunk_rows = 8  # type: ignore[attr-defined]
    parts = Parts(store, fail=2)
    svc = service(redis_url, key_prefix, store, Clock(), retry_budget_ms=0)
    members = [f"m{i:02d}" for i in range(10)]
    counted = Counted()
    assert svc.send_group("g", members, batch(4), "fail-1" if with_id else None) == []
    assert parts.injected == 1
    assert counted("moved") == 0
    for member in members:
        entries = read_all(store, Kind.SYNC, member)
        assert ([e.seq for e in entries], texts(entries)) == ([1, 2, 3, 4], ["0", "1", "2", "3"])
    assert texts(read_all(store, Kind.HISTORY, "g")) == ["0", "1", "2", "3"]
