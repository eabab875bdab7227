"""The SQLite store: the embedded default, a real database behind the same contract as MongoDB."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from timeline.errors import PartialWrite, Unavailable
from timeline.metrics import EXPIRED_REMOVED, dependency_failed
from timeline.model import HOLE_MID, Copies, Entry, Kind
from timeline.store import COLLECTIONS, Claim, Gap, Page, WriteResult, split

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
# message where no reader looks any more. The write sees a taken key and moves above. The
# floors of a write's timelines are read in its own transaction (_insert): floors rise
# only in write transactions, so none rises between that read and the insert. (Earlier
# versions checked each row in a trigger: 25 ms of a 10,000-row write; dropped at open.)
_FLOOR_GUARD_DROP = "DROP TRIGGER IF EXISTS {table}_floor_guard"
_FLOORS_OF = "SELECT id, seq FROM {table}_floor WHERE id IN (SELECT value FROM json_each(?))"
_RAISE_FLOOR = """
INSERT INTO {table}_floor (id, seq) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET seq = MAX(seq, excluded.seq)
"""
# Idempotent messages' records (Store.claim): which sequences each holds. `lasts` is the
# record's integers in decimal, joined by commas ("7,12,3,40"), as Redis holds them: a byte
# a digit and one a comma, so a 10,000-member fan-out's record (10,001 integers) is about
# 70 KB at sequences below a million; only a retry reads it back. A rowid table: SQLite
# advises WITHOUT ROWID only for rows well under a page. The index on expires_ms serves
# the purge (forget_expired_claims), never a request.
IDEMPOTENCY = "idempotency"
_IDEMPOTENCY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {IDEMPOTENCY} (
    mid TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    lasts TEXT NOT NULL,
    allocated_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
)
"""
_IDEMPOTENCY_EXPIRY = (
    f"CREATE INDEX IF NOT EXISTS {IDEMPOTENCY}_expires ON {IDEMPOTENCY} (expires_ms)"
)
# Stored unless an unexpired record of the mid is: an expired one is replaced in place.
_CLAIM = f"""
INSERT INTO {IDEMPOTENCY} (mid, fingerprint, lasts, allocated_ms, expires_ms)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (mid) DO UPDATE SET fingerprint = excluded.fingerprint, lasts = excluded.lasts,
    allocated_ms = excluded.allocated_ms, expires_ms = excluded.expires_ms
WHERE {IDEMPOTENCY}.expires_ms <= ?
"""
_CLAIMED = f"SELECT fingerprint, lasts, allocated_ms, expires_ms FROM {IDEMPOTENCY} WHERE mid = ?"
_RECLAIM = f"UPDATE {IDEMPOTENCY} SET lasts = ? WHERE mid = ? AND fingerprint = ? AND lasts = ?"
_FORGET_EXPIRED = (
    f"DELETE FROM {IDEMPOTENCY} WHERE rowid IN "
    f"(SELECT rowid FROM {IDEMPOTENCY} WHERE expires_ms <= ? LIMIT ?)"
)
# Records per purge transaction: a fan-out's is 70 KB, so at most some 7 MB freed at once.
_FORGET_BATCH = 100
_COLUMNS = "(id, seq, message, created_at, mid)"
_INSERT = {
    table: f"INSERT INTO {table} {_COLUMNS} VALUES (?, ?, ?, ?, ?)"
    for table in COLLECTIONS.values()
}
_FLOORS = {table: _FLOORS_OF.format(table=table) for table in COLLECTIONS.values()}
# A small write (a send's copies, a small group's) is one statement per table: its rows,
# inserted only if no timeline's range starts at or below its floor (0 rows inserted then).
# One statement instead of a floor lookup and a step per row: each is a moment without the
# GIL, and getting it back (other request threads want it too) keeps the write lock held
# longer. Up to this many rows (so as many timelines at most) are bound one by one.
_FEW = 64


