"""Group commit: the small writes that a process's threads make at the same time, stored in
one SQLite transaction, each in a savepoint of its own (measured: README, "Performance")."""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass

from timeline.store import WriteResult
from timeline.store.sqlite.connections import Connections
from timeline.store.sqlite.writing import Part, PartWriter


@dataclass(slots=True, eq=False)
class Queued:
    """A part waiting for a group's transaction, and where it stands."""

    part: Part
    taken: bool = False  # a leader has it in its group
    done: bool = False
    result: WriteResult | None = None
    error: sqlite3.Error | None = None


class GroupCommit:
    """The queue of a process's small writes, and the thread leading the next transaction.

    A thread that finds no transaction under way leads the next one: it takes every write
    queued by then (its own among them) and stores them in one transaction, each in a
    savepoint of its own (write_batch). While it works, writes of other threads queue for
    the next. One commit, instead of one per write, is what the grouping saves: the pages
    every write touches (the tables' last pages, the records' index) are written to the
    WAL once, and the write lock changes hands once. Alone (the usual case when the
    service is not busy) a write is its own transaction.
    """

    def __init__(self, connections: Connections, parts: PartWriter) -> None:
        self._connections = connections
        self._parts = parts
        self._new_queue()
        # After a fork (a child of a process that wrote) the queue starts empty and led by
        # nobody: the threads that were in it did not cross the fork.
        os.register_at_fork(after_in_child=functools.partial(_renew, weakref.ref(self)))

    def _new_queue(self) -> None:
        self.queued: list[Queued] = []
        self.changed = threading.Condition(threading.Lock())
        self.leading = False

    def write(self, part: Part) -> WriteResult:
        """Store a small write (one transaction's worth), with those other threads of this
        process queued meanwhile; a driver error is raised as it is."""
        job = Queued(part)
        deadline = time.monotonic() + self._connections.busy_timeout_s
        with self.changed:
            self.queued.append(job)
            while self.leading and not job.done:
                left = deadline - time.monotonic()
                if left <= 0 and not job.taken:
                    self.queued.remove(job)
                    raise sqlite3.OperationalError("database is locked (writes queued)")
                # Once taken, the leader finishes it (its own waits are bounded).
                self.changed.wait(left if not job.taken else None)
            if not job.done:
                self.leading = True
                batch, self.queued = self.queued, []
                for queued in batch:
                    queued.taken = True
        if not job.done:
            try:
                self.write_batch(batch)
            finally:
                with self.changed:
                    self.leading = False
                    for queued in batch:
                        if not queued.done:  # only if write_batch itself failed
                            queued.error = queued.error or sqlite3.OperationalError(
                                "the write of its group failed"
                            )
                            queued.done = True
                    self.changed.notify_all()
        if job.error is not None:
            # Each thread raises an exception of its own (tracebacks are per raise).
            raise type(job.error)(*job.error.args) from job.error
        assert job.result is not None
        return job.result

    def write_batch(self, batch: list[Queued]) -> None:
        """Store the writes of a group, setting each one's result or error. Each goes in a
        savepoint of its own and keeps it only when it stores all it holds; any other
        outcome (its claim held by another record, a key taken, a floor in the way) rolls
        its savepoint back, and after the commit it is written alone, as PartWriter.write
        writes any part. An error fails every write not yet committed."""
        conn = self._connections.connection()
        try:
            with self._connections.writing():
                if len(batch) == 1:
                    batch[0].result = self._parts.write(conn, batch[0].part)
                    batch[0].done = True
                    return
                alone: list[Queued] = []
                self._connections.begin(conn)
                for job in batch:
                    conn.execute("SAVEPOINT job")
                    if not self._parts.write_all(conn, job.part):
                        conn.execute("ROLLBACK TO job")
                        alone.append(job)
                    conn.execute("RELEASE job")
                conn.execute("COMMIT")
                for job in batch:
                    if job not in alone:
                        job.result, job.done = WriteResult(), True
                for job in alone:
                    job.result = self._parts.write(conn, job.part)
                    job.done = True
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in batch:
                if not job.done:
                    job.error, job.done = exc, True


def _renew(group: weakref.ReferenceType[GroupCommit]) -> None:
    found = group()
    if found is not None:
        found._new_queue()
