"""The service layer: send, send_group, ack, sync and history. It knows nothing of HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from timeline import metrics
from timeline.errors import ClientMsgIdReused, Unavailable, WriteFailed
from timeline.model import Copies, Entry, Kind, Message, Timeline, conversation_id
from timeline.sequence import Record, SequenceAllocator
from timeline.store import Page, Store, WriteResult

log = logging.getLogger(__name__)

#: How often allocation may find counters missing (seeding them in between) before giving up;
#: more than once means Redis is losing data while we work.
_SEED_ROUNDS = 3
#: How often a write may find its sequences taken by other messages (a counter behind the
#: store) before giving up; each move starts above the store's highest, so one is the rule.
_MOVE_ROUNDS = 5
#: Pages one read may go through when placeholders, expired entries or late writes are in
#: the way.
_READ_PAGES = 5
#: Copies one store write carries at most: a bigger fan-out is written in several, so that
#: each stays well within the store's operation timeout and the request's deadline is looked
#: at between them.
_WRITE_ROWS = 50_000
#: Placeholders a reader stores at once: a bigger gap (data another system thinned out) is
#: sealed a chunk at a time, never in one insert that a timeout would keep failing.
_SEAL_CHUNK = 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SyncResult:
    """A page of a member's sync timeline, the newest sequence allocated to it, and the
    lowest it can still return."""

    latest_seq: int
    min_seq: int
    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of history read backwards, and where the next (older) page ends."""

    entries: list[Entry]
    next_before: int  # the lowest sequence returned; 0 when nothing older exists


@dataclass(frozen=True, slots=True)
class Delivery:
    """Messages stored: who has no copy, and where each timeline's range starts."""

    failed: list[str]
    plan: _Plan

    def sequences(self, member: str) -> list[int]:
        """The member's sequences for the messages, in order."""
        position = self.plan.ids.index(member, 1)
        first = self.plan.firsts[position]
        return list(range(first, first + self.plan.count))


@dataclass(frozen=True, slots=True)
class Policy:
    """The service's knobs, from the settings."""

    gap_grace_ms: int = 6_000
    request_deadline_ms: int = 3_000
    record_ttl_ms: int = 86_400_000
    write_attempts: int = 4
    retry_backoff_ms: int = 100
    retry_budget_ms: int = 1000
    sync_retention_ms: int = 0
    history_retention_ms: int = 0

    def retention_ms(self, kind: Kind) -> int:
        return self.sync_retention_ms if kind is Kind.SYNC else self.history_retention_ms


