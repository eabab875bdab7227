"""The service layer: send, send_group, sync and history. It knows nothing of HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from timeline import metrics
from timeline.errors import ClientMsgIdReused, Unavailable, WriteFailed
from timeline.model import Document, Entry, Kind, Message, Timeline, conversation_id
from timeline.sequence import Record, SequenceAllocator
from timeline.store import Store, WriteResult

log = logging.getLogger(__name__)

#: How often allocation may find counters missing (seeding them in between) before giving up;
#: more than once means Redis is losing data while we work.
_SEED_ROUNDS = 3
#: How often a write may find its sequences taken by other messages (a counter behind the
#: store) before giving up; each move starts above the store's highest, so one is the rule.
_MOVE_ROUNDS = 5
#: Pages one read may go through when placeholders or late writes are in the way.
_READ_PAGES = 5


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SyncResult:
    """A page of a member's sync timeline and the newest sequence allocated to it."""

    latest_seq: int
    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message stored: each recipient's sequence, and who has no copy."""

    sequences: dict[str, int]
    failed: list[str]


@dataclass(frozen=True, slots=True)
class Policy:
    """The service's knobs, from the settings."""

    gap_grace_ms: int = 30_000
    record_ttl_ms: int = 86_400_000
    write_attempts: int = 4
    retry_backoff_ms: int = 100
    retry_budget_ms: int = 1000


