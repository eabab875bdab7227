"""The SQLite store: the Store protocol's calls, each a query or a few transactions on the
file that schema.py makes, through the connections of connections.py; small writes go
through group.py's group commit, every part of a write through writing.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

from timeline.errors import PartialWrite, Unavailable
from timeline.metrics import EXPIRED_REMOVED, dependency_failed
from timeline.model import HOLE_MID, Conversation, Copies, Entry, Kind
from timeline.store import (
    COLLECTIONS,
    Claim,
    ConversationState,
    Cursor,
    Device,
    Gap,
    Page,
    WriteResult,
    split,
)
from timeline.store.sqlite import schema
from timeline.store.sqlite.connections import Connections, unavailable
from timeline.store.sqlite.group import GroupCommit
from timeline.store.sqlite.schema import (
    CLAIMED,
    CONVERSATION_OF,
    CONVERSATION_PAGE,
    DEVICE_ACK,
    DEVICE_SEEN,
    DEVICES_LOWEST,
    DEVICES_OF,
    ENTRY,
    FORGET_EXPIRED,
    RAISE_FLOOR,
    RAISE_READ,
    RANGES_JOIN,
    RECLAIM,
    SYNC,
)
from timeline.store.sqlite.writing import (
    Part,
    PartWriter,
    claim_row,
    json_of,
    lasts_of,
    lasts_text,
    record_claim,
)

_CHUNK = 500  # rows per statement in lookups: well under SQLite's 32,766 variables
_PURGE_BATCH = 500  # rows per purge transaction: the write lock is never held for long
# Records per purge transaction: a fan-out's is 70 KB, so at most some 7 MB freed at once.
_FORGET_BATCH = 100

# A big write (a fan-out of 10,000 members x 20 messages is 200,000 rows) is stored in
# several transactions, none holding the write lock for more than a small part of the busy
# timeout another writer waits: at most this many rows, and this many bytes of messages.
# Measured on a loaded 2-core machine (tests/bench_big_requests.py; README, "Big requests"):
# 4,000 rows of small messages hold the lock 20-50 ms (median), 1 MiB of 6.5 KB messages
# 5-15 ms. A timeline's copies of one batch are never cut (a batch that alone is more, up to
# the 4 MiB a body may hold, is one transaction of its own).
WRITE_CHUNK_ROWS = 4_000
WRITE_CHUNK_BYTES = 1 << 20


class SQLiteStore:
    """One connection per thread and process; WAL so readers never wait for the writer."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        busy_timeout_ms: int = 1000,
        retention_ms: dict[Kind, int] | None = None,
        write_chunk_rows: int = WRITE_CHUNK_ROWS,
        write_chunk_bytes: int = WRITE_CHUNK_BYTES,
        group_commit: bool = True,
    ) -> None:
        self.path = Path(path)
        self.write_chunk_rows = write_chunk_rows
        self.write_chunk_bytes = write_chunk_bytes
        self._retention = {kind: (retention_ms or {}).get(kind, 0) for kind in Kind}
        self._connections = Connections(self.path, busy_timeout_ms / 1000)
        self._parts = PartWriter(self._connections)
        # None: every small write is a transaction of its own (what grouping is measured
        # against: tests/bench_ab.py).
        self._group = GroupCommit(self._connections, self._parts) if group_commit else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            schema.create(self._connections.connection(), busy_timeout_ms)
        except (sqlite3.Error, OSError) as exc:
            dependency_failed("store")
            raise Unavailable(f"sqlite store at {self.path} cannot be opened") from exc

    # --- writing --------------------------------------------------------------------------

    def write(
        self,
        history: Copies | None,
        sync: Copies | None,
        claim: Claim | None = None,
        now_ms: int = 0,
    ) -> WriteResult:
        """One transaction per part of the sync copies (see split: whole timelines, at most
        a chunk's rows and bytes each), the history copies in the first: a timeline's batch
        is stored together or reported taken together. A write of one part is committed
        with those of other threads queued meanwhile (group commit, unless it is off).

        A failure once the first transaction committed is PartialWrite when it held the
        history copies (Unavailable otherwise): the parts before it are stored, and writing
        the same copies again finds them taken by their own mid and stores the rest.
        """
        parts: list[tuple[int, Copies | None]] = [(0, None)]
        if sync is not None:
            parts = list(split(sync, self.write_chunk_rows, self.write_chunk_bytes))
        taken: list[int] = []
        committed = 0
        try:
            for offset, copies in parts:
                if committed:
                    self._connections.let_waiting_writers_in()
                first = history if not committed else None
                part = Part(first, copies, claim if not committed else None, now_ms)
                if len(parts) == 1 and self._group is not None:
                    result = self._group.write(part)
                else:
                    result = self._write_alone(part)
                if result.history_taken or result.claimed is not None:
                    break  # the first part: nothing stored, all or none
                taken.extend(offset + position for position in result.sync_taken)
                committed += 1
            else:
                result = WriteResult(sync_taken=taken)
        except sqlite3.Error as exc:
            error = unavailable("write", exc)
            if committed and history is not None:
                raise PartialWrite(
                    f"store (sqlite) failed after {committed} of {len(parts)} transactions"
                ) from exc
            raise error from exc
        self._connections.checkpoints.start()
        return result

    def _write_alone(self, part: Part) -> WriteResult:
        """A part in a transaction of its own, under the writer lock; rolled back on any
        error."""
        conn = self._connections.connection()
        with self._connections.writing():
            try:
                return self._parts.write(conn, part)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def seal(
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        """In transactions of at most a chunk's rows each (placeholders are independent of
        each other); what a transaction finds stored is found in one statement."""
        table = COLLECTIONS[kind]
        insert = (
            f"INSERT OR IGNORE INTO {table} (id, seq, message, created_at, mid) "
            "VALUES (?, ?, '{}', ?, ?)"
        )
        taken: list[tuple[str, int]] = []
        for start in range(0, len(keys), self.write_chunk_rows):
            if start:
                self._connections.let_waiting_writers_in()
            chunk = keys[start : start + self.write_chunk_rows]
            with self._connections.transaction() as conn:
                stored = _stored(conn, table, _ranges(chunk))
                conn.executemany(
                    insert,
                    [
                        (id_, seq, created_at_ms, HOLE_MID)
                        for id_, seq in chunk
                        if (id_, seq) not in stored
                    ],
                )
            taken.extend(key for key in chunk if key in stored)
        return taken

    def unwrite(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        """One statement per transaction, each of whole ranges of at most a chunk's rows
        (a timeline's range is never split)."""
        table = COLLECTIONS[kind]
        delete = (
            f"DELETE FROM {table} WHERE rowid IN (SELECT t.rowid FROM "
            f"{RANGES_JOIN.format(table=table)} WHERE t.mid = ?)"
        )
        for n, ranges in enumerate(_runs(_ranges(keys), self.write_chunk_rows)):
            if n:
                self._connections.let_waiting_writers_in()
            with self._connections.transaction() as conn:
                conn.execute(delete, (json_of(ranges), mid))

    def ack(self, member: str, seq: int, floor: int) -> None:
        with self._connections.transaction() as conn:
            if floor > 0:
                conn.execute(RAISE_FLOOR.format(table=SYNC), (member, floor))
            conn.execute(f"DELETE FROM {SYNC} WHERE id = ? AND seq <= ?", (member, seq))

    def raise_floor(self, kind: Kind, timeline_id: str, seq: int) -> None:
        with self._connections.transaction() as conn:
            conn.execute(RAISE_FLOOR.format(table=COLLECTIONS[kind]), (timeline_id, seq))

    def gap(self, kind: Kind, timeline_id: str, low: int, high: int, not_before_ms: int) -> Gap:
        # One statement: both counts come from the same snapshot.
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(mid = ? OR created_at < ?), 0) "
            f"FROM {COLLECTIONS[kind]} WHERE id = ? AND seq >= ? AND seq < ?"
        )
        [(present, hidden)] = self._connections.query(
            sql, (HOLE_MID, not_before_ms, timeline_id, low, high)
        )
        return Gap(int(present), int(hidden))

    # --- reading --------------------------------------------------------------------------

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The keys as ranges of consecutive sequences (a replay's are one per timeline),
        looked up together: see _stored."""
        if not keys:
            return {}
        ranges = _ranges(keys)
        return self._connections.read(lambda conn: _stored(conn, COLLECTIONS[kind], ranges))

    def max_seqs(self, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        highest: dict[str, int] = {}
        table = COLLECTIONS[kind]
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            values = ", ".join("(?)" for _ in chunk)
            # A correlated MAX per id is one index probe each; GROUP BY would scan every row.
            sql = (
                f"SELECT v.column1, (SELECT MAX(seq) FROM {table} WHERE id = v.column1), "
                f"(SELECT seq FROM {table}_floor WHERE id = v.column1) "
                f"FROM (VALUES {values}) AS v"
            )
            for id_, seq, floor in self._connections.query(sql, list(chunk)):
                highest[id_] = max(seq or 0, floor or 0)
        return highest

    def read(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int = 0,
        max_bytes: int = 0,
    ) -> list[Entry]:
        sql = (
            f"SELECT {ENTRY} FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq > ? AND mid != ? AND created_at >= ? ORDER BY seq LIMIT ?"
        )
        params = (timeline_id, after, HOLE_MID, not_before_ms, limit)
        if not max_bytes:
            return [Entry(*row) for row in self._connections.query(sql, params)]
        enough = _Bytes(max_bytes, 1)
        return [Entry(*row) for row in self._connections.query_until(sql, params, enough)]

    def read_backward(
        self, kind: Kind, timeline_id: str, before: int, limit: int, not_before_ms: int
    ) -> list[Entry]:
        sql = (
            f"SELECT {ENTRY} FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq < ? AND created_at >= ? AND mid != ? ORDER BY seq DESC LIMIT ?"
        )
        upper = before if before > 0 else 2**63 - 1
        params = (timeline_id, upper, not_before_ms, HOLE_MID, limit)
        return [Entry(*row) for row in self._connections.query(sql, params)]

    def page(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int,
        max_bytes: int = 0,
    ) -> Page:
        table = COLLECTIONS[kind]
        # One statement for the three: the lowest entry (0), the floor (1), the page (2).
        sql = (
            f"SELECT * FROM (SELECT 0, {ENTRY} FROM {table} "
            "WHERE id = ? AND created_at >= ? AND mid != ? ORDER BY seq LIMIT 1) "
            f"UNION ALL SELECT 1, seq, NULL, NULL, NULL, NULL, NULL, NULL FROM {table}_floor "
            "WHERE id = ? "
            f"UNION ALL SELECT * FROM (SELECT 2, {ENTRY} FROM {table} "
            "WHERE id = ? AND seq > ? AND mid != ? AND created_at >= ? ORDER BY seq LIMIT ?)"
        )
        params = (
            *(timeline_id, not_before_ms, HOLE_MID, timeline_id),
            *(timeline_id, after, HOLE_MID, not_before_ms, limit),
        )
        lowest, floor, entries = None, 0, []
        rows = (
            self._connections.query_until(sql, params, _Bytes(max_bytes, 2, part=2))
            if max_bytes
            else self._connections.query(sql, params)
        )
        for part, *row in rows:
            if part == 2:
                entries.append(Entry(*row))
            elif part == 0:
                lowest = Entry(*row)
            else:
                floor = row[0]
        return Page(lowest, floor, entries)

    # --- retention ------------------------------------------------------------------------

    def purge(self, kind: Kind, before_ms: int) -> int:
        """Remove entries created before `before_ms`, in small transactions; raise floors."""
        table = COLLECTIONS[kind]
        boundary = self._expired_up_to(table, before_ms)
        removed = 0
        while boundary is not None:
            if removed:
                self._connections.let_waiting_writers_in()
            with self._connections.transaction() as conn:
                # created_at is checked too: a retried write can land later in rowid order
                # than its creation time says, and must not go before it has expired.
                batch = conn.execute(
                    f"SELECT rowid, id, seq FROM {table} WHERE rowid <= ? AND created_at < ? "
                    "ORDER BY rowid LIMIT ?",
                    (boundary, before_ms, _PURGE_BATCH),
                ).fetchall()
                highest: dict[str, int] = {}
                for _, id_, seq in batch:
                    highest[id_] = max(seq, highest.get(id_, 0))
                conn.executemany(RAISE_FLOOR.format(table=table), list(highest.items()))
                conn.executemany(
                    f"DELETE FROM {table} WHERE rowid = ?", [(row[0],) for row in batch]
                )
            removed += len(batch)
            if len(batch) < _PURGE_BATCH:
                break
        if removed:
            EXPIRED_REMOVED.labels(kind.value).inc(removed)
        return removed

    def forget_expired_claims(self, now_ms: int) -> int:
        """Remove expired idempotency records, in transactions of at most _FORGET_BATCH
        records, letting waiting writers in between; found by the index on expires_ms. Not
        counted in EXPIRED_REMOVED (entries only)."""
        removed = 0
        while True:
            if removed:
                self._connections.let_waiting_writers_in()
            with self._connections.transaction() as conn:
                count = conn.execute(FORGET_EXPIRED, (now_ms, _FORGET_BATCH)).rowcount
            removed += count
            if count < _FORGET_BATCH:
                return removed

    def _expired_up_to(self, table: str, before_ms: int) -> int | None:
        """The highest rowid created before `before_ms`, by binary search over rowids (rows
        append in creation order); None when nothing has expired."""
        first = self._connections.query(
            f"SELECT rowid, created_at FROM {table} ORDER BY rowid LIMIT 1", ()
        )
        if not first or first[0][1] >= before_ms:
            return None
        [(last,)] = self._connections.query(f"SELECT MAX(rowid) FROM {table}", ())
        low, high = int(first[0][0]), int(last or first[0][0])  # created_at(low) < before_ms
        probe = f"SELECT rowid, created_at FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1"
        while low < high:
            middle = (low + high + 1) // 2
            found = self._connections.query(probe, (middle,))
            if found and found[0][1] < before_ms:
                low = int(found[0][0])
            else:
                high = middle - 1  # none from middle on (deleted meanwhile), or not expired
        return low

    def claim_purge(self, now_ms: int, period_ms: int) -> bool:
        with self._connections.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS purge_claim (name TEXT PRIMARY KEY, until INTEGER)"
            )
            conn.execute("INSERT OR IGNORE INTO purge_claim VALUES ('purge', 0)")
            claimed = conn.execute(
                "UPDATE purge_claim SET until = ? WHERE name = 'purge' AND until <= ?",
                (now_ms + period_ms * 9 // 10, now_ms),
            ).rowcount
        return claimed == 1

    # --- idempotency ----------------------------------------------------------------------

    def claim(self, claim: Claim, now_ms: int) -> Claim:
        """One write transaction (under the writer lock, see Connections.begin): the upsert
        stores the claim unless an unexpired record is there; only when it did not is the
        record read back (a retry's path), in the same transaction."""
        record = claim_row(claim)  # built before taking the lock
        with self._connections.transaction() as conn:
            return record_claim(conn, record, now_ms) or claim

    def reclaim(self, expected: Claim, lasts: tuple[int, ...]) -> Claim | None:
        """One write transaction: the conditional UPDATE, then the record read back."""
        new, old = lasts_text(lasts), lasts_text(expected.lasts)
        with self._connections.transaction() as conn:
            conn.execute(RECLAIM, (new, expected.mid, expected.fingerprint, old))
            found = conn.execute(CLAIMED, (expected.mid,)).fetchone()
        if found is None:
            return None
        fingerprint, text, allocated_ms, expires_ms = found
        return Claim(expected.mid, fingerprint, lasts_of(text), allocated_ms, expires_ms)

    # --- conversations, read positions, devices -------------------------------------------

    def conversations(
        self, member: str, limit: int, before: Cursor | None
    ) -> list[ConversationState]:
        below = before if before is not None else Cursor(2**63 - 1, "")
        rows = self._connections.query(
            CONVERSATION_PAGE, (member, below.activity_ms, below.conversation, limit)
        )
        return [_state(row) for row in rows]

    def mark_read(
        self, member: str, kind: Conversation, conversation: str, peer: str, seq: int
    ) -> ConversationState:
        with self._connections.transaction() as conn:
            conn.execute(RAISE_READ, (member, conversation, kind.value, peer, seq, 0))
            row = conn.execute(CONVERSATION_OF, (member, conversation)).fetchone()
        return _state(row, kind, conversation, peer)

    def device_seen(self, member: str, device: str, now_ms: int) -> None:
        with self._connections.transaction() as conn:
            conn.execute(DEVICE_SEEN, (member, device, now_ms))

    def device_ack(self, member: str, device: str, seq: int, now_ms: int, idle_ms: int) -> int:
        with self._connections.transaction() as conn:
            conn.execute(DEVICE_ACK, (member, device, seq, now_ms))
            (lowest,) = conn.execute(DEVICES_LOWEST, (member, now_ms - idle_ms)).fetchone()
        return int(lowest)

    def devices(self, member: str) -> list[Device]:
        return [Device(*row) for row in self._connections.query(DEVICES_OF, (member,))]

    def prepare(self) -> None:
        """Nothing to wait for: the schema is made when the store opens."""

    def readiness(self) -> str:
        return "ready"

    def problem(self) -> str:
        return ""

    def ping(self) -> None:
        self._connections.query("SELECT 1", ())

    def close(self) -> None:
        self._connections.close()


def _state(
    row: Any, kind: Conversation | None = None, conversation: str = "", peer: str = ""
) -> ConversationState:
    """A row of schema._STATE as the member's view of the conversation. The conversation's
    columns are NULL for a read position in a conversation that holds no message yet."""
    found_kind, found, found_peer, latest, read, message, created_at, mid, holes, active = row
    latest = latest or 0
    read = min(read or 0, latest)
    last = Entry(latest, message, created_at, mid) if latest and message is not None else None
    return ConversationState(
        kind=Conversation(found_kind) if found_kind else kind or Conversation.GROUP,
        conversation=found or conversation,
        peer=found_peer or peer,
        latest=latest,
        read=read,
        unread=max(0, latest - read - (holes or 0)),
        last=last,
        activity_ms=active or 0,
    )


def _stored(
    conn: sqlite3.Connection, table: str, ranges: list[tuple[str, int, int]]
) -> dict[tuple[str, int], str]:
    """The mid of every document stored in these (id, first, last) ranges.

    One statement gives, per range, how many documents it holds and the lowest and
    highest mid among them, each range an index range scan: a range that is full and
    of one mid (a replay finding its own copies) needs no row of its own. Only the
    others' documents are read one by one, in a second statement.
    """
    found: dict[tuple[str, int], str] = {}
    if not ranges:
        return found
    join = RANGES_JOIN.format(table=table)
    summary = f"SELECT r.key, COUNT(*), MIN(t.mid), MAX(t.mid) FROM {join} GROUP BY r.key"
    mixed: list[tuple[str, int, int]] = []
    for index, held, low, high in conn.execute(summary, (json_of(ranges),)):
        id_, first, last = ranges[index]
        if held == last - first + 1 and low == high:
            found.update(zip(zip(repeat(id_), range(first, last + 1)), repeat(low)))
        else:
            mixed.append(ranges[index])
    if mixed:
        documents = f"SELECT t.id, t.seq, t.mid FROM {join}"
        for id_, seq, mid in conn.execute(documents, (json_of(mixed),)):
            found[(id_, seq)] = mid
    return found


def _ranges(keys: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """The keys as (id, first, last) runs of consecutive sequences of one timeline, in the
    order given: exactly the keys, however they come (unordered ones make more runs)."""
    ranges: list[tuple[str, int, int]] = []
    if not keys:
        return ranges
    id_, first = keys[0]
    last = first
    for key, seq in keys[1:]:
        if key == id_ and seq == last + 1:
            last = seq
        else:
            ranges.append((id_, first, last))
            id_, first, last = key, seq, seq
    ranges.append((id_, first, last))
    return ranges


def _runs(ranges: list[tuple[str, int, int]], rows: int) -> Iterator[list[tuple[str, int, int]]]:
    """Whole ranges, grouped so that each group covers at most `rows` sequences (a range
    longer than that alone)."""
    group: list[tuple[str, int, int]] = []
    size = 0
    for one in ranges:
        length = one[2] - one[1] + 1
        if group and size + length > rows:
            yield group
            group, size = [], 0
        group.append(one)
        size += length
    if group:
        yield group


class _Bytes:
    """Whether the rows so far carry more than `limit` bytes of messages (the message at
    `column`; with `part`, only the rows whose first column is it count)."""

    __slots__ = ("column", "left", "part")

    def __init__(self, limit: int, column: int, part: int | None = None) -> None:
        self.left, self.column, self.part = limit, column, part

    def __call__(self, row: Any) -> bool:
        if self.part is not None and row[0] != self.part:
            return False
        self.left -= len(row[self.column])
        return self.left < 0