@dataclass(slots=True)
class _Plan:
    """What one request stores, by timeline position: 0 is the history timeline, then each
    recipient's sync timeline; timeline p gets the messages at firsts[p], firsts[p] + 1..."""

    ids: list[str]
    firsts: list[int]
    messages: Sequence[Message]
    created_at_ms: int
    mid: str
    record: Record | None
    deadline_ms: int  # no store write starts after this (the request's deadline)

    @property
    def count(self) -> int:
        return len(self.messages)

    @staticmethod
    def kind(position: int) -> Kind:
        return Kind.HISTORY if position == 0 else Kind.SYNC

    def timeline(self, position: int) -> Timeline:
        return Timeline(self.kind(position), self.ids[position])

    def copies(self, positions: Sequence[int] | None) -> Copies:
        """The copies of these positions; None: every sync timeline (the usual case)."""
        if positions is None:
            ids, firsts = self.ids[1:], self.firsts[1:]
        else:
            ids = [self.ids[p] for p in positions]
            firsts = [self.firsts[p] for p in positions]
        return Copies(ids, firsts, self.messages, self.created_at_ms, self.mid)

    def keys(self, position: int) -> list[tuple[str, int]]:
        first = self.firsts[position]
        return [(self.ids[position], first + j) for j in range(self.count)]


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
        self,
        sender: str,
        receiver: str,
        messages: Sequence[Message],
        client_msg_id: str | None = None,
    ) -> list[int]:
        """One-to-one messages, in order; returns the receiver's sync sequences for them."""
        recipients = [sender] if sender == receiver else [sender, receiver]
        conversation = conversation_id(sender, receiver)
        delivery = self._deliver(conversation, recipients, messages, client_msg_id)
        if delivery.failed:
            raise WriteFailed(
                "message could not be stored for every recipient; retry with the same "
                "client_msg_id",
                failedMembers=delivery.failed,
            )
        return delivery.sequences(receiver)

    def send_group(
        self,
        group: str,
        members: Sequence[str],
        messages: Sequence[Message],
        client_msg_id: str | None = None,
    ) -> list[str]:
        """Group messages to the listed (distinct) members; returns those not written."""
        return self._deliver(group, members, messages, client_msg_id).failed

    def _deliver(
        self,
        history_id: str,
        recipients: Sequence[str],
        messages: Sequence[Message],
        client_msg_id: str | None,
    ) -> Delivery:
        """Allocate a contiguous range for the history timeline and every recipient at once,
        then store it all."""
        deadline_ms = self._clock_ms() + self.policy.request_deadline_ms
        if (state := self.store.readiness()) != "ready":
            # Before allocating: sequences allocated for a write that cannot happen would be
            # holes that readers wait on.
            raise Unavailable(f"store is not ready: indexes {state} (see /readyz)", indexes=state)
        record = None
        mid = uuid.uuid4().hex
        if client_msg_id is not None:
            # A retry may list the members, or the messages' keys, in another order.
            recipients = sorted(recipients)
            canonical = [
                orjson.dumps(m.document, option=orjson.OPT_SORT_KEYS).decode() for m in messages
            ]
            record = Record(
                key=self.allocator.record_key(history_id, client_msg_id),
                fingerprint=_digest(history_id, *recipients, "\x01", *canonical)[:16],
                ttl_ms=self.policy.record_ttl_ms,
            )
            # The same for every attempt, so each can tell the copies of another apart.
            mid = _digest(history_id, client_msg_id)[:32]
        ids = [history_id, *recipients]
        count = len(messages)
        lasts, replay_age = self._allocate(ids, count, record)
        plan = _Plan(
            ids=ids,
            firsts=lasts if count == 1 else [last - count + 1 for last in lasts],
            messages=messages,
            created_at_ms=self._clock_ms(),
            mid=mid,
            record=record,
            deadline_ms=deadline_ms,
        )
        failed = [ids[position] for position in self._store(plan, replay_age)]
        metrics.FAN_OUT.observe(len(recipients))
        if failed:
            metrics.FAILED_MEMBERS.inc(len(failed))
            log.warning(
                "%d of %d sync copies not stored (timeline %s seq %d)",
                len(failed),
                len(recipients),
                history_id,
                plan.firsts[0],
            )
        return Delivery(failed=failed, plan=plan)

    def _allocate(
        self, ids: list[str], count: int, record: Record | None
    ) -> tuple[list[int], int | None]:
        """One EVALSHA in the steady state; seeds missing counters from the store first.

        Returns the last sequence of each timeline's range, and, when they come from the
        record of an earlier attempt (a replay), how old that record is (ms).
        """
        keys = self.allocator.keys(ids[0], ids[1:])
        for _ in range(_SEED_ROUNDS):
            allocation = self.allocator.allocate(keys, count, record, self._clock_ms())
            if allocation.replayed:
                assert record is not None
                if allocation.fingerprint != record.fingerprint:
                    raise ClientMsgIdReused(
                        "client_msg_id was already used for another message in this conversation"
                    )
                return allocation.lasts, self._clock_ms() - allocation.allocated_ms
            if not allocation.missing:
                return allocation.lasts, None
            self._seed([Timeline(_Plan.kind(p), ids[p]) for p in allocation.missing])
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

    def _store(self, plan: _Plan, replay_age: int | None) -> list[int]:
        """Write until every timeline's copies are stored, retrying what may succeed.

        Returns the positions whose copies could not be stored (the plan's firsts say where
        the others finally are: some may have moved). Raises when the history copies cannot
        be stored: without them no sync copy is attempted. Once they are stored the request
        tries hard to finish (store errors and Redis hiccups alike are retried with backoff,
        up to write_attempts), because a client retry is only idempotent while Redis keeps
        the message's record; before, it gives up once retry_budget_ms is spent.
        """
        total = len(plan.ids)
        todo = set(range(total))  # positions whose copies are not all stored yet
        # Partly stored by an attempt a device may have read (an earlier one, or a write of
        # this one that failed): the rest may only go where it belongs, never move whole.
        pinned: set[int] = set(todo) if replay_age is not None else set()
        given_up: set[int] = set()  # pinned, and refused there: reported, not moved
        if replay_age is not None and replay_age >= self.policy.gap_grace_ms:
            # A replay older than the grace period must not fill the holes its first attempt
            # left: readers may have passed them. What is stored stays; the rest moves.
            self._settle(plan, [0], todo, True, pinned, given_up)
            self._settle(plan, list(range(1, total)), todo, True, pinned, given_up)
        failures = moves = 0
        budget_end = self._clock_ms() + self.policy.retry_budget_ms
        per_write = max(1, _WRITE_ROWS // plan.count)  # timelines whose copies one write takes
        while todo:
            if self._clock_ms() >= plan.deadline_ms:
                # Past the request's deadline no write starts (readers wait out only so
                # long): the caller is told what is not stored, and retries it.
                if 0 in todo:
                    raise Unavailable("the request ran out of time before its history copy")
                return sorted(todo | given_up)
            history = plan.copies([0]) if 0 in todo else None
            pending = len(todo) - (0 in todo)
            everyone = pending == total - 1 and pending <= per_write
            positions = range(1, total) if everyone else sorted(todo - {0})[:per_write]
            sync = plan.copies(None if everyone else positions) if positions else None
            try:
                result = self.store.write(history, sync)
                self._count_written(history, sync, result)
                if result.history_taken:
                    taken = [0]
                elif not result.sync_taken:
                    taken = []
                    if everyone:
                        todo.clear()  # the usual case: one write stored it all
                    else:
                        todo.difference_update(positions)
                        todo.discard(0)
                else:
                    assert sync is not None
                    taken = sorted({positions[sync.timeline_of(i)] for i in result.sync_taken})
                    todo.difference_update(set(positions) - set(taken))
                    todo.discard(0)
                if not taken:
                    continue
                if self._settle(plan, taken, todo, False, pinned, given_up):
                    moves += 1
            except _MoveLost as lost:
                # Without a record a second move could skip the sequences a lost reply
                # gave: report these copies instead.
                if 0 in todo:
                    raise Unavailable("history sequence could not be moved") from lost
                return sorted(todo | given_up)
            except Unavailable as exc:
                if getattr(exc, "history_stored", False) and 0 in todo:
                    todo.discard(0)  # the store got the history copy before failing
                    metrics.HISTORY_WRITTEN.inc(plan.count)
                pinned.update(todo)  # the failed write may have stored (and shown) a part
                failures += 1
                backoff_ms = self.policy.retry_backoff_ms * 2 ** (failures - 1)
                nothing_stored = 0 in todo
                if nothing_stored and self._clock_ms() + backoff_ms > budget_end:
                    raise  # nothing written yet: a fast 503 costs the client nothing
                out_of_time = self._clock_ms() + backoff_ms >= plan.deadline_ms
                if failures >= self.policy.write_attempts or out_of_time:
                    if nothing_stored:
                        raise
                    return sorted(todo | given_up)
                self._sleep(backoff_ms / 1000)
            if moves > _MOVE_ROUNDS:
                # Outside the try: this is not a store failure to retry.
                if 0 in todo:
                    raise Unavailable("sequences keep being taken by other messages")
                return sorted(todo | given_up)
        if 0 in given_up:
            raise Unavailable("history copies could not all be stored")
        return sorted(given_up)

    def _settle(
        self,
        plan: _Plan,
        positions: list[int],
        todo: set[int],
        moving: bool,
        pinned: set[int],
        given_up: set[int],
    ) -> bool:
        """Look at what is stored of these timelines' copies (one kind at a time), after a
        write found some of their sequences taken (or, with `moving`, for a stale replay).

        All the message's: done. None of them: the copies move to new sequences above the
        store (another message, a placeholder or a floor holds the range), and the range
        left behind is sealed. Some of them, written by this request's own successful write
        a moment ago next to another message's copy: the range moves whole (its own copies
        removed first), so that its messages stay together and in order. Some of them
        otherwise (a replay of an earlier attempt, a write of this request that failed
        partway, or nothing else holding the rest): the timeline is pinned, since a reader
        may already have the part that is stored; the rest is written where it belongs,
        copy by copy, and if that is refused it is given up (reported to the caller), never
        moved: moving would deliver the stored part twice. Returns whether anything moved.
        """
        if not positions:
            return False
        kind = plan.kind(positions[0])
        keys = [key for p in positions for key in plan.keys(p)]
        owners = self.store.owners(kind, keys)
        mid = plan.mid
        to_move: list[int] = []
        for p in positions:
            found = [owners.get(key) for key in plan.keys(p)]
            ours = [owner == mid for owner in found]
            if all(ours):
                todo.discard(p)  # stored, by this message
            elif not any(ours):
                to_move.append(p)
            elif moving or p in pinned or all(owner in (mid, None) for owner in found):
                pinned.add(p)
                todo.discard(p)
                if not self._fill(plan, p, ours):
                    given_up.add(p)  # refused where it belongs, and it must not move
            else:
                # Written by this very request a moment ago, next to another message's copy:
                # the range moves whole, so that its messages stay together and in order.
                to_move.append(p)
        if not to_move:
            return False
        own = [key for p in to_move for key in plan.keys(p) if owners.get(key) == mid]
        if own:
            self.store.unwrite(kind, own, mid)
        left = [key for p in to_move for key in plan.keys(p)]
        try:
            self._move(plan, to_move)
        except Unavailable as exc:
            todo.update(to_move)
            if plan.record is None:
                raise _MoveLost from exc
            raise
        todo.update(to_move)
        # The sequences left behind will never hold these messages: seal them at once, so
        # that readers step over them without waiting out the grace period. Should this
        # fail, readers seal them themselves after the grace period.
        with contextlib.suppress(Unavailable):
            self.store.seal(kind, left, self._clock_ms())  # skips those another message holds
        return True

    def _fill(self, plan: _Plan, position: int, stored: list[bool]) -> bool:
        """Write a pinned timeline's missing copies where they belong, one by one (the rest
        is stored already); whether all of them went in."""
        first = plan.firsts[position]
        for j, done in enumerate(stored):
            if done:
                continue
            if self._clock_ms() >= plan.deadline_ms:
                return False  # reported; the caller's retry fills it in
            copy = Copies(
                [plan.ids[position]], [first + j], [plan.messages[j]], plan.created_at_ms, plan.mid
            )
            history, sync = (copy, None) if position == 0 else (None, copy)
            result = self.store.write(history, sync)
            if result.history_taken or result.sync_taken:
                owner = self.store.owners(plan.kind(position), [(plan.ids[position], first + j)])
                if owner.get((plan.ids[position], first + j)) != plan.mid:
                    return False
        return True

    @staticmethod
    def _count_written(history: Copies | None, sync: Copies | None, result: WriteResult) -> None:
        """Count the documents this write inserted (a taken history means none were)."""
        if result.history_taken:
            return
        if history is not None:
            metrics.HISTORY_WRITTEN.inc(len(history))
        written = (len(sync) if sync is not None else 0) - len(result.sync_taken)
        if written:
            metrics.SYNC_WRITTEN.inc(written)

    def _move(self, plan: _Plan, positions: list[int]) -> None:
        """New ranges, above the store's highest, for timelines another message holds."""
        metrics.SEQUENCE_REPAIRS.labels("moved").inc(len(positions))
        first = plan.timeline(positions[0])
        log.warning(
            "%d timeline(s) moved to new sequences (first: %s %s seq %d): taken or stale",
            len(positions),
            first.kind,
            first.id,
            plan.firsts[positions[0]],
        )
        count = plan.count
        floors = self.store.max_seqs(first.kind, [plan.ids[p] for p in positions])
        moves = [
            (plan.timeline(p), p, plan.firsts[p] + count - 1, floors[plan.ids[p]])
            for p in positions
        ]
        lasts = self.allocator.reallocate(moves, count, plan.record)
        for p, last in zip(positions, lasts, strict=True):
            plan.firsts[p] = last - count + 1

    def ack(self, member: str, seq: int) -> int:
        """Remove the member's sync entries up to `seq`; returns the new minSeq."""
        latest = self._latest(member)
        # Whatever the ack removes is at most min(seq, latest): that floor covers it all and
        # never runs ahead of what was allocated (a lost counter continues above it).
        self.store.ack(member, seq, min(seq, latest))
        metrics.ACKED.inc()
        cutoff = self._cutoff(Kind.SYNC)
        first = self.store.page(Kind.SYNC, member, 0, 0, cutoff)
        return self._min_seq(Kind.SYNC, member, first, latest, cutoff)

    # --- reading -------------------------------------------------------------------------

    def _cutoff(self, kind: Kind) -> int:
        """Entries created before this (ms) have expired; 0: none expire."""
        retention = self.policy.retention_ms(kind)
        return self._clock_ms() - retention if retention else 0

    def _latest(self, member: str) -> int:
        latest = self.allocator.latest(Timeline(Kind.SYNC, member))
        if latest is None:  # a new member, or Redis lost the counter: the store knows
            latest = self.store.max_seqs(Kind.SYNC, [member]).get(member, 0)
        return latest

    def _min_seq(self, kind: Kind, timeline_id: str, first: Page, latest: int, cutoff: int) -> int:
        """The lowest sequence the timeline can still return: its lowest entry held (or
        latest + 1 when none is), unless a sequence between the floor and it may still be
        written, by a writer still in flight (then floor + 1)."""
        lowest = first.lowest
        top = lowest.seq if lowest is not None else latest + 1
        floor = first.floor
        if top <= floor + 1:
            return max(top, floor + 1)
        if (
            lowest is not None
            and self._clock_ms() - lowest.created_at_ms >= self.policy.gap_grace_ms
        ):
            return top  # whatever is missing below an old entry was never going to arrive
        if self.store.gap(kind, timeline_id, floor + 1, top, cutoff).hidden == top - floor - 1:
            return top  # all there, only hidden (expired, placeholders)
        return floor + 1  # missing, or written since the page was read: nothing to skip

    def sync(self, member: str, last_read: int, count: int) -> SyncResult:
        """The member's sync entries after last_read, the newest sequence allocated, and
        the lowest sequence the timeline can still return (minSeq)."""
        cutoff = self._cutoff(Kind.SYNC)
        first = self.store.page(Kind.SYNC, member, last_read, count, cutoff)
        entries = self._readable(Kind.SYNC, member, last_read, count, cutoff, first)
        # Store first, then Redis: latestSeq is then never below the last entry returned.
        latest = self._latest(member)
        if entries and entries[-1].seq > latest:
            # A counter behind the store (the next send repairs it): the store says how far
            # the timeline goes, so that a client does not stop paging at a short page.
            latest = max(entries[-1].seq, self.store.max_seqs(Kind.SYNC, [member])[member])
        min_seq = self._min_seq(Kind.SYNC, member, first, latest, cutoff)
        return SyncResult(latest_seq=latest, min_seq=min_seq, entries=entries)

    def history(self, conversation: str, last_read: int, count: int) -> list[Entry]:
        """A conversation's history entries after last_read, ascending."""
        cutoff = self._cutoff(Kind.HISTORY)
        first = self.store.page(Kind.HISTORY, conversation, last_read, count, cutoff)
        return self._readable(Kind.HISTORY, conversation, last_read, count, cutoff, first)

    def history_backward(self, conversation: str, before: int, count: int) -> HistoryPage:
        """Up to `count` history entries below `before` (0: from the newest), newest first."""
        cutoff = self._cutoff(Kind.HISTORY)
        page = self.store.read_backward(Kind.HISTORY, conversation, before, count + 1, cutoff)
        entries = page[:count]
        next_before = entries[-1].seq if len(page) > count else 0
        return HistoryPage(entries=entries, next_before=next_before)

    def _readable(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        count: int,
        cutoff: int,
        first: Page,
    ) -> list[Entry]:
        """Up to `count` entries after `after`, never past a hole a write may still fill.

        What lies at or below the floor (acked, purged) is gone. The store returns only what
        a client may see; a gap between two such entries is looked into: all of it hidden
        (placeholders, expired entries), it is stepped over; a visible document there was
        stored after the page was read, so the page is read again. A sequence is allocated
        before its document is written, so a reader can see seq 7 stored while seq 6 is
        still being written; handing out 7 would move the client past 6 for good. So a
        read stops before a missing sequence while the entry after it is younger than the
        grace period (no request outlives it). An older one is sealed with placeholders
        before it is stepped over, so that a write arriving even later finds it taken and
        moves above, where readers will see it.
        """
        entries: list[Entry] = []
        expected = max(after, first.floor) + 1
        now = self._clock_ms()
        page: list[Entry] | None = first.entries if expected == after + 1 else None
        for _ in range(_READ_PAGES):
            if page is None:
                page = self.store.read(kind, timeline_id, expected - 1, count, cutoff)
            reread = False
            for entry in page:
                if entry.seq != expected:
                    gap = self.store.gap(kind, timeline_id, expected, entry.seq, cutoff)
                    if gap.hidden < entry.seq - expected:
                        if gap.present > gap.hidden:
                            reread = True  # stored since the page was read: read it again
                            break
                        if now - entry.created_at_ms < self.policy.gap_grace_ms:
                            return entries  # a write below it may still be in flight
                        closed = self._close(kind, timeline_id, expected, entry, first, cutoff)
                        if closed is None:
                            return entries  # what comes before the hole is safe to hand out
                        expected = closed
                        reread = True  # sealed, unless a late write got there first
                        break
                entries.append(entry)
                if len(entries) == count:
                    return entries
                expected = entry.seq + 1
            if not reread and len(page) < count:
                return entries  # the end of the timeline
            page = None
        return entries

    def _close(
        self, kind: Kind, timeline_id: str, low: int, entry: Entry, first: Page, cutoff: int
    ) -> int | None:
        """Close the old gap [low, entry.seq) for good; returns where reading goes on (all
        below it is hidden), or None when the store refused.

        Placeholders where nothing is stored: each sequence is sealed or written, whichever
        comes first, so a late write cannot land where readers have passed. A gap too big
        to seal at once is sealed a chunk per call, from the first chunk not sealed yet;
        only one with nothing visible below it (data another system removed) has the floor
        raised over it in one step instead.
        """
        now = self._clock_ms()
        try:
            if entry.seq - low <= _SEAL_CHUNK:
                self.store.seal(kind, [(timeline_id, seq) for seq in range(low, entry.seq)], now)
                return low  # read the gap again: sealed now, unless a late write got there
            if first.lowest is not None and entry.seq == first.lowest.seq:
                self.store.raise_floor(kind, timeline_id, entry.seq - 1)
                return entry.seq
            start = low
            while start < entry.seq:
                end = min(entry.seq, start + _SEAL_CHUNK)
                if self.store.gap(kind, timeline_id, start, end, cutoff).hidden < end - start:
                    self.store.seal(kind, [(timeline_id, seq) for seq in range(start, end)], now)
                    break
                start = end  # sealed by an earlier read
        except Unavailable:
            return None
        return start


class _MoveLost(Exception):
    """A move without an idempotency record failed: it must not be retried."""
