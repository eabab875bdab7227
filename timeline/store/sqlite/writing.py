"""The SQLite store's write of one part (one transaction's worth: a small write, or a part of
a big one): its idempotency record, its history copies, then its sync copies, each refused
together when a key is taken or a floor is in the way."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from timeline.model import Conversation, Copies, peer_of
from timeline.store import Claim, WriteResult
from timeline.store.sqlite.connections import Connections
from timeline.store.sqlite.schema import (
    CLAIM,
    CLAIMED,
    FEW,
    FLOORS,
    HIGHEST_BELOW,
    HISTORY,
    INSERT,
    LIST_MEMBER,
    MEMBERS_DIGEST,
    RAISE_CONVERSATION,
    RAISE_SENDER_READ,
    SET_MEMBERS_DIGEST,
    SYNC,
    TAKEN_RANGES,
    UNLIST_OTHERS,
    guarded_insert,
)

Row = tuple[str, int, str, int, str, str, str, int]
Record = tuple[str, str, str, int, int]


@dataclass(slots=True, eq=False)
class Part:
    """What one transaction writes, with what its statements bind built before the lock is
    taken."""

    history: Copies | None
    sync: Copies | None
    claim: Claim | None
    now_ms: int
    rows: list[Row] = dataclasses.field(init=False)
    record: Record | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.rows = list(self.sync.rows()) if self.sync is not None else []
        self.record = claim_row(self.claim) if self.claim is not None else None


class PartWriter:
    """Writes parts, each in the transaction it is given or begins (see Connections.begin)."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def write(self, conn: sqlite3.Connection, part: Part) -> WriteResult:
        """One transaction: the claim, the history copies (all or none), then the sync
        copies. The caller holds the writer lock, and rolls back on an error."""
        history, sync, rows, record, now_ms = (
            part.history,
            part.sync,
            part.rows,
            part.record,
            part.now_ms,
        )
        self._connections.begin(conn)
        if record is not None and (claimed := record_claim(conn, record, now_ms)) is not None:
            conn.execute("ROLLBACK")
            return WriteResult(claimed=claimed)
        if history is not None and not _insert_history(conn, history):
            conn.execute("ROLLBACK")
            return WriteResult(history_taken=True)
        taken: list[int] = []
        if sync is not None:
            try:
                if not insert(conn, SYNC, sync, rows):
                    raise sqlite3.IntegrityError("at or below the floor")  # the slow path
            except sqlite3.IntegrityError:
                try:
                    taken = self._write_sync_slowly(conn, part)
                except _HistoryTaken:
                    conn.execute("ROLLBACK")
                    return WriteResult(history_taken=True)
                except _Claimed as claimed_meanwhile:
                    conn.execute("ROLLBACK")
                    return WriteResult(claimed=claimed_meanwhile.claim)
        conn.execute("COMMIT")
        return WriteResult(sync_taken=taken)

    @staticmethod
    def write_all(conn: sqlite3.Connection, part: Part) -> bool:
        """In a transaction under way (a group's, see group.py): whether the part stored
        everything it holds (else the caller rolls back what it did)."""
        if part.record is not None and record_claim(conn, part.record, part.now_ms) is not None:
            return False
        if part.history is not None and not _insert_history(conn, part.history):
            return False
        if part.sync is not None:
            try:
                return insert(conn, SYNC, part.sync, part.rows)
            except sqlite3.IntegrityError:
                return False
        return True

    def _write_sync_slowly(self, conn: sqlite3.Connection, part: Part) -> list[int]:
        """The rare path: a sync key was taken (or a replay: all of them, by its own
        earlier attempt). Start the transaction over (no savepoint on the fast path: it
        would cost every write), find in one statement the timelines whose range holds a
        document or lies at or below its floor, and insert the others' rows: a timeline
        that is taken anywhere keeps none of its batch, so that its messages move together
        and no reader ever sees part of them twice. Returns the positions not written."""
        history, sync, rows, record = part.history, part.sync, part.rows, part.record
        assert sync is not None
        conn.execute("ROLLBACK")
        self._connections.begin(conn)
        if record is not None and (claimed := record_claim(conn, record, part.now_ms)) is not None:
            raise _Claimed(claimed)  # claimed between the two transactions
        if history is not None and not _insert_history(conn, history):
            raise _HistoryTaken  # taken between the two transactions
        count = len(sync.messages)
        ranges = [
            (id_, first, first + count - 1)
            for id_, first in zip(sync.ids, sync.firsts, strict=True)
        ]
        busy = {key for (key,) in conn.execute(TAKEN_RANGES, (json_of(ranges),))}
        free = [i for i in range(len(ranges)) if i not in busy]
        conn.execute("SAVEPOINT free_rows")
        try:
            if len(free) == len(ranges):
                conn.executemany(INSERT[SYNC], rows)
            elif free:
                conn.executemany(
                    INSERT[SYNC], (row for i in free for row in rows[i * count : (i + 1) * count])
                )
        except sqlite3.IntegrityError:
            # Only a write that names one key twice gets here: timeline by timeline.
            conn.execute("ROLLBACK TO free_rows")
            for i in free:
                conn.execute("SAVEPOINT timeline_rows")
                try:
                    conn.executemany(INSERT[SYNC], rows[i * count : (i + 1) * count])
                except sqlite3.IntegrityError:
                    conn.execute("ROLLBACK TO timeline_rows")
                    busy.add(i)
                conn.execute("RELEASE timeline_rows")
        conn.execute("RELEASE free_rows")
        return [position for i in sorted(busy) for position in range(i * count, (i + 1) * count)]


