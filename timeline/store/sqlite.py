"""The SQLite store: the embedded default, a real database behind the same contract as MongoDB."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from timeline.errors import Unavailable
from timeline.metrics import EXPIRED_REMOVED, dependency_failed
from timeline.model import HOLE_MID, Copies, Entry, Kind
from timeline.store import COLLECTIONS, Gap, Page, WriteResult

log = logging.getLogger(__name__)

# A rowid table with a unique (id, seq) index. Rows append in rowid order, which is also
# the order of their creation time: the purge finds the expired ones by a binary search on
# rowid, so no index on created_at has to be kept up on every insert (it cost a 10,000-copy
# fan-out about 30% more). Every scan of a timeline is served by the unique index.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    mid TEXT NOT NULL DEFAULT '',
    UNIQUE (id, seq)
)
"""
# What ack and purge removed, per timeline: the highest sequence the table no longer holds,
# so that counters Redis lost still continue above it.
_FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table}_floor (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID
"""
# Nothing is written at or below a timeline's floor (what ack and purge removed): a counter
# that lags behind (a Redis replica promoted before it caught up) would otherwise put a
# message where no reader looks any more. The write sees a taken key and moves above.
_FLOOR_GUARD = """
CREATE TRIGGER IF NOT EXISTS {table}_floor_guard BEFORE INSERT ON {table}
WHEN NEW.mid != '~hole' AND NEW.seq <= (SELECT seq FROM {table}_floor WHERE id = NEW.id)
BEGIN SELECT RAISE(ABORT, 'at or below the floor'); END
"""
_RAISE_FLOOR = """
INSERT INTO {table}_floor (id, seq) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET seq = MAX(seq, excluded.seq)
"""
_COLUMNS = "(id, seq, message, created_at, mid)"
_INSERT = {
    table: f"INSERT INTO {table} {_COLUMNS} VALUES (?, ?, ?, ?, ?)"
    for table in COLLECTIONS.values()
}

_CHUNK = 500  # rows per statement in lookups: well under SQLite's 32,766 variables
_PURGE_BATCH = 500  # rows per purge transaction: the write lock is never held for long

_HISTORY = COLLECTIONS[Kind.HISTORY]
_SYNC = COLLECTIONS[Kind.SYNC]


class _HistoryTaken(Exception):
    """The history key was taken while the write started over (the rare path)."""


class _Checkpointer:
    """Moves the WAL into the database every second, in a thread of its own.

    SQLite otherwise checkpoints inside the commit that crosses 1,000 pages: a 10,000-row
    fan-out paid about 40 ms for it (an fsync). Request connections keep a high threshold
    as a backstop, should this thread fall behind.
    """

    def __init__(self, path: Path, period_s: float = 1.0) -> None:
        self._path = path
        self._period_s = period_s
        self._pid = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()  # after a fork the thread is gone: start another
            threading.Thread(target=self._run, name="timeline-checkpoint", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=1.0, isolation_level=None)
        try:
            while not self._stopping.wait(self._period_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy now: next time
                    log.debug("sqlite checkpoint skipped: %s", exc)
        finally:
            conn.close()


class SQLiteStore:
    """One connection per thread and process; WAL so readers never wait for the writer."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        busy_timeout_ms: int = 1000,
        retention_ms: dict[Kind, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout_ms / 1000
        self._local = threading.local()
        self._retention = {kind: (retention_ms or {}).get(kind, 0) for kind in Kind}
        self._checkpoints = _Checkpointer(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connection()
            conn.execute("PRAGMA journal_mode=WAL")
            for table in COLLECTIONS.values():
                self._migrate(conn, table)
                conn.execute(_SCHEMA.format(table=table))
                conn.execute(_FLOOR_SCHEMA.format(table=table))
                conn.execute(_FLOOR_GUARD.format(table=table))
        except sqlite3.Error as exc:
            dependency_failed("store")
            raise Unavailable(f"sqlite store at {self.path} cannot be opened") from exc

    @staticmethod
    def _migrate(conn: sqlite3.Connection, table: str) -> None:
        """Bring a file an earlier version made (WITHOUT ROWID, no mid) to the schema."""
        found = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        if found is None or "WITHOUT ROWID" not in found[0].upper():
            return
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        mid = "mid" if "mid" in columns else "''"
        log.warning("migrating sqlite table %s to the current schema", table)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
        conn.execute(_SCHEMA.format(table=table))
        conn.execute(
            f"INSERT INTO {table} {_COLUMNS} "
            f"SELECT id, seq, message, created_at, {mid} FROM {table}_old ORDER BY created_at"
        )
        conn.execute(f"DROP TABLE {table}_old")
        conn.execute(f"DROP INDEX IF EXISTS {table}_created")
        conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork (gunicorn) nor, unlocked, a thread.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # explicit BEGIN/COMMIT below
                check_same_thread=False,
            )
            conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: no corruption, ever
            conn.execute("PRAGMA wal_autocheckpoint=10000")  # see _Checkpointer
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB of pages per connection
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any SQLite error rolls back and becomes Unavailable.

        IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
        """
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("sqlite write failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc
        except BaseException:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.warning("sqlite read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc

    # --- writing --------------------------------------------------------------------------

    def write(self, history: Copies | None, sync: Copies | None) -> WriteResult:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            if history is not None and not self._insert_history(conn, history):
                conn.execute("ROLLBACK")
                return WriteResult(history_taken=True)  # nothing stored: all or none
            taken: list[int] = []
            if sync is not None:
                try:
                    conn.executemany(_INSERT[_SYNC], sync.rows())
                except sqlite3.IntegrityError:
                    try:
                        taken = self._write_sync_slowly(conn, history, sync)
                    except _HistoryTaken:
                        conn.execute("ROLLBACK")
                        return WriteResult(history_taken=True)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("sqlite write failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc
        self._checkpoints.start()
        return WriteResult(sync_taken=taken)

    @staticmethod
    def _insert_history(conn: sqlite3.Connection, history: Copies) -> bool:
        try:
            conn.executemany(_INSERT[_HISTORY], history.rows())
        except sqlite3.IntegrityError:
            return False
        return True

    def _write_sync_slowly(
        self, conn: sqlite3.Connection, history: Copies | None, sync: Copies
    ) -> list[int]:
        """The rare path: a sync key was taken. Start the transaction over (no savepoint on
        the fast path: it would cost every write), then write timeline by timeline, each in a
        savepoint: a timeline whose batch hits a taken key keeps none of it, so that its
        messages move together and no reader ever sees part of them twice."""
        conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        if history is not None and not self._insert_history(conn, history):
            raise _HistoryTaken  # taken between the two transactions
        insert = _INSERT[_SYNC]
        per_timeline = len(sync.messages)
        rows = list(sync.rows())
        taken: list[int] = []
        for start in range(0, len(rows), per_timeline):
            conn.execute("SAVEPOINT timeline_rows")
            try:
                conn.executemany(insert, rows[start : start + per_timeline])
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK TO timeline_rows")
                taken.extend(range(start, start + per_timeline))
            conn.execute("RELEASE timeline_rows")
        return taken

    def seal(
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        insert = f"INSERT OR IGNORE INTO {COLLECTIONS[kind]} {_COLUMNS} VALUES (?, ?, '{{}}', ?, ?)"
        taken = []
        with self._transaction() as conn:
            for id_, seq in keys:
                if conn.execute(insert, (id_, seq, created_at_ms, HOLE_MID)).rowcount != 1:
                    taken.append((id_, seq))
        return taken

    def unwrite(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        delete = f"DELETE FROM {COLLECTIONS[kind]} WHERE id = ? AND seq = ? AND mid = ?"
        with self._transaction() as conn:
            conn.executemany(delete, [(id_, seq, mid) for id_, seq in keys])

    def ack(self, member: str, seq: int, floor: int) -> None:
        with self._transaction() as conn:
            if floor > 0:
                conn.execute(_RAISE_FLOOR.format(table=_SYNC), (member, floor))
            conn.execute(f"DELETE FROM {_SYNC} WHERE id = ? AND seq <= ?", (member, seq))

    def raise_floor(self, kind: Kind, timeline_id: str, seq: int) -> None:
        with self._transaction() as conn:
            conn.execute(_RAISE_FLOOR.format(table=COLLECTIONS[kind]), (timeline_id, seq))

    def gap(self, kind: Kind, timeline_id: str, low: int, high: int, not_before_ms: int) -> Gap:
        # One statement: both counts come from the same snapshot.
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(mid = ? OR created_at < ?), 0) "
            f"FROM {COLLECTIONS[kind]} WHERE id = ? AND seq >= ? AND seq < ?"
        )
        [(present, hidden)] = self._query(sql, (HOLE_MID, not_before_ms, timeline_id, low, high))
        return Gap(int(present), int(hidden))

    # --- reading --------------------------------------------------------------------------

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        found: dict[tuple[str, int], str] = {}
        table = COLLECTIONS[kind]
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            values = ", ".join("(?, ?)" for _ in chunk)
            sql = f"SELECT id, seq, mid FROM {table} WHERE (id, seq) IN (VALUES {values})"
            params = [value for key in chunk for value in key]
            for id_, seq, mid in self._query(sql, params):
                found[(id_, seq)] = mid
        return found

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
            for id_, seq, floor in self._query(sql, list(chunk)):
                highest[id_] = max(seq or 0, floor or 0)
        return highest

    def read(
        self, kind: Kind, timeline_id: str, after: int, limit: int, not_before_ms: int = 0
    ) -> list[Entry]:
        sql = (
            f"SELECT seq, message, created_at, mid FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq > ? AND mid != ? AND created_at >= ? ORDER BY seq LIMIT ?"
        )
        params = (timeline_id, after, HOLE_MID, not_before_ms, limit)
        return [Entry(*row) for row in self._query(sql, params)]

    def read_backward(
        self, kind: Kind, timeline_id: str, before: int, limit: int, not_before_ms: int
    ) -> list[Entry]:
        sql = (
            f"SELECT seq, message, created_at, mid FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq < ? AND created_at >= ? AND mid != ? ORDER BY seq DESC LIMIT ?"
        )
        upper = before if before > 0 else 2**63 - 1
        params = (timeline_id, upper, not_before_ms, HOLE_MID, limit)
        return [Entry(*row) for row in self._query(sql, params)]

    def page(
        self, kind: Kind, timeline_id: str, after: int, limit: int, not_before_ms: int
    ) -> Page:
        table = COLLECTIONS[kind]
        # One statement for the three: the lowest entry (0), the floor (1), the page (2).
        sql = (
            f"SELECT * FROM (SELECT 0, seq, message, created_at, mid FROM {table} "
            "WHERE id = ? AND created_at >= ? AND mid != ? ORDER BY seq LIMIT 1) "
            f"UNION ALL SELECT 1, seq, NULL, NULL, NULL FROM {table}_floor WHERE id = ? "
            f"UNION ALL SELECT * FROM (SELECT 2, seq, message, created_at, mid FROM {table} "
            "WHERE id = ? AND seq > ? AND mid != ? AND created_at >= ? ORDER BY seq LIMIT ?)"
        )
        params = (
            *(timeline_id, not_before_ms, HOLE_MID, timeline_id),
            *(timeline_id, after, HOLE_MID, not_before_ms, limit),
        )
        lowest, floor, entries = None, 0, []
        for part, seq, message, created_at, mid in self._query(sql, params):
            if part == 2:
                entries.append(Entry(seq, message, created_at, mid))
            elif part == 0:
                lowest = Entry(seq, message, created_at, mid)
            else:
                floor = seq
        return Page(lowest, floor, entries)

    # --- retention ------------------------------------------------------------------------

    def purge(self, kind: Kind, before_ms: int) -> int:
        """Remove entries created before `before_ms`, in small transactions; raise floors."""
        table = COLLECTIONS[kind]
        boundary = self._expired_up_to(table, before_ms)
        removed = 0
        while boundary is not None:
            with self._transaction() as conn:
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
                conn.executemany(_RAISE_FLOOR.format(table=table), list(highest.items()))
                conn.executemany(
                    f"DELETE FROM {table} WHERE rowid = ?", [(row[0],) for row in batch]
                )
            removed += len(batch)
            if len(batch) < _PURGE_BATCH:
                break
        if removed:
            EXPIRED_REMOVED.labels(kind.value).inc(removed)
        return removed

    def _expired_up_to(self, table: str, before_ms: int) -> int | None:
        """The highest rowid created before `before_ms`, by binary search over rowids (rows
        append in creation order); None when nothing has expired."""
        first = self._query(f"SELECT rowid, created_at FROM {table} ORDER BY rowid LIMIT 1", ())
        if not first or first[0][1] >= before_ms:
            return None
        [(last,)] = self._query(f"SELECT MAX(rowid) FROM {table}", ())
        low, high = int(first[0][0]), int(last or first[0][0])  # created_at(low) < before_ms
        probe = f"SELECT rowid, created_at FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1"
        while low < high:
            middle = (low + high + 1) // 2
            found = self._query(probe, (middle,))
            if found and found[0][1] < before_ms:
                low = int(found[0][0])
            else:
                high = middle - 1  # none from middle on (deleted meanwhile), or not expired
        return low

    def claim_purge(self, now_ms: int, period_ms: int) -> bool:
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS purge_claim (name TEXT PRIMARY KEY, until INTEGER)"
            )
            conn.execute("INSERT OR IGNORE INTO purge_claim VALUES ('purge', 0)")
            claimed = conn.execute(
                "UPDATE purge_claim SET until = ? WHERE name = 'purge' AND until <= ?",
                (now_ms + period_ms * 9 // 10, now_ms),
            ).rowcount
        return claimed == 1

    def prepare(self) -> None:
        """Nothing to wait for: the schema is made when the store opens."""

    def readiness(self) -> str:
        return "ready"

    def ping(self) -> None:
        self._query("SELECT 1", ())

    def close(self) -> None:
        self._checkpoints.stop()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
