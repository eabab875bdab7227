"""The SQLite store: the embedded default, a real database behind the same contract as MongoDB."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timeline.errors import Unavailable
from timeline.metrics import dependency_failed
from timeline.model import HOLE_MID, Document, Entry, Kind
from timeline.store import COLLECTIONS, WriteResult

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
_COLUMNS = "(id, seq, message, created_at, mid)"
_CHUNK = 500  # rows per statement in lookups: well under SQLite's 32,766 variables

_HISTORY = COLLECTIONS[Kind.HISTORY]
_SYNC = COLLECTIONS[Kind.SYNC]


def _rows(documents: Sequence[Document]) -> list[tuple[str, int, str, int, str]]:
    return [(d.id, d.seq, d.message.json, d.created_at_ms, d.mid) for d in documents]


class SQLiteStore:
    """One connection per thread and process; WAL so readers never wait for the writer."""

    backend = "sqlite"

    def __init__(self, path: str | Path, busy_timeout_ms: int = 1000) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout_ms / 1000
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connection()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            for table in COLLECTIONS.values():
                conn.execute(_SCHEMA.format(table=table))
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if "mid" not in columns:  # a file made before documents carried a mid
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN mid TEXT NOT NULL DEFAULT ''")
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

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> WriteResult:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            # IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    f"INSERT INTO {_HISTORY} {_COLUMNS} VALUES (?, ?, ?, ?, ?)", _rows(history)
                )
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                return WriteResult(history_taken=True)
            taken = self._write_sync(conn, sync)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("sqlite write failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc
        return WriteResult(sync_taken=taken)

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
        self, kind: Kind, timeline_id: str, seqs: Sequence[int], created_at_ms: int
    ) -> list[int]:
        insert = f"INSERT OR IGNORE INTO {COLLECTIONS[kind]} {_COLUMNS} VALUES (?, ?, '{{}}', ?, ?)"
        taken = []
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            for seq in seqs:
                row = (timeline_id, seq, created_at_ms, HOLE_MID)
                if conn.execute(insert, row).rowcount != 1:
                    taken.append(seq)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc
        return taken

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
                f"SELECT v.column1, (SELECT MAX(seq) FROM {table} WHERE id = v.column1) "
                f"FROM (VALUES {values}) AS v"
            )
            for id_, seq in self._query(sql, list(chunk)):
                highest[id_] = seq or 0
        return highest

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.warning("sqlite read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc

    def read(self, kind: Kind, timeline_id: str, after: int, limit: int) -> list[Entry]:
        sql = (
            f"SELECT seq, message, created_at, mid FROM {COLLECTIONS[kind]} "
            "WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?"
        )
        rows = self._query(sql, (timeline_id, after, limit))
        return [Entry(*row) for row in rows]

    def ping(self) -> None:
        try:
            self._connection().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