class TimelineService:
    """Allocates sequences in one Redis round trip and stores a request in one bulk write.

    Off the steady state it repairs what it finds: counters Redis lost are seeded from the
    store; sequences found taken by another message move to new ones; failed writes are
    retried; an idempotent message's retries reuse its recorded sequences.
    """

    def __init__(
        self,
        allocator: SequenceAllocator,
        store: Store,
        policy: Policy | None = None,
        clock_ms: Callable[[], int] = _now_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.allocator = allocator
        self.store = store
        self.policy = policy or Policy()
        self._clock_ms = clock_ms
        self._sleep = sleep

    # --- writing -------------------------------------------------------------------------

    def send(
        self, sender: str, receiver: str, message: Message, client_msg_id: str | None = None
    ) -> int:
        """A one-to-one message; returns the receiver's sync sequence for it."""
        recipients = [sender] if sender == receiver else [sender, receiver]
        conversation = conversation_id(sender, receiver)
        delivery = self._deliver(conversation, recipients, message, client_msg_id)
        if delivery.failed:
            raise WriteFailed(
                "message could not be stored for every recipient; retry with the same "
                "client_msg_id",
                failedMembers=delivery.failed,
            )
        return delivery.sequences[receiver]

    def send_group(
        self,
        group: str,
        members: Sequence[str],
        message: Message,
        client_msg_id: str | None = None,
    ) -> list[str]:
        """A group message to the listed (distinct) members; returns those not written."""
        return self._deliver(group, members, message, client_msg_id).failed

    def _deliver(
        self,
        history_id: str,
        recipients: Sequence[str],
        message: Message,
        client_msg_id: str | None,
    ) -> Delivery:
        """Allocate for the history timeline and every recipient at once, then store it all."""
        timelines = [Timeline(Kind.HISTORY, history_id)]
        timelines += [Timeline(Kind.SYNC, member) for member in recipients]
        record = None
        mid = uuid.uuid4().hex
        if client_msg_id is not None:
            # A retry may list the members, or the message's keys, in another order.
            recipients = sorted(recipients)
            timelines = [timelines[0]] + [Timeline(Kind.SYNC, member) for member in recipients]
            canonical = orjson.dumps(message.document, option=orjson.OPT_SORT_KEYS).decode()
            record = Record(
                key=self.allocator.record_key(history_id, client_msg_id),
                fingerprint=_digest(history_id, *recipients, canonical)[:16],
                ttl_ms=self.policy.record_ttl_ms,
            )
            # The same for every attempt, so each can tell the copies of another apart.
            mid = _digest(history_id, client_msg_id)[:32]
        lasts = self._allocate(timelines, record)
        now = self._clock_ms()
        documents = [
            Document(timeline.id, last, message, now, mid)
            for timeline, last in zip(timelines, lasts, strict=True)
        ]
        stored, failed = self._store(timelines, documents, record)
        sequences = {d.id: d.seq for d in stored[1:]}
        failed_members = [timelines[position].id for position in failed]
        metrics.FAN_OUT.observe(len(recipients))
        if failed_members:
            metrics.FAILED_MEMBERS.inc(len(failed_members))
            log.warning(
                "%d of %d sync copies not stored (timeline %s seq %d)",
                len(failed_members),
                len(recipients),
                history_id,
                stored[0].seq,
            )
        return Delivery(sequences=sequences, failed=failed_members)

    def _allocate(self, timelines: list[Timeline], record: Record | None) -> list[int]:
        """One EVALSHA in the steady state; seeds missing counters from the store first."""
        for _ in range(_SEED_ROUNDS):
            allocation = self.allocator.allocate(timelines, 1, record)
            if allocation.replayed:
                assert record is not None
                if allocation.fingerprint != record.fingerprint:
                    raise ClientMsgIdReused(
                        "client_msg_id was already used for another message in this conversation"
                    )
                return allocation.lasts
            if not allocation.missing:
                return allocation.lasts
            self._seed([timelines[i] for i in allocation.missing])
        raise Unavailable("sequence counters keep disappearing from redis")

    def _seed(self, timelines: Sequence[Timeline]) -> None:
        """Raise counters to the store's highest sequence: continue at max + 1, never reuse."""
        floors: dict[Timeline, int] = {}
        for kind in Kind:
            ids = [t.id for t in timelines if t.kind is kind]
            if ids:
                for id_, seq in self.store.max_seqs(kind, ids).items():
                    floors[Timeline(kind, id_)] = seq
        self.allocator.seed(floors)
        metrics.SEQUENCE_REPAIRS.labels("seeded").inc(len(floors))

    def _store(
        self, timelines: list[Timeline], documents: list[Document], record: Record | None
    ) -> tuple[list[Document], list[int]]:
        """Write until every document is stored, retrying what may succeed.

        Returns the documents as finally stored (some may have moved to new sequences) and
        the positions of those that could not be. Raises when the history document cannot be
        stored: without it no sync copy is attempted. Once it is stored the request tries
        hard to finish (store errors and Redis hiccups alike are retried with backoff, up to
        write_attempts), because a client retry is only idempotent while Redis keeps the
        message's record; before, it gives up once retry_budget_ms is spent.
        """
        documents = list(documents)
        pending = list(range(len(documents)))  # positions still to write; 0 is the history
        mid = documents[0].mid
        failures = moves = 0
        deadline = self._clock_ms() + self.policy.retry_budget_ms
        while pending:
            history = [documents[0]] if pending[0] == 0 else []
            sync_positions = pending[1:] if history else pending
            try:
                result = self.store.write(history, [documents[p] for p in sync_positions])
                self._count_written(history, sync_positions, result)
                if result.history_taken:
                    taken = [0]
                else:
                    taken = [sync_positions[i] for i in result.sync_taken]
                    if not taken:
                        return documents, []
                owners = self.store.owners(
                    timelines[taken[0]].kind,
                    [(documents[p].id, documents[p].seq) for p in taken],
                )
                # Taken by this very message (an earlier attempt) means stored.
                conflicts = [
                    p for p in taken if owners.get((documents[p].id, documents[p].seq)) != mid
                ]
                if not conflicts:
                    if not result.history_taken:
                        return documents, []
                    pending = pending[1:]  # the history is stored: on to the sync copies
                    continue
                moves += 1
                if moves > _MOVE_ROUNDS:
                    raise Unavailable("sequences keep being taken by other messages")
                try:
                    documents = self._move(timelines, documents, conflicts, record)
                except Unavailable:
                    if record is not None or result.history_taken:
                        raise  # the record makes a second move agree with a lost first one
                    # Without a record a second move could skip the sequence a lost reply
                    # gave: report these copies instead.
                    return documents, conflicts
                if not result.history_taken:
                    pending = conflicts
            except Unavailable as exc:
                if getattr(exc, "history_stored", False) and pending[0] == 0:
                    pending = pending[1:]  # the store got the history copy before failing
                failures += 1
                backoff_ms = self.policy.retry_backoff_ms * 2 ** (failures - 1)
                nothing_stored = pending[0] == 0
                if nothing_stored and self._clock_ms() + backoff_ms > deadline:
                    raise  # nothing written yet: a fast 503 costs the client nothing
                if failures >= self.policy.write_attempts:
                    if nothing_stored:
                        raise
                    return documents, pending
                self._sleep(backoff_ms / 1000)
        return documents, []

    @staticmethod
    def _count_written(
        history: list[Document], sync_positions: list[int], result: WriteResult
    ) -> None:
        """Count the documents this write inserted (a taken history means none were)."""
        if result.history_taken:
            return
        if history:
            metrics.MESSAGES_WRITTEN.labels("history").inc()
        written = len(sync_positions) - len(result.sync_taken)
        if written:
            metrics.MESSAGES_WRITTEN.labels("sync").inc(written)

    def _move(
        self,
        timelines: list[Timeline],
        documents: list[Document],
        positions: list[int],
        record: Record | None,
    ) -> list[Document]:
        """New sequences, above the store's highest, for documents another message holds."""
        moving = [timelines[p] for p in positions]
        log.warning(
            "%d sequence(s) already taken (first: %s %s seq %d); the counter was behind the store",
            len(positions),
            moving[0].kind,
            moving[0].id,
            documents[positions[0]].seq,
        )
        metrics.SEQUENCE_REPAIRS.labels("moved").inc(len(positions))
        kind = moving[0].kind  # one kind at a time: the history alone, or sync copies
        floors = self.store.max_seqs(kind, [t.id for t in moving])
        lasts = self.allocator.reallocate(
            [(timelines[p], p, documents[p].seq, floors[timelines[p].id]) for p in positions],
            1,
            record,
        )
        moved = list(documents)
        for p, last in zip(positions, lasts, strict=True):
            moved[p] = dataclasses.replace(documents[p], seq=last)
        return moved

    # --- reading -------------------------------------------------------------------------

    def sync(self, member: str, last_read: int, count: int) -> SyncResult:
        """The member's sync entries after last_read, and the newest sequence allocated."""
        # Store first, then Redis: latestSeq is then never below the last entry returned.
        entries = self._readable(Kind.SYNC, member, last_read, count)
        latest = self.allocator.latest(Timeline(Kind.SYNC, member))
        if latest is None:  # a new member, or Redis lost the counter: the store knows
            latest = self.store.max_seqs(Kind.SYNC, [member]).get(member, 0)
        if entries and entries[-1].seq > latest:
            latest = entries[-1].seq  # a counter behind the store; the next send repairs it
        return SyncResult(latest_seq=latest, entries=entries)

    def history(self, conversation: str, last_read: int, count: int) -> list[Entry]:
        """A conversation's history entries after last_read, ascending."""
        return self._readable(Kind.HISTORY, conversation, last_read, count)

    def _readable(self, kind: Kind, timeline_id: str, after: int, count: int) -> list[Entry]:
        """Up to `count` entries after `after`, never past a hole a write may still fill.

        A sequence is allocated before its document is written, so a reader can see seq 7
        stored while seq 6 is still being written; handing out 7 would move the client past
        6 for good. So a read stops before a hole while the entry after it is younger than
        the grace period (no request outlives it). An older hole is sealed before it is
        stepped over: placeholders are stored at its sequences, so that a write arriving even
        later (a client's retry, a lagging counter) finds them taken and moves above, where
        readers will see it. Placeholders are never returned.
        """
        entries: list[Entry] = []
        expected = after + 1
        size = count
        for _ in range(_READ_PAGES):
            page = self.store.read(kind, timeline_id, expected - 1, size)
            resealed = False
            for entry in page:
                if entry.seq != expected:
                    now = self._clock_ms()
                    if now - entry.created_at_ms < self.policy.gap_grace_ms:
                        return entries
                    try:
                        late = self.store.seal(kind, timeline_id, range(expected, entry.seq), now)
                    except Unavailable:
                        return entries  # what comes before the hole is safe to hand out
                    if late:
                        resealed = True  # a write got there first: read it in order
                        break
                if not entry.is_hole:
                    entries.append(entry)
                    if len(entries) == count:
                        return entries
                expected = entry.seq + 1
            if not resealed and len(page) < size:
                return entries  # the end of the timeline
            size = max(count, 200)  # past placeholders: read on in larger steps
        return entries