@functools.lru_cache(maxsize=256)
def _guarded_insert(table: str, rows: int, timelines: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    firsts = ", ".join(["(?, ?)"] * timelines)
    return (
        f"INSERT INTO {table} {_COLUMNS} SELECT * FROM (VALUES {values}) WHERE NOT EXISTS "
        f"(SELECT 1 FROM (VALUES {firsts}) AS v JOIN {table}_floor AS f "
        "ON f.id = v.column1 WHERE f.seq >= v.column2)"
    )


_HISTORY = COLLECTIONS[Kind.HISTORY]
_SYNC = COLLECTIONS[Kind.SYNC]
_CHUNK = 500  # rows per statement in lookups: well under SQLite's 32,766 variables
_PURGE_BATCH = 500  # rows per purge transaction: the write lock is never held for long

# A big write (a fan-out of 10,000 members x 20 messages is 200,000 rows) is stored in
# several transactions, none holding the write lock for more than a small part of the busy
# timeout another writer waits: at most this many rows, and this many bytes of messages.
# Measured on a loaded 2-core machine (tests/bench_big_requests.py; README, "Big requests"):
# 4,000 rows of small messages hold the lock 20-50 ms (median), 1 MiB of 6.5 KB messages
# 5-15 ms. A timeline's copies of one batch are never cut (a batch that alone is more, up to
# the 4 MiB a body may hold, is one transaction of its own).
WRITE_CHUNK_ROWS = 4_000
WRITE_CHUNK_BYTES = 1 << 20
# How often a writer waiting for the lock tries again. SQLite's own busy handler sleeps ever
# longer between tries (up to 100 ms), and would keep missing the moments between a big
# write's transactions; this one tries every half millisecond.
_LOCK_POLL_S = 0.0005
_T = TypeVar("_T")
# Between two transactions of a big write, how long it lets waiting writers go first at
# most (they announce themselves, see _begin): about one transaction's worth, so that under
# a steady stream of small writes the big one still gets half of the lock's time.
_YIELD_MAX_S = 0.05
# The ranges of sequences a statement is given as one JSON parameter: [[id, first, last]...].
_RANGES_JOIN = (
    "json_each(?) AS r CROSS JOIN {table} AS t ON t.id = json_extract(r.value, '$[0]') "
    "AND t.seq BETWEEN json_extract(r.value, '$[1]') AND json_extract(r.value, '$[2]')"
)
# Which of these sync ranges (by index) hold a document, or lie at or below their floor
# (the floor guard would refuse them): each an index range scan and a floor lookup.
_TAKEN_RANGES = f"""
SELECT r.key FROM json_each(?) AS r
WHERE EXISTS (
    SELECT 1 FROM {_SYNC} AS t WHERE t.id = json_extract(r.value, '$[0]')
    AND t.seq BETWEEN json_extract(r.value, '$[1]') AND json_extract(r.value, '$[2]')
) OR json_extract(r.value, '$[1]') <= (
    SELECT seq FROM {_SYNC}_floor WHERE id = json_extract(r.value, '$[0]')
)
"""


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


@dataclass(slots=True, eq=False)
class _Job:
    """A write of one transaction's worth, with what its statements bind built before the
    lock is taken; for group commit, where it stands (see SQLiteStore._write_grouped)."""

    history: Copies | None
    sync: Copies | None
    claim: Claim | None
    now_ms: int
    rows: list[tuple[str, int, str, int, str]] = dataclasses.field(init=False)
    record: tuple[str, str, str, int, int] | None = dataclasses.field(init=False)
    taken: bool = False  # a leader has it in its group
    done: bool = False
    result: WriteResult | None = None
    error: sqlite3.Error | None = None

    def __post_init__(self) -> None:
        self.rows = list(self.sync.rows()) if self.sync is not None else []
        self.record = _claim_row(self.claim) if self.claim is not None else None


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
        # False: every small write is a transaction of its own (to measure what grouping pays).
        self.group_commit = group_commit
        self._busy_timeout = busy_timeout_ms / 1000
        self._busy_timeout_ms = busy_timeout_ms
        self.write_chunk_rows = write_chunk_rows
        self.write_chunk_bytes = write_chunk_bytes
        # Writers waiting for the lock hold a shared lock on this file (see _begin).
        self._waiting_path = self.path.with_name(self.path.name + "-wait")
        self._local = threading.local()
        self._new_locks()
        # After a fork (a child of a process that wrote) the locks start free: a thread that
        # held one did not cross the fork.
        os.register_at_fork(after_in_child=functools.partial(_renew_locks, weakref.ref(self)))
        self._retention = {kind: (retention_ms or {}).get(kind, 0) for kind in Kind}
        self._checkpoints = _Checkpointer(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connection()
            # Several workers open the file at once: here SQLite's own busy handler waits.
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("SELECT json_extract('[1]', '$[0]')")  # the JSON functions exist
            for table in COLLECTIONS.values():
                self._migrate(conn, table)
                conn.execute(_SCHEMA.format(table=table))
                conn.execute(_FLOOR_SCHEMA.format(table=table))
                conn.execute(_FLOOR_GUARD_DROP.format(table=table))
            # In a file an earlier version made too: IF NOT EXISTS.
            conn.execute(_IDEMPOTENCY_SCHEMA)
            conn.execute(_IDEMPOTENCY_EXPIRY)
            conn.execute("PRAGMA busy_timeout = 0")  # from here on, see _begin and _read
        except (sqlite3.Error, OSError) as exc:
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
                timeout=self._busy_timeout,  # while the connection is set up (below)
                isolation_level=None,  # explicit BEGIN/COMMIT below
                check_same_thread=False,
            )
            conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: no corruption, ever
            conn.execute("PRAGMA wal_autocheckpoint=10000")  # see _Checkpointer
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB of pages per connection
            # Then no busy handler: writers wait in _begin, readers in _read (instead of two
            # PRAGMAs turning SQLite's handler off and on around every write transaction).
            conn.execute("PRAGMA busy_timeout = 0")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _waiting_file(self) -> IO[bytes] | None:
        """This thread's open `-wait` file: flock() locks belong to an open file, so each
        thread (and each process: not one inherited across a fork) needs its own to wait,
        and be seen waiting, apart. None when it cannot be opened: writers then wait
        without being seen (a big write does not let them in first), nothing worse."""
        found: tuple[int, IO[bytes]] | None = getattr(self._local, "waiting", None)
        if found is not None and found[0] == os.getpid():
            return found[1]
        try:
            waiting = open(self._waiting_path, "ab")  # noqa: SIM115 (kept, closed in close())
        except OSError as exc:
            log.warning("sqlite: %s cannot be opened: %s", self._waiting_path, exc)
            return None
        self._local.waiting = (os.getpid(), waiting)
        return waiting

    def _new_locks(self) -> None:
        # One writer at a time in this process (see _writing); the small writes queued for
        # the next transaction, and whether a thread is leading one (see _write_grouped).
        self._writer = threading.Lock()
        self._jobs: list[_Job] = []
        self._jobs_changed = threading.Condition(threading.Lock())
        self._leading = False

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold this process's writer lock, waiting up to the busy timeout: its threads
        queue here, woken in turn, instead of polling SQLite's lock in _begin (which they
        still do for another process's writers)."""
        if not self._writer.acquire(timeout=self._busy_timeout):
            raise sqlite3.OperationalError("database is locked (by this process)")
        try:
            yield
        finally:
            self._writer.release()

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE: take the write lock up front (two writers never deadlock on
        upgrade), waiting for it up to the busy timeout.

        SQLite's busy handler sleeps ever longer between tries (1, 2, 5 ... then 100 ms),
        so a writer queued behind a big write's string of transactions would keep missing
        the moments between them, and fail after the timeout. So the wait is done here:
        a try every half millisecond, and meanwhile a shared lock on the `-wait` file,
        which a big write looks at between its transactions (_let_waiting_writers_in) to
        let waiting writers go first. When the lock is free, this costs nothing more.
        """
        if _begin_immediate(conn):
            return
        deadline = time.monotonic() + self._busy_timeout
        waiting = self._waiting_file()
        announced = False
        try:
            while True:
                if not announced and waiting is not None:
                    # Refused only for the instant a big write looks: next time, then.
                    announced = _flock(waiting, fcntl.LOCK_SH | fcntl.LOCK_NB) is True
                time.sleep(_LOCK_POLL_S)
                if _begin_immediate(conn, last_try=time.monotonic() >= deadline):
                    return
        finally:
            if announced and waiting is not None:
                _flock(waiting, fcntl.LOCK_UN)

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """A read outside any transaction. In WAL mode readers do not wait for writers; they
        see SQLITE_BUSY only in rare moments (another connection recovering the WAL, or
        closing the last connection): then the read is tried again, every half millisecond,
        up to the busy timeout."""
        conn = self._connection()
        deadline = 0.0
        while True:
            try:
                return work(conn)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    raise
                now = time.monotonic()
                deadline = deadline or now + self._busy_timeout
                if now >= deadline:
                    raise
                time.sleep(_LOCK_POLL_S)

    def _let_waiting_writers_in(self) -> None:
        """Between two transactions of a big write (or of the purge): while another writer
        waits for the lock (it holds a shared lock on the `-wait` file), let it go first,
        for up to _YIELD_MAX_S. Nobody waiting: one flock() call."""
        waiting = self._waiting_file()
        if waiting is None:
            return
        deadline = time.monotonic() + _YIELD_MAX_S
        while (granted := _flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)) is False:
            if time.monotonic() >= deadline:
                return
            time.sleep(_LOCK_POLL_S)
        if granted:
            _flock(waiting, fcntl.LOCK_UN)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any SQLite error rolls back and becomes Unavailable."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            with self._writing():
                self._begin(conn)
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
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
            return self._read(lambda conn: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            log.warning("sqlite read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc

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
        is stored together or reported taken together.

        A failure once the first transaction committed is PartialWrite when it held the
        history copies (Unavailable otherwise): the parts before it are stored, and writing
        the same copies again finds them taken by their own mid and stores the rest.
        """
        parts: list[tuple[int, Copies | None]] = [(0, None)]
        if sync is not None:
            parts = list(split(sync, self.write_chunk_rows, self.write_chunk_bytes))
        if len(parts) == 1:
            try:
                if self.group_commit:
                    result = self._write_grouped(history, sync, claim, now_ms)
                else:
                    result = self._write_alone(_Job(history, sync, claim, now_ms))
            except sqlite3.Error as exc:
                log.warning("sqlite write failed: %s", exc)
                dependency_failed("store")
                raise Unavailable("store (sqlite) is unavailable") from exc
            self._checkpoints.start()
            return result
        taken: list[int] = []
        committed = 0
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            for offset, part in parts:
                if committed:
                    self._let_waiting_writers_in()
                first = history if not committed else None
                job = _Job(first, part, claim if not committed else None, now_ms)
                with self._writing():
                    result = self._write_part(conn, job)
                if result.history_taken or result.claimed is not None:
                    return result  # the first part: nothing stored, all or none
                taken.extend(offset + position for position in result.sync_taken)
                committed += 1
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("sqlite write failed: %s", exc)
            dependency_failed("store")
            if committed and history is not None:
                raise PartialWrite(
                    f"store (sqlite) failed after {committed} of {len(parts)} transactions"
                ) from exc
            raise Unavailable("store (sqlite) is unavailable") from exc
        except BaseException:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._checkpoints.start()
        return WriteResult(sync_taken=taken)

    def _write_grouped(
        self, history: Copies | None, sync: Copies | None, claim: Claim | None, now_ms: int
    ) -> WriteResult:
        """A small write (one transaction's worth), committed with those other threads of
        this process queued meanwhile: group commit.

        A thread that finds no transaction under way leads the next one: it takes every
        write queued by then (its own among them) and stores them in one transaction, each
        in a savepoint of its own (_write_batch). While it works, writes of other threads
        queue for the next. One commit, instead of one per write, is what the grouping
        saves: the pages every write touches (the tables' last pages, the records' index)
        are written to the WAL once, and the write lock changes hands once. Alone (the
        usual case when the service is not busy) a write is its own transaction, as before.
        """
        job = _Job(history, sync, claim, now_ms)
        deadline = time.monotonic() + self._busy_timeout
        with self._jobs_changed:
            self._jobs.append(job)
            while self._leading and not job.done:
                left = deadline - time.monotonic()
                if left <= 0 and not job.taken:
                    self._jobs.remove(job)
                    raise sqlite3.OperationalError("database is locked (writes queued)")
                # Once taken, the leader finishes it (its own waits are bounded).
                self._jobs_changed.wait(left if not job.taken else None)
            if not job.done:
                self._leading = True
                batch, self._jobs = self._jobs, []
                for queued in batch:
                    queued.taken = True
        if not job.done:
            try:
                self._write_batch(batch)
            finally:
                with self._jobs_changed:
                    self._leading = False
                    for queued in batch:
                        if not queued.done:  # only if _write_batch itself failed
                            queued.error = queued.error or sqlite3.OperationalError(
                                "the write of its group failed"
                            )
                            queued.done = True
                    self._jobs_changed.notify_all()
        if job.error is not None:
            # Each thread raises an exception of its own (tracebacks are per raise).
            raise type(job.error)(*job.error.args) from job.error
        assert job.result is not None
        return job.result

    def _write_alone(self, job: _Job) -> WriteResult:
        """A small write in a transaction of its own (group_commit=False)."""
        conn = self._connection()
        with self._writing():
            try:
                return self._write_part(conn, job)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _write_batch(self, batch: list[_Job]) -> None:
        """Store the writes of a group (see _write_grouped), setting each one's result or
        error. Each goes in a savepoint of its own and keeps it only when it stores all it
        holds; any other outcome (its claim held by another record, a key taken, a floor in
        the way) rolls its savepoint back, and after the commit it is written alone, as
        _write_part writes any write. An error fails every write not yet committed."""
        conn = self._connection()
        try:
            with self._writing():
                if len(batch) == 1:
                    batch[0].result = self._write_part(conn, batch[0])
                    batch[0].done = True
                    return
                alone: list[_Job] = []
                self._begin(conn)
                for job in batch:
                    conn.execute("SAVEPOINT job")
                    if not self._write_all(conn, job):
                        conn.execute("ROLLBACK TO job")
                        alone.append(job)
                    conn.execute("RELEASE job")
                conn.execute("COMMIT")
                for job in batch:
                    if job not in alone:
                        job.result, job.done = WriteResult(), True
                for job in alone:
                    job.result = self._write_part(conn, job)
                    job.done = True
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in batch:
                if not job.done:
                    job.error, job.done = exc, True

    def _write_all(self, conn: sqlite3.Connection, job: _Job) -> bool:
        """In the group's transaction: whether the job stored everything it holds (else
        the caller rolls back what it did)."""
        if job.record is not None and _record_claim(conn, job.record, job.now_ms) is not None:
            return False
        if job.history is not None and not self._insert_history(conn, job.history):
            return False
        if job.sync is not None:
            try:
                return _insert(conn, _SYNC, job.sync, job.rows)
            except sqlite3.IntegrityError:
                return False
        return True

    def _write_part(self, conn: sqlite3.Connection, job: _Job) -> WriteResult:
        """One transaction: the claim, the history copies (all or none), then the sync
        copies."""
        history, sync, rows, record, now_ms = (
            job.history,
            job.sync,
            job.rows,
            job.record,
            job.now_ms,
        )
        self._begin(conn)
        if record is not None and (claimed := _record_claim(conn, record, now_ms)) is not None:
            conn.execute("ROLLBACK")
            return WriteResult(claimed=claimed)
        if history is not None and not self._insert_history(conn, history):
            conn.execute("ROLLBACK")
            return WriteResult(history_taken=True)
        taken: list[int] = []
        if sync is not None:
            try:
                if not _insert(conn, _SYNC, sync, rows):
                    raise sqlite3.IntegrityError("at or below the floor")  # the slow path
            except sqlite3.IntegrityError:
                try:
                    taken = self._write_sync_slowly(conn, history, sync, rows, record, now_ms)
                except _HistoryTaken:
                    conn.execute("ROLLBACK")
                    return WriteResult(history_taken=True)
                except _Claimed as claimed_meanwhile:
                    conn.execute("ROLLBACK")
                    return WriteResult(claimed=claimed_meanwhile.claim)
        conn.execute("COMMIT")
        return WriteResult(sync_taken=taken)

    @staticmethod
    def _insert_history(conn: sqlite3.Connection, history: Copies) -> bool:
        """Whether the history copies went in: none is taken, none at or below its floor."""
        try:
            return _insert(conn, _HISTORY, history, list(history.rows()))
        except sqlite3.IntegrityError:
            return False

    def _write_sync_slowly(
        self,
        conn: sqlite3.Connection,
        history: Copies | None,
        sync: Copies,
        rows: list[tuple[str, int, str, int, str]],
        record: tuple[str, str, str, int, int] | None = None,
        now_ms: int = 0,
    ) -> list[int]:
        """The rare path: a sync key was taken (or a replay: all of them, by its own
        earlier attempt). Start the transaction over (no savepoint on the fast path: it
        would cost every write), find in one statement the timelines whose range holds a
        document or lies at or below its floor, and insert the others' rows: a timeline
        that is taken anywhere keeps none of its batch, so that its messages move together
        and no reader ever sees part of them twice. Returns the positions not written."""
        conn.execute("ROLLBACK")
        self._begin(conn)
        if record is not None and (claimed := _record_claim(conn, record, now_ms)) is not None:
            raise _Claimed(claimed)  # claimed between the two transactions
        if history is not None and not self._insert_history(conn, history):
            raise _HistoryTaken  # taken between the two transactions
        count = len(sync.messages)
        ranges = [
            (id_, first, first + count - 1)
            for id_, first in zip(sync.ids, sync.firsts, strict=True)
        ]
        busy = {key for (key,) in conn.execute(_TAKEN_RANGES, (_json(ranges),))}
        free = [i for i in range(len(ranges)) if i not in busy]
        conn.execute("SAVEPOINT free_rows")
        try:
            if len(free) == len(ranges):
                conn.executemany(_INSERT[_SYNC], rows)
            elif free:
                conn.executemany(
                    _INSERT[_SYNC], (row for i in free for row in rows[i * count : (i + 1) * count])
                )
        except sqlite3.IntegrityError:
            # Only a write that names one key twice gets here: timeline by timeline.
            conn.execute("ROLLBACK TO free_rows")
            for i in free:
                conn.execute("SAVEPOINT timeline_rows")
                try:
                    conn.executemany(_INSERT[_SYNC], rows[i * count : (i + 1) * count])
                except sqlite3.IntegrityError:
                    conn.execute("ROLLBACK TO timeline_rows")
                    busy.add(i)
                conn.execute("RELEASE timeline_rows")
        conn.execute("RELEASE free_rows")
        return [position for i in sorted(busy) for position in range(i * count, (i + 1) * count)]

    def seal(
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        """In transactions of at most a chunk's rows each (placeholders are independent of
        each other); what a transaction finds stored is found in one statement."""
        table = COLLECTIONS[kind]
        insert = f"INSERT OR IGNORE INTO {table} {_COLUMNS} VALUES (?, ?, '{{}}', ?, ?)"
        taken: list[tuple[str, int]] = []
        for start in range(0, len(keys), self.write_chunk_rows):
            if start:
                self._let_waiting_writers_in()
            chunk = keys[start : start + self.write_chunk_rows]
            with self._transaction() as conn:
                stored = self._stored(conn, table, _ranges(chunk))
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
            f"{_RANGES_JOIN.format(table=table)} WHERE t.mid = ?)"
        )
        for n, ranges in enumerate(_runs(_ranges(keys), self.write_chunk_rows)):
            if n:
                self._let_waiting_writers_in()
            with self._transaction() as conn:
                conn.execute(delete, (_json(ranges), mid))

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
        """The keys as ranges of consecutive sequences (a replay's are one per timeline),
        looked up together: see _stored."""
        if not keys:
            return {}
        try:
            ranges = _ranges(keys)
            return self._read(lambda conn: self._stored(conn, COLLECTIONS[kind], ranges))
        except sqlite3.Error as exc:
            log.warning("sqlite read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (sqlite) is unavailable") from exc

    @staticmethod
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
        join = _RANGES_JOIN.format(table=table)
        summary = f"SELECT r.key, COUNT(*), MIN(t.mid), MAX(t.mid) FROM {join} GROUP BY r.key"
        mixed: list[tuple[str, int, int]] = []
        for index, held, low, high in conn.execute(summary, (_json(ranges),)):
            id_, first, last = ranges[index]
            if held == last - first + 1 and low == high:
                found.update(zip(zip(repeat(id_), range(first, last + 1)), repeat(low)))
            else:
                mixed.append(ranges[index])
        if mixed:
            documents = f"SELECT t.id, t.seq, t.mid FROM {join}"
            for id_, seq, mid in conn.execute(documents, (_json(mixed),)):
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
            if removed:
                self._let_waiting_writers_in()
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

    def forget_expired_claims(self, now_ms: int) -> int:
        """Remove expired idempotency records, in transactions of at most _FORGET_BATCH
        records, letting waiting writers in between; found by the index on expires_ms. Not
        counted in EXPIRED_REMOVED (entries only)."""
        removed = 0
        while True:
            if removed:
                self._let_waiting_writers_in()
            with self._transaction() as conn:
                count = conn.execute(_FORGET_EXPIRED, (now_ms, _FORGET_BATCH)).rowcount
            removed += count
            if count < _FORGET_BATCH:
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

    # --- idempotency ----------------------------------------------------------------------

    def claim(self, claim: Claim, now_ms: int) -> Claim:
        """One write transaction (taking part in the writer-lock scheme: see _begin): the
        upsert stores the claim unless an unexpired record is there; only when it did not
        is the record read back (a retry's path), in the same transaction."""
        record = _claim_row(claim)  # built before taking the lock
        with self._transaction() as conn:
            return _record_claim(conn, record, now_ms) or claim

    def reclaim(self, expected: Claim, lasts: tuple[int, ...]) -> Claim | None:
        """One write transaction: the conditional UPDATE, then the record read back."""
        new, old = _lasts_text(lasts), _lasts_text(expected.lasts)
        with self._transaction() as conn:
            conn.execute(_RECLAIM, (new, expected.mid, expected.fingerprint, old))
            found = conn.execute(_CLAIMED, (expected.mid,)).fetchone()
        if found is None:
            return None
        fingerprint, text, allocated_ms, expires_ms = found
        return Claim(expected.mid, fingerprint, _lasts_of(text), allocated_ms, expires_ms)

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
        waiting: tuple[int, IO[bytes]] | None = getattr(self._local, "waiting", None)
        if waiting is not None:
            waiting[1].close()
            self._local.waiting = None


def _renew_locks(store: weakref.ReferenceType[SQLiteStore]) -> None:
    found = store()
    if found is not None:
        found._new_locks()


def _begin_immediate(conn: sqlite3.Connection, last_try: bool = False) -> bool:
    """BEGIN IMMEDIATE: whether it took the write lock; False while another writer holds
    it (SQLITE_BUSY raised instead on the last try); any other error raised."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or last_try:
            raise
        return False
    return True


def _flock(file: IO[bytes], operation: int) -> bool | None:
    """flock() without blocking: True when granted, False when another open file holds a
    lock in the way, None when the file system refuses flock() altogether."""
    try:
        fcntl.flock(file, operation)
    except BlockingIOError:
        return False
    except OSError as exc:
        log.debug("sqlite: flock on the -wait file failed: %s", exc)
        return None
    return True


def _insert(
    conn: sqlite3.Connection,
    table: str,
    copies: Copies,
    rows: Sequence[tuple[str, int, str, int, str]],
) -> bool:
    """In the write's transaction: insert the copies' rows (`rows`), unless a timeline's
    range starts at or below its floor (False: nothing inserted). A taken key raises
    IntegrityError: the small write's one statement inserted nothing then; a big write's
    rows may be partly in (the caller rolls back)."""
    if len(rows) <= _FEW:  # a timeline has a row at least
        params = [value for row in rows for value in row]
        for pair in zip(copies.ids, copies.firsts, strict=True):
            params.extend(pair)
        statement = _guarded_insert(table, len(rows), len(copies.ids))
        return bool(conn.execute(statement, params).rowcount)
    # A big write: one lookup of the few timelines that have a floor, not one per row.
    firsts = dict(zip(copies.ids, copies.firsts, strict=True))
    floors = conn.execute(_FLOORS[table], (orjson.dumps(list(firsts)).decode(),))
    if any(firsts[id_] <= floor for id_, floor in floors):
        return False
    conn.executemany(_INSERT[table], rows)
    return True


class _Claimed(Exception):
    """A claim's mid holds another record (read in the transaction that found it)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim.mid)
        self.claim = claim


def _claim_row(claim: Claim) -> tuple[str, str, str, int, int]:
    return (
        claim.mid,
        claim.fingerprint,
        _lasts_text(claim.lasts),
        claim.allocated_ms,
        claim.expires_ms,
    )


def _record_claim(
    conn: sqlite3.Connection, row: tuple[str, str, str, int, int], now_ms: int
) -> Claim | None:
    """In the open transaction: store the claim unless an unexpired record of its mid is
    there; None when it is stored (or the record equals it), else the record."""
    if conn.execute(_CLAIM, (*row, now_ms)).rowcount:
        return None  # inserted, or an expired record replaced
    fingerprint, text, allocated_ms, expires_ms = conn.execute(_CLAIMED, (row[0],)).fetchone()
    if (fingerprint, text, allocated_ms, expires_ms) == row[1:]:
        return None  # this very claim, stored by an earlier try of the same write
    return Claim(row[0], fingerprint, _lasts_of(text), allocated_ms, expires_ms)


def _lasts_text(lasts: Sequence[int]) -> str:
    """The integers as the idempotency table holds them: decimal, joined by commas."""
    return ",".join(map(str, lasts))


def _lasts_of(text: str) -> tuple[int, ...]:
    return tuple(map(int, text.split(","))) if text else ()


def _json(ranges: Sequence[tuple[str, int, int]]) -> str:
    return orjson.dumps(ranges).decode()


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