class _HistoryTaken(Exception):
    """The history key was taken while the write started over (the rare path)."""


class _Claimed(Exception):
    """A claim's mid holds another record (read in the transaction that found it)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim.mid)
        self.claim = claim


def _insert_history(conn: sqlite3.Connection, history: Copies) -> bool:
    """Whether the history copies went in: none is taken, none at or below its floor. When
    they did, their conversation's state follows in the same transaction (record_activity):
    whoever sees the message sees the counts that include it."""
    try:
        if not insert(conn, HISTORY, history, list(history.rows())):
            return False
    except sqlite3.IntegrityError:
        return False
    record_activity(conn, history)
    return True


def record_activity(conn: sqlite3.Connection, history: Copies) -> None:
    """The history copies' Activity, in their transaction: the conversation's latest
    message, its members' list entries (only when the member list differs from the one
    recorded last), the sender's read position."""
    activity = history.activity
    if activity is None:
        return
    kind, conversation = activity.kind.value, activity.conversation
    # The member list recorded comes back from the raise (RETURNING), or, when a later message
    # is there already (nothing raised), from a read of its own.
    raised = conn.execute(
        RAISE_CONVERSATION,
        (conversation, kind, activity.last, activity.created_at_ms),
    ).fetchone()
    (recorded,) = raised or conn.execute(MEMBERS_DIGEST, (conversation,)).fetchone()
    digest = activity.members_digest()
    if recorded != digest:
        # A new member has read what the conversation held before this message: what is
        # stored below it (not `first - 1`: a message below may still be on its way, and it
        # is sent to this member too).
        (below,) = conn.execute(HIGHEST_BELOW, (conversation, activity.first)).fetchone()
        start = below or 0
        if recorded:  # a member list was recorded before: some may have been removed
            members = orjson.dumps(list(activity.members)).decode()
            conn.execute(UNLIST_OTHERS, (conversation, members))
        conn.executemany(
            LIST_MEMBER,
            (
                (member, conversation, kind, activity.peer_of(i), start)
                for i, member in enumerate(activity.members)
            ),
        )
        conn.execute(SET_MEMBERS_DIGEST, (digest, conversation))
    if activity.sender:
        peer = (
            peer_of(conversation, activity.sender)
            if activity.kind is Conversation.SINGLE
            else activity.peer
        )
        conn.execute(RAISE_SENDER_READ, (activity.sender, conversation, kind, peer, activity.last))


def insert(conn: sqlite3.Connection, table: str, copies: Copies, rows: Sequence[Row]) -> bool:
    """In the write's transaction: insert the copies' rows (`rows`), unless a timeline's
    range starts at or below its floor (False: nothing inserted). A taken key raises
    IntegrityError: the small write's one statement inserted nothing then; a big write's
    rows may be partly in (the caller rolls back)."""
    if len(rows) <= FEW:  # a timeline has a row at least
        params = [value for row in rows for value in row]
        for pair in zip(copies.ids, copies.firsts, strict=True):
            params.extend(pair)
        statement = guarded_insert(table, len(rows), len(copies.ids))
        return bool(conn.execute(statement, params).rowcount)
    # A big write: one lookup of the few timelines that have a floor, not one per row.
    firsts = dict(zip(copies.ids, copies.firsts, strict=True))
    floors = conn.execute(FLOORS[table], (orjson.dumps(list(firsts)).decode(),))
    if any(firsts[id_] <= floor for id_, floor in floors):
        return False
    conn.executemany(INSERT[table], rows)
    return True


def claim_row(claim: Claim) -> Record:
    return (
        claim.mid,
        claim.fingerprint,
        lasts_text(claim.lasts),
        claim.allocated_ms,
        claim.expires_ms,
    )


def record_claim(conn: sqlite3.Connection, row: Record, now_ms: int) -> Claim | None:
    """In the open transaction: store the claim unless an unexpired record of its mid is
    there; None when it is stored (or the record equals it), else the record."""
    if conn.execute(CLAIM, (*row, now_ms)).rowcount:
        return None  # inserted, or an expired record replaced
    fingerprint, text, allocated_ms, expires_ms = conn.execute(CLAIMED, (row[0],)).fetchone()
    if (fingerprint, text, allocated_ms, expires_ms) == row[1:]:
        return None  # this very claim, stored by an earlier try of the same write
    return Claim(row[0], fingerprint, lasts_of(text), allocated_ms, expires_ms)


def lasts_text(lasts: Sequence[int]) -> str:
    """The integers as the idempotency table holds them: decimal, joined by commas."""
    return ",".join(map(str, lasts))


def lasts_of(text: str) -> tuple[int, ...]:
    return tuple(map(int, text.split(","))) if text else ()


def json_of(ranges: Sequence[tuple[str, int, int]]) -> str:
    return orjson.dumps(ranges).decode()
