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
from timeline.model import HOLE_MID, Document, Entry, Kind
from timeline.store import COLLECTIONS, Bounds, WriteResult

log = logging.getLogger(__name__)

# WITHOUT ROWID makes the primary key the table itself: the unique (id, seq) index both
# enforces uniqueness and serves every scan, with no second b-tree to update.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    mid TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (id, seq)
) WITHOUT ROWID
"""
# What ack and purge removed, per timeline: the highest sequence the table no longer holds,
# so that counters Redis lost still continue above it.
_FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table}_floor (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID
"""
_RAISE_FLOOR = """
INSERT INTO {table}_floor (id, seq) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET seq = MAX(seq, excluded.seq)
"""
_COLUMNS = "(id, seq, message, created_at, mid)"
_CHUNK = 500  # rows per statement in lookups: well under SQLite's 32,766 variables
_PURGE_BATCH = 500  # rows per purge transaction: the write lock is never held for long

_HISTORY = COLLECTIONS[Kind.HISTORY]
_SYNC = COLLECTIONS[Kind.SYNC]


def _rows(documents: Sequence[Document]) -> list[tuple[str, int, str, int, str]]:
    return [(d.id, d.seq, d.message.json, d.created_at_ms, d.mid) for d in documents]


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connection()
            conn.execute("PRAGMA journal_mode=WAL")
            for kind, table in COLLECTIONS.items():
                conn.execute(_SCHEMA.format(table=table))
                conn.execute(_FLOOR_SCHEMA.format(table=table))
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if "mid" not in columns:  # a file made before documents carried a mid
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN mid TEXT NOT NULL DEFAULT ''")
                if self._retention[kind]:
                    # Only with a retention: the purge finds expired rows without a scan.
                    conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {table}_created ON {table} (created_at)"
                    )
        except sqlite3.Error as exc:
            dependency_failed("store")
            raise Unavailable(f"sqlite store at {self.path} cannot be opened") from exc

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

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> WriteResult:
        with self._transaction() as conn:
            insert = f"INSERT INTO {_HISTORY} {_COLUMNS} VALUES (?, ?, ?, ?, ?)"
            conn.execute("SAVEPOINT history_rows")
            try:
                conn.executemany(insert, _rows(history))
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK TO history_rows")
                return WriteResult(history_taken=True)  # commits nothing: all or none
            conn.execute("RELEASE history_rows")
            return WriteResult(sync_taken=self._write_sync(conn, sync))

    @staticmethod
    def _write_sync(conn: sqlite3.Connection, sync: Sequence[Document]) -> list[int]:
        """One statement for all rows; only when it hits a taken key, find which, row by row."""
        rows = _rows(sync)
        insert = f"INSERT INTO {_SYNC} {_COLUMNS} VALUES (?, ?, ?, ?, ?)"
        conn.execute("SAVEPOINT sync_rows")
        try:
            conn.executemany(insert, rows)
            conn.execute("RELEASE sync_rows")
            return []
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO sync_rows")
        taken = []
        for position, row in enumerate(rows):
            if conn.execute(insert.replace("INSERT", "INSERT OR IGNORE", 1), row).rowcount != 1:
                taken.append(position)
        conn.execute("RELEASE sync_rows")
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

    def ack(self, member: str, seq: int) -> None:
        with self._transaction() as conn:
            # The floor never goes past what was stored: an ack beyond the newest sequence
            # must not make a lost counter jump ahead.
            [(highest,)] = conn.execute(
                f"SELECT MAX(seq) FROM {_SYNC} WHERE id = ? AND seq <= ?", (member, seq)
            ).fetchall()
            if highest is not None:
                conn.execute(_RAISE_FLOOR.format(table=_SYNC), (member, highest))
            conn.execute(f"DELETE FROM {_SYNC} WHERE id = ? AND seq <= ?", (member, seq))

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

    def read(self, kind: Kind, timeline_id: str, after: int, limit: int) -> list[Entry]:
        sql = (
            f"SELECT seq, message, created_at, mid FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?"
        )
        return [Entry(*row) for row in self._query(sql, (timeline_id, after, limit))]

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

    def bounds(self, kind: Kind, timeline_id: str, not_before_ms: int) -> Bounds:
        table = COLLECTIONS[kind]
        sql = (
            f"SELECT seq, message, created_at, mid FROM {table} "
            "WHERE id = ? AND created_at >= ? AND mid != ? ORDER BY seq LIMIT 1"
        )
        rows = self._query(sql, (timeline_id, not_before_ms, HOLE_MID))
        floor = self._query(f"SELECT seq FROM {table}_floor WHERE id = ?", (timeline_id,))
        return Bounds(Entry(*rows[0]) if rows else None, floor[0][0] if floor else 0)

    # --- retention ------------------------------------------------------------------------

    def purge(self, kind: Kind, before_ms: int) -> int:
        """Remove entries created before `before_ms`, in small transactions; raise floors."""
        table = COLLECTIONS[kind]
        removed = 0
        while True:
            with self._transaction() as conn:
                batch = conn.execute(
                    f"SELECT id, seq FROM {table} WHERE created_at < ? LIMIT ?",
                    (before_ms, _PURGE_BATCH),
                ).fetchall()
                highest: dict[str, int] = {}
                for id_, seq in batch:
                    highest[id_] = max(seq, highest.get(id_, 0))
                conn.executemany(_RAISE_FLOOR.format(table=table), list(highest.items()))
                conn.executemany(f"DELETE FROM {table} WHERE id = ? AND seq = ?", batch)
            removed += len(batch)
            if len(batch) < _PURGE_BATCH:
                break
        if removed:
            EXPIRED_REMOVED.labels(kind.value).inc(removed)
        return removed

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

    def ping(self) -> None:
        self._query("SELECT 1", ())

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
