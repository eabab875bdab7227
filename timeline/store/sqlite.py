"""The SQLite store: the embedded default, a real database behind the same contract as MongoDB."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from timeline.errors import Unavailable, WriteFailed
from timeline.model import Document, Entry, Kind
from timeline.store import COLLECTIONS

log = logging.getLogger(__name__)

# WITHOUT ROWID makes the primary key the table itself: the unique (id, seq) index both
# enforces uniqueness and serves every scan, with no second b-tree to update.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (id, seq)
) WITHOUT ROWID
"""

_HISTORY = COLLECTIONS[Kind.HISTORY]
_SYNC = COLLECTIONS[Kind.SYNC]


def _rows(documents: Sequence[Document]) -> list[tuple[str, int, str, int]]:
    return [(d.id, d.seq, d.message.json, d.created_at_ms) for d in documents]


class SQLiteStore:
    """One connection per thread and process; WAL so readers never wait for the writer."""

    backend = "sqlite"

    def __init__(self, path: str | Path, busy_timeout_ms: int = 2000) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout_ms / 1000
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connection()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            for table in COLLECTIONS.values():
                conn.execute(_SCHEMA.format(table=table))
        except sqlite3.Error as exc:
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

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> list[int]:
        conn = self._connection()
        failed: list[int] = []
        try:
            # IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    f"INSERT INTO {_HISTORY} VALUES (?, ?, ?, ?)",  # noqa: S608 - constant name
                    _rows(history),
                )
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                seqs = [d.seq for d in history]
                raise WriteFailed(
                    "history sequence already stored", timeline=history[0].id, sequences=seqs
                ) from exc
            failed = self._write_sync(conn, sync)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("sqlite write failed: %s", exc)
            raise Unavailable("store (sqlite) is unavailable") from exc
        return failed

    @staticmethod
    def _write_sync(conn: sqlite3.Connection, sync: Sequence[Document]) -> list[int]:
        """One statement for all rows; only when it hits a duplicate, find which, row by row."""
        rows = _rows(sync)
        conn.execute("SAVEPOINT sync_rows")
        try:
            conn.executemany(f"INSERT INTO {_SYNC} VALUES (?, ?, ?, ?)", rows)  # noqa: S608
            conn.execute("RELEASE sync_rows")
            return []
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO sync_rows")
        failed = []
        for position, row in enumerate(rows):
            cursor = conn.execute(f"INSERT OR IGNORE INTO {_SYNC} VALUES (?, ?, ?, ?)", row)  # noqa: S608
            if cursor.rowcount != 1:
                failed.append(position)
        conn.execute("RELEASE sync_rows")
        return failed

    def read(self, kind: Kind, timeline_id: str, after: int, limit: int) -> list[Entry]:
        sql = (
            f"SELECT seq, message, created_at FROM {COLLECTIONS[kind]} "  # noqa: S608
            "WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?"
        )
        try:
            rows = self._connection().execute(sql, (timeline_id, after, limit)).fetchall()
        except sqlite3.Error as exc:
            log.warning("sqlite read failed: %s", exc)
            raise Unavailable("store (sqlite) is unavailable") from exc
        return [Entry(seq, message, created_at) for seq, message, created_at in rows]

    def ping(self) -> None:
        try:
            self._connection().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise Unavailable("store (sqlite) is unavailable") from exc

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
