"""The SQLite store's access to its file: a connection per thread and process, the writer
lock of a process, the wait for SQLite's write lock (and the `-wait` lock file by which a
big write sees writers waiting), reads that wait out a busy moment, and the checkpointer.

Nothing here knows the tables: schema.py makes them, the store's queries use them.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import IO, Any, TypeVar

from timeline.errors import Unavailable
from timeline.metrics import dependency_failed

log = logging.getLogger(__name__)

# How often a writer waiting for the lock tries again. SQLite's own busy handler sleeps ever
# longer between tries (up to 100 ms), and would keep missing the moments between a big
# write's transactions; this one tries every half millisecond.
_LOCK_POLL_S = 0.0005
# Between two transactions of a big write, how long it lets waiting writers go first at
# most (they announce themselves, see Connections.begin): about one transaction's worth, so
# that under a steady stream of small writes the big one still gets half of the lock's time.
_YIELD_MAX_S = 0.05
_T = TypeVar("_T")


def unavailable(action: str, exc: sqlite3.Error) -> Unavailable:
    """A driver error as the service sees it: logged, counted, then raised by the caller."""
    log.warning("sqlite %s failed: %s", action, exc)
    dependency_failed("store")
    return Unavailable("store (sqlite) is unavailable")


class Checkpointer:
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


class Connections:
    """One connection per thread and process (WAL: readers never wait for the writer), and
    how a write gets the lock: one writer at a time in a process, then SQLite's lock."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        # Writers waiting for the lock hold a shared lock on this file (see begin).
        self._waiting_path = path.with_name(path.name + "-wait")
        self._local = threading.local()
        self.writer = threading.Lock()
        # After a fork (a child of a process that wrote) the lock starts free: a thread
        # that held it did not cross the fork.
        os.register_at_fork(after_in_child=functools.partial(_renew, weakref.ref(self)))
        self.checkpoints = Checkpointer(path)

    def connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork (gunicorn) nor, unlocked, a thread.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,  # while the connection is set up (below)
                isolation_level=None,  # explicit BEGIN/COMMIT
                check_same_thread=False,
            )
            conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: no corruption, ever
            conn.execute("PRAGMA wal_autocheckpoint=10000")  # see Checkpointer
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB of pages per connection
            # Then no busy handler: writers wait in begin, readers in read (instead of two
            # PRAGMAs turning SQLite's handler off and on around every write transaction).
            conn.execute("PRAGMA busy_timeout = 0")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold this process's writer lock, waiting up to the busy timeout: its threads
        queue here, woken in turn, instead of polling SQLite's lock in begin (which they
        still do for another process's writers)."""
        if not self.writer.acquire(timeout=self.busy_timeout_s):
            raise sqlite3.OperationalError("database is locked (by this process)")
        try:
            yield
        finally:
            self.writer.release()

    def begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE: take the write lock up front (two writers never deadlock on
        upgrade), waiting for it up to the busy timeout.

        SQLite's busy handler sleeps ever longer between tries (1, 2, 5 ... then 100 ms),
        so a writer queued behind a big write's string of transactions would keep missing
        the moments between them, and fail after the timeout. So the wait is done here:
        a try every half millisecond, and meanwhile a shared lock on the `-wait` file,
        which a big write looks at between its transactions (let_waiting_writers_in) to
        let waiting writers go first. When the lock is free, this costs nothing more.
        """
        if _begin_immediate(conn):
            return
        deadline = time.monotonic() + self.busy_timeout_s
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

    def let_waiting_writers_in(self) -> None:
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the writer lock; any SQLite error rolls back and
        becomes Unavailable."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self.connection()
            with self.writing():
                self.begin(conn)
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise unavailable("write", exc) from exc
        except BaseException:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """A read outside any transaction. In WAL mode readers do not wait for writers; they
        see SQLITE_BUSY only in rare moments (another connection recovering the WAL, or
        closing the last connection): then the read is tried again, every half millisecond,
        up to the busy timeout. Any SQLite error after that becomes Unavailable."""
        try:
            conn = self.connection()
            deadline = 0.0
            while True:
                try:
                    return work(conn)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                    now = time.monotonic()
                    deadline = deadline or now + self.busy_timeout_s
                    if now >= deadline:
                        raise
                    time.sleep(_LOCK_POLL_S)
        except sqlite3.Error as exc:
            raise unavailable("read", exc) from exc

    def query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """One statement's rows, read as `read` reads."""
        return self.read(lambda conn: conn.execute(sql, params).fetchall())

    def query_until(
        self, sql: str, params: Sequence[Any], enough: Callable[[Any], bool]
    ) -> list[Any]:
        """One statement's rows, stepped one at a time (SQLite computes a row as it is asked
        for), up to the first row for which `enough` says so: what is not needed is never
        read from the file."""

        def rows(conn: sqlite3.Connection) -> list[Any]:
            taken = []
            for row in conn.execute(sql, params):
                taken.append(row)
                if enough(row):
                    break
            return taken

        return self.read(rows)

    def close(self) -> None:
        """Stop the checkpointer; close this thread's connection and `-wait` file."""
        self.checkpoints.stop()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        waiting: tuple[int, IO[bytes]] | None = getattr(self._local, "waiting", None)
        if waiting is not None:
            waiting[1].close()
            self._local.waiting = None

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


def _renew(connections: weakref.ReferenceType[Connections]) -> None:
    found = connections()
    if found is not None:
        found.writer = threading.Lock()


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
