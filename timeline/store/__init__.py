"""The store protocol: where documents live. One module per backend (mongo, sqlite)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from timeline.model import Conversation, Copies, Entry, Kind
from timeline.settings import Settings

log = logging.getLogger(__name__)

#: The collection (MongoDB) or table (SQLite) of each kind of timeline.
COLLECTIONS = {Kind.SYNC: "chat_sync", Kind.HISTORY: "chat_history"}


@dataclass(frozen=True, slots=True)
class Page:
    """The first page of a read, and where the readable part of the timeline starts: its
    lowest entry that is neither a placeholder nor expired, and the floor below which entries
    were removed (acked, purged). See Store.page."""

    lowest: Entry | None
    floor: int
    entries: list[Entry]


class Gap(NamedTuple):
    """What a run of sequences holds: how many documents in all, and how many of them are
    hidden from readers (placeholders, expired entries). See Store.gap."""

    present: int
    hidden: int


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write left undone because an `(id, seq)` was already stored."""

    history_taken: bool = False  # then no sync document was attempted
    sync_taken: list[int] = field(default_factory=list)  # positions in `sync.rows()`
    # The record of the write's claim's mid that was stored already and differs from it:
    # then nothing was written (see Store.write).
    claimed: Claim | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotent message's record in the store: which sequences it holds, for good.

    The store, not Redis, is the authority: a retry whose Redis record is gone (Redis lost
    its data between the attempt and the retry) finds its sequences here, and writes the
    same copies again instead of storing the message twice. See Store.claim."""

    mid: str  # the message id: 32 hex chars, deterministic per (conversation, client_msg_id)
    fingerprint: str  # 16 hex chars: a digest of the request; a different one = another message
    lasts: tuple[int, ...]  # the last sequence of each timeline's range: history, then recipients
    allocated_ms: int  # when the sequences were allocated (ms since epoch)
    expires_ms: int  # after this the record may be forgotten (ms since epoch)


@dataclass(frozen=True, slots=True)
class ConversationState:
    """One conversation as one member sees it (Store.conversations, Store.mark_read).

    `latest` is the highest history sequence stored in it; `read` the member's read
    position (never above `latest`); `unread` the messages after it, that is
    `latest - read` less the sequences there that hold no message (placeholders sealing a
    hole). A member's own messages are never among them: storing a message moves its
    sender's position to it, in the same step (see Activity). `activity_ms` orders the
    list: when its latest message was created."""

    kind: Conversation
    conversation: str  # the history timeline's id
    peer: str  # what the member calls it: the other user, or the group's name
    latest: int
    read: int
    unread: int
    last: Entry | None  # the latest message, as the history holds it (None: none, or purged)
    activity_ms: int


class Cursor(NamedTuple):
    """Where a page of the conversation list ends: the list is ordered by (activity_ms,
    conversation) descending, and the next page starts below this."""

    activity_ms: int
    conversation: str


@dataclass(frozen=True, slots=True)
class Device:
    """One of a member's devices: the sync position it acked, and when it was last seen
    (by a sync or an ack; ms since the epoch)."""

    device: str
    position: int
    last_seen_ms: int


def split(copies: Copies, rows: int, size: int) -> Iterator[tuple[int, Copies]]:
    """The copies in parts of whole timelines, each at most `rows` copies and `size` bytes
    of messages (a timeline's batch alone may be more: it is never cut), with the position
    of each part's first copy in `copies.rows()`. One part when all of it fits."""
    count = len(copies.messages)
    timelines = len(copies.ids)
    batch = sum(len(message.json.encode()) for message in copies.messages)
    step = max(1, min(rows // count, size // max(1, batch)))
    if step >= timelines:
        yield 0, copies
        return
    for start in range(0, timelines, step):
        yield start * count, copies.part(start, start + step)


class Store(Protocol):
    """Documents `{id, seq, message}`, unique on `(id, seq)`, read back in sequence order.

    Entries carry their creation time (ms; 0 when unknown, for documents another system
    wrote) and their `mid`; placeholders (mid HOLE_MID) seal holes readers stepped over.
    """

    backend: str

    def write(
        self,
        history: Copies | None,
        sync: Copies | None,
        claim: Claim | None = None,
        now_ms: int = 0,
    ) -> WriteResult:
        """Store a request's copies: one bulk write per collection, or, for a big one,
        several in a row (see split), so that no single transaction or operation runs long:
        on SQLite no other writer waits a large part of its busy timeout behind it.

        The history copies are written first, all or none: if one's `(id, seq)` is taken,
        no sync copy is attempted. The sync copies are written independently of each other;
        those whose `(id, seq)` is taken are reported (by position in `sync.rows()`), the
        others kept. A sequence at or below its timeline's floor (acked or purged) counts as
        taken, also when the floor rises while the write is in flight. A write is cut only
        between timelines: where the store can (SQLite), one timeline's copies of a batch
        are stored together or not at all, whatever the write's size.
        Any other failure raises Unavailable (PartialWrite once the history is stored, also
        when it fails after some of its parts were stored); the write may then have been
        partly done, and writing the same documents again is how to finish it: what is
        stored comes back as taken, under its own mid (see owners).

        Finding keys taken costs what storing them would, or less: a replay of a request
        whose copies are all stored (a client's retry) is set-based work, never a
        statement or a savepoint per copy or per timeline.

        Sync copies with `about` store, beside each message, its conversation's kind, name
        (as that member knows it) and the message's history sequence; read back as Entry's
        conv_kind, conv and conv_seq. History copies with `activity` update the
        conversation's state (see "conversations" below) when they are stored, and also
        when they are found taken by the same mid (a retry of a write whose history got in):
        the latest message, the members' list entries, the sender's read position. Where
        that update follows the history copies in a step of its own (MongoDB) and fails, the
        write raises Unavailable (not PartialWrite): the caller writes the history again,
        finds it taken by the same mid, and the update is made then.

        With `claim`, the claim is stored first, as claim(claim, now_ms) would store it, and
        where the store can, in the same transaction as the first copies (SQLite: one
        transaction instead of two for an idempotent message's first attempt). When a
        record of its mid that differs from it holds already, nothing is written and that
        record comes back as `claimed`.
        """
        ...

    def seal(
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        """Store placeholders (mid HOLE_MID) at the given `(id, seq)` where none is stored;
        return the keys that turned out to be taken (a late write got there first). Many
        keys are stored in several transactions (placeholders stand each on its own): a
        failure (Unavailable) may leave some stored, and sealing again finishes."""
        ...

    def unwrite(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        """Delete the documents at these `(id, seq)` that belong to message `mid`. Many keys
        are deleted in several transactions, never cutting one timeline's run of
        consecutive keys; a failure may leave some deleted, and unwriting again finishes."""
        ...

    def ack(self, member: str, seq: int, floor: int) -> None:
        """Delete the member's sync entries with `seq <= seq` (one delete), raising the
        timeline's floor to `floor` (which covers every sequence removed) first."""
        ...

    def raise_floor(self, kind: Kind, timeline_id: str, seq: int) -> None:
        """Declare everything up to `seq` gone: readers skip it, writes there count as taken."""
        ...

    def gap(self, kind: Kind, timeline_id: str, low: int, high: int, not_before_ms: int) -> Gap:
        """What holds a sequence in `low <= seq < high`: every document, and those hidden
        from readers (placeholders, entries created before `not_before_ms`). A reader steps
        over a gap only when all of it is hidden: a visible document there is one its page
        missed (written since), never a reason to step over."""
        ...

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The `mid` of the stored document at each `(id, seq)` that exists.

        The keys are looked up as runs of consecutive sequences of one timeline (what a
        request's keys are: one run per timeline), each run one index range scan, in a
        number of round trips that does not grow with the runs' length: asking about a
        replayed fan-out of 10,000 members x 20 messages costs about what storing it did."""
        ...

    def max_seqs(self, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        """The highest sequence each timeline ever stored (its floor included); 0 if none."""
        ...

    def read(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int = 0,
        max_bytes: int = 0,
    ) -> list[Entry]:
        """Entries with `seq > after`, ascending, at most `limit`: neither placeholders nor
        entries created before `not_before_ms` (count() tells what else fills a gap). With
        `max_bytes`, the read stops after the entry whose message takes the total past it
        (at least one entry): a page of big messages is not read whole to return a few."""
        ...

    def read_backward(
        self, kind: Kind, timeline_id: str, before: int, limit: int, not_before_ms: int
    ) -> list[Entry]:
        """Entries with `seq < before` (no bound when 0), newest first, at most `limit`;
        neither placeholders nor entries created before `not_before_ms`."""
        ...

    def page(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int,
        max_bytes: int = 0,
    ) -> Page:
        """read(after, limit, not_before_ms, max_bytes), with the timeline's lowest such entry
        and its floor: one round trip where it can be."""
        ...

    def purge(self, kind: Kind, before_ms: int) -> int:
        """Remove entries created before `before_ms` in small batches, raising each
        timeline's floor first; how many were removed."""
        ...

    def claim(self, claim: Claim, now_ms: int) -> Claim:
        """Atomically: store `claim` unless an unexpired record of its mid is stored (one
        whose expires_ms > now_ms); return the record that holds now: the given one, or the
        earlier one, unchanged (fingerprint, lasts and times as they were stored, whatever
        the given claim says). Of two claims of one mid racing, both get the same record.

        An expired record is as good as none: it is replaced, also before the background
        purge (forget_expired_claims, or MongoDB's TTL index) has removed it. `lasts` of
        any length (10,001 for a fan-out to 10,000 members) come back exactly, in order.
        Raises Unavailable, like every other call, when the store cannot be reached (and,
        on MongoDB, until prepare() has succeeded, as writes do)."""
        ...

    def reclaim(self, expected: Claim, lasts: tuple[int, ...]) -> Claim | None:
        """Compare-and-set on the record of `expected.mid`: its lasts become `lasts` only
        while it still holds `expected.fingerprint` and `expected.lasts` (what the caller
        read); its times stay. Returns the record stored afterwards: the changed one when
        the swap happened, otherwise the one that won (another attempt changed it first, or
        it is another message's), None when no record of the mid is stored. Expiry is not
        looked at. Raises Unavailable."""
        ...

    def forget_expired_claims(self, now_ms: int) -> int:
        """Remove records that expired (expires_ms <= now_ms) in small batches, so that
        they never pile up; how many were removed. The Purger calls it every period,
        whatever the retention of entries; MongoDB leaves it to its TTL index (0)."""
        ...

    def claim_purge(self, now_ms: int, period_ms: int) -> bool:
        """Whether this process should purge now: one claim per period across all workers
        (and, for MongoDB, all hosts)."""
        ...

    def prepare(self) -> None:
        """Create what the store relies on (MongoDB's indexes), however long that takes: an
        index build on existing data may take hours. Idempotent; until what gates writes
        (MongoDB's unique indexes) is built, writes are refused (fast, Unavailable); reads
        never wait for it. Raises Unavailable."""
        ...

    def readiness(self) -> str:
        """Whether writes are accepted: `ready` once what gates them is built; `building`
        before that, `failed` after a failure (the log says why; it is tried again),
        `blocked` when it cannot be built without an operator (see problem())."""
        ...

    def problem(self) -> str:
        """Why preparing cannot go on without an operator, in one line that says what to
        do (documents that collide on (id, seq), a build past its deadline); "" when
        nothing blocks it. The Preparer stops trying then."""
        ...

    # --- conversations, read positions, devices ---------------------------------------------
    #
    # The store keeps them (not Redis): they survive what Redis loses. A write's history
    # copies carry an Activity (see write): where the store can (SQLite), it is applied in
    # the transaction that stores them; elsewhere (MongoDB) the memberships and the sender's
    # read position are raised before the copies are written and the conversation's latest
    # after (a read in between sees the sender's own message as read, never as unread).
    # Every change is a maximum or an insert-if-absent: a retry applies it again harmlessly.

    def conversations(
        self, member: str, limit: int, before: Cursor | None
    ) -> list[ConversationState]:
        """The member's conversations (those it sent or received a message in), most recent
        activity first, at most `limit`, below `before` when given."""
        ...

    def mark_read(
        self, member: str, kind: Conversation, conversation: str, peer: str, seq: int
    ) -> ConversationState:
        """Raise the member's read position in the conversation to `seq`, or to the
        conversation's latest when `seq` is above it (a lower `seq` changes nothing), and
        return the conversation as the member sees it then. A conversation the member has
        no message in is not added to its list."""
        ...

    def device_seen(self, member: str, device: str, now_ms: int) -> None:
        """Record that the device was seen now (its position unchanged; 0 when new)."""
        ...

    def device_ack(self, member: str, device: str, seq: int, now_ms: int, idle_ms: int) -> int:
        """Atomically: raise the device's position to `seq`, mark it seen now, and return
        the lowest position among the member's devices seen since `now_ms - idle_ms` (this
        one included): what the member's sync timeline may release up to."""
        ...

    def devices(self, member: str) -> list[Device]:
        """The member's devices, by name."""
        ...

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...

    def close(self) -> None: ...


class Purger:
    """Removes expired entries, and expired idempotency records (forget_expired_claims),
    every period, in a daemon thread of each worker; the store's claim_purge makes one
    worker do it per period. Requests never wait for it. It runs whatever the retention of
    entries (0: kept for ever): idempotency records always expire."""

    def __init__(
        self,
        store: Store,
        retention: dict[Kind, int],
        period_s: float,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._retention = {kind: ms for kind, ms in retention.items() if ms}
        self._period_s = period_s
        self._clock_ms = clock_ms
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="timeline-purge", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def run_once(self, claimed: bool = True) -> int:
        """One period's purge, if this process claims it (or, with claimed=False, at once):
        how many entries it removed (expired idempotency records are not counted)."""
        removed = 0
        now = self._clock_ms()
        if not claimed or self._store.claim_purge(now, int(self._period_s * 1000)):
            for kind, retention in self._retention.items():
                removed += self._store.purge(kind, now - retention)
            self._store.forget_expired_claims(now)
        return removed

    def _run(self) -> None:
        while not self._stopping.wait(self._period_s):
            try:
                self.run_once()
            except Exception:  # a purge failing must never end the thread
                log.warning("purge of expired entries failed", exc_info=True)


class Preparer:
    """Runs store.prepare() in a daemon thread of each worker until it succeeds, so that no
    request waits on an index build; readiness reports it meanwhile."""

    def __init__(self, store: Store, retry_s: float = 5.0, retry_max_s: float = 60.0) -> None:
        self._store = store
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._stopping = threading.Event()

    def start(self) -> None:
        # Always: prepare() returns at once when all is built. Never while blocked: a build
        # would scan the collection to fail the same way (an operator resolves it, runs
        # timeline-admin migrate, and reloads the service).
        if not self._store.problem():
            threading.Thread(target=self._run, name="timeline-prepare", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        pause = self._retry_s
        while not self._stopping.is_set():
            try:
                self._store.prepare()
                return
            except Exception:  # logged by the store; tried again unless an operator must act
                if self._store.problem():
                    log.error("store preparation stopped until an operator acts (see /readyz)")
                    return
                log.warning("store not ready; trying again in %.0f s", pause)
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, self._retry_max_s)


def retention_ms(settings: Settings) -> dict[Kind, int]:
    return {
        Kind.SYNC: settings.sync_retention_seconds * 1000,
        Kind.HISTORY: settings.history_retention_seconds * 1000,
    }


def open_store(settings: Settings) -> Store:
    """The store the settings name: MongoDB when a URI is set, else SQLite."""
    if settings.store_backend == "mongo":
        from timeline.store.mongo import MongoStore

        return MongoStore.connect(settings, retention_ms(settings))
    from timeline.store.sqlite import SQLiteStore

    return SQLiteStore(
        settings.sqlite_path,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        retention_ms=retention_ms(settings),
    )
