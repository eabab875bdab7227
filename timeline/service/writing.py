"""The Writer: send and send_group. One allocation (one script call per bucket of
counters), the store's record of an idempotent message, then as few bulk writes as the copies
need."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import orjson

from timeline import metrics
from timeline.allocator import Record
from timeline.errors import ClientMsgIdReused, Unavailable, WriteFailed
from timeline.model import Conversation, Copies, Kind, Message, Timeline, conversation_id, peer_of
from timeline.service.common import Parts, _Allocated, _Plan
from timeline.service.repairing import Repairer, _MoveLost
from timeline.store import Claim, WriteResult

log = logging.getLogger("timeline.service")

#: How often allocation may find counters missing (seeding them in between) before giving up;
#: more than once means Redis is losing data while we work.
_SEED_ROUNDS = 3
#: How often a write may find its sequences taken by other messages (a counter behind the
#: store) before giving up; each move starts above the store's highest, so one is the rule.
_MOVE_ROUNDS = 5
#: Copies one store write carries at most: a bigger fan-out is written in several, so that
#: each stays well within the store's operation timeout and the request's deadline is looked
#: at between them.
_WRITE_ROWS = 50_000


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _firsts(lasts: Sequence[int], count: int) -> list[int]:
    """Where each range starts (0 where nothing was allocated)."""
    return [last - count + 1 if last else 0 for last in lasts]


class _Claimed(Exception):
    """A write that carried the claim stored nothing: the store holds another record of the
    message, `claim`."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim.mid)
        self.claim = claim


@dataclass(slots=True)
class _Attempt:
    """One attempt at storing an idempotent message: its timelines (history first), how many
    messages, its record (what Redis and the store know it by), its mid, and the sequences it
    holds (`allocated`: what Redis gave it, until the store's record decides otherwise)."""

    timelines: list[Timeline]
    count: int
    record: Record
    mid: str
    allocated: _Allocated

    def fresh(self) -> dict[int, int]:
        """The positions this attempt allocated itself (not replayed), with their lasts."""
        allocated = self.allocated
        return {
            p: last
            for p, last in enumerate(allocated.lasts)
            if p not in allocated.replayed and p not in allocated.failed
        }


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


class Writer:
    """Stores a request's copies: allocate, record, write; the Repairer repairs what it
    finds on the way."""

    def __init__(self, parts: Parts, repairs: Repairer) -> None:
        self.allocator, self.store, self.policy = parts.allocator, parts.store, parts.policy
        self._clock_ms, self._sleep = parts.clock_ms, parts.sleep
        self._notify = parts.notify
        self.repairs = repairs

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
        delivery = self._deliver(
            conversation, recipients, messages, client_msg_id, Conversation.SINGLE, sender
        )
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
        sender: str = "",
    ) -> list[str]:
        """Group messages to the listed (distinct) members; returns those not written.
        `sender` (extension): who sent them, whose read position moves to them."""
        return self._deliver(
            group, members, messages, client_msg_id, Conversation.GROUP, sender
        ).failed

    def _deliver(
        self,
        history_id: str,
        recipients: Sequence[str],
        messages: Sequence[Message],
        client_msg_id: str | None,
        kind: Conversation = Conversation.GROUP,
        sender: str = "",
    ) -> Delivery:
        """Allocate a contiguous range for the history timeline and every recipient at once,
        then store it all."""
        deadline_ms = self._clock_ms() + self.policy.request_deadline_ms
        if (state := self.store.readiness()) != "ready":
            # Before allocating: sequences allocated for a write that cannot happen would be
            # holes that readers wait on.
            raise Unavailable(f"store is not ready: indexes {state} (see /readyz)", indexes=state)
        record = None
        if client_msg_id is None:
            mid = uuid.uuid4().hex
        else:
            # A retry may list the members, or the messages' keys, in another order.
            recipients = sorted(recipients)
            canonical = [
                orjson.dumps(m.document, option=orjson.OPT_SORT_KEYS).decode() for m in messages
            ]
            record = Record(
                conversation=history_id,
                client_msg_id=client_msg_id,
                fingerprint=_digest(
                    history_id,
                    *recipients,
                    "\x01",
                    *canonical,
                    *(("\x02", sender) if sender and kind is Conversation.GROUP else ()),
                )[:16],
                ttl_ms=min(self.policy.record_redis_ttl_ms, self.policy.record_ttl_ms),
            )
            # The same for every attempt, so each can tell the copies of another apart.
            mid = _digest(history_id, client_msg_id)[:32]
        ids = [history_id, *recipients]
        timelines = [
            Timeline(Kind.HISTORY, history_id),
            *map(Timeline, itertools.repeat(Kind.SYNC), recipients),
        ]
        count = len(messages)
        allocated = self._allocate(timelines, count, record)
        claim = first = attempt = None
        if record is not None:
            attempt = _Attempt(timelines, count, record, mid, allocated)
            if allocated.replayed or allocated.failed:
                # A retry (or a bucket that failed): the store's record decides before
                # anything is written.
                claim = self._claim(attempt)
                allocated = attempt.allocated
            else:
                # A first attempt, as far as Redis knows: the claim is stored by the first
                # write, ahead of the copies (on SQLite in the same transaction).
                claim = first = self._claim_of(attempt)
        plan = _Plan(
            ids=ids,
            timelines=timelines,
            firsts=_firsts(allocated.lasts, count),
            messages=messages,
            created_at_ms=self._clock_ms(),
            mid=mid,
            record=record,
            claim=claim,
            deadline_ms=deadline_ms,
            conversation=kind,
            sender=sender,
            peers=(
                ["", *(peer_of(history_id, member) for member in recipients)]
                if kind is Conversation.SINGLE
                else None
            ),
        )
        try:
            positions = self._store(plan, self._ages(allocated), allocated.failed, first)
        except _Claimed as claimed:
            # The store holds another record of this message (Redis forgot it, or came back
            # without it): nothing was written. Settled on the store's record, then written.
            assert attempt is not None
            assert first is not None
            claim = self._settled(attempt, first, claimed.claim)
            allocated = attempt.allocated
            plan = dataclasses.replace(plan, firsts=_firsts(allocated.lasts, count), claim=claim)
            positions = self._store(plan, self._ages(allocated), allocated.failed)
        failed = [ids[p] for p in positions]
        unwritten = set(positions)
        # Readers waiting for these timelines read again (after the copies are stored).
        self._notify([t for p, t in enumerate(timelines) if p not in unwritten])
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

    def _allocate(self, timelines: list[Timeline], count: int, record: Record | None) -> _Allocated:
        """One script call per bucket of counters (on one Redis: one EVALSHA) in the steady
        state; counters found missing are seeded from the store and their buckets asked
        again. A bucket that failed: without a record its members are reported (the history
        timeline's: 503); with one the request answers 503, and its retry replays."""
        now = self._clock_ms()
        lasts: dict[int, int] = {}
        replayed: dict[int, int] = {}
        failed: set[int] = set()
        allocated_ms = now
        positions: list[int] | None = None
        for _ in range(_SEED_ROUNDS):
            allocation = self.allocator.allocate(timelines, count, record, now, positions)
            lasts.update(allocation.lasts)
            failed.update(allocation.failed)
            for replay in allocation.replays:
                assert record is not None
                if replay.fingerprint != record.fingerprint or not all(
                    p in lasts for p in replay.positions
                ):
                    fresh = {p: last for p, last in lasts.items() if p not in replayed}
                    for p in replay.positions:
                        fresh.pop(p, None)
                    self._refuse_reused(timelines, count, record, fresh)
                allocated_ms = min(allocated_ms, replay.allocated_ms)
                replayed.update(dict.fromkeys(replay.positions, replay.allocated_ms))
            if not allocation.pending:
                break
            self.repairs.seed([timelines[p] for p in allocation.missing])
            positions = allocation.pending
        else:
            if record is None:
                self.repairs.abandon(timelines, count, lasts)
            raise Unavailable("sequence counters keep disappearing from redis")
        if failed and (record is not None or 0 in failed):
            if record is None:
                # Nothing will be written: what was allocated is sealed at once, so that
                # readers need not wait for it (with a record the retry writes it).
                self.repairs.abandon(timelines, count, lasts)
            raise Unavailable("sequence allocator (redis) could not allocate every timeline")
        return _Allocated(
            lasts=[lasts.get(p, 0) for p in range(len(timelines))],
            replayed=replayed,
            failed=failed,
            allocated_ms=allocated_ms,
        )

    def _claim(self, attempt: _Attempt) -> Claim:
        """Make the store's record of an idempotent message the last word on its sequences,
        before any copy is written: the first attempt's record stands, whatever Redis
        forgot since (a failover to a replica that lagged, a restart without persistence,
        FLUSHALL) and so allocated again (see _settled)."""
        mine = self._claim_of(attempt)
        return self._settled(attempt, mine, self.store.claim(mine, self._clock_ms()))

    def _claim_of(self, attempt: _Attempt) -> Claim:
        """This attempt's claim: what it holds, for the store's time to live."""
        return Claim(
            mid=attempt.mid,
            fingerprint=attempt.record.fingerprint,
            lasts=tuple(attempt.allocated.lasts),
            allocated_ms=attempt.allocated.allocated_ms,
            expires_ms=self._clock_ms() + self.policy.record_ttl_ms,
        )

    def _settled(self, attempt: _Attempt, mine: Claim, stored: Claim) -> Claim:
        """The sequences to write at, once the store answered this attempt's claim `mine`
        with the record it holds, `stored`.

        The store's record is the one authority on where an idempotent message's copies go:
        every write of them goes where it says (a first attempt stores it with its first
        write; a move changes it by compare-and-set first: Repairer._move). Whatever Redis
        replayed or allocated is a hint. So every attempt that reads the record adopts it,
        whatever it did before (concurrent retries all end at the same sequences), and gives
        back or seals what it allocated itself and the record does not hold: nothing is
        written there. A range it only replayed belongs to the attempt that allocated it,
        which gives it back itself (or, if that attempt died, readers seal it after the
        grace period). The attempt holds the record's sequences afterwards."""
        if stored == mine:
            return stored  # the usual case: the first attempt, now on record
        timelines, count = attempt.timelines, attempt.count
        if stored.fingerprint != mine.fingerprint or len(stored.lasts) != len(mine.lasts):
            self._refuse_reused(timelines, count, attempt.record, attempt.fresh())
        forgotten = {p: last for p, last in attempt.fresh().items() if last != stored.lasts[p]}
        if forgotten:
            self.repairs.abandon(timelines, count, forgotten)
            metrics.SEQUENCE_REPAIRS.labels("restored").inc(len(forgotten))
            log.warning(
                "message %s: %d of its timelines keep the sequences the store recorded "
                "(redis forgot them, or came back with an older record)",
                attempt.mid,
                len(forgotten),
            )
        attempt.allocated = _Allocated(
            lasts=list(stored.lasts),
            replayed=dict.fromkeys(range(len(timelines)), stored.allocated_ms),
            failed=set(),
            allocated_ms=stored.allocated_ms,
        )
        return stored

    def _refuse_reused(
        self, timelines: list[Timeline], count: int, record: Record, fresh: dict[int, int]
    ) -> NoReturn:
        """409: the client_msg_id names another message. What this attempt allocated is
        given back (or sealed), and the records it wrote beside it deleted: they would make
        the first message's own retry look like another message."""
        self.repairs.abandon(timelines, count, fresh)
        if fresh:
            with contextlib.suppress(Unavailable):
                self.allocator.forget(timelines, record, set(fresh))
        raise ClientMsgIdReused(
            "client_msg_id was already used for another message in this conversation"
        )

    def _ages(self, allocated: _Allocated) -> dict[int, int]:
        """The positions an earlier attempt allocated, with how long ago (ms)."""
        now = self._clock_ms()
        return {p: now - at for p, at in allocated.replayed.items()}

    def _store(
        self,
        plan: _Plan,
        replayed: dict[int, int],
        failed: set[int],
        claim: Claim | None = None,
    ) -> list[int]:
        """_write_all; and whatever ends it (its deadline, the store failing, a lost race),
        what this attempt allocated itself and did not write is given back or sealed before
        the request answers (_give_up): readers wait out the gap grace only for a writer that
        died, never for one that gave up."""
        todo = set(range(len(plan.ids))) - failed
        # Partly stored by an attempt a device may have read (an earlier one, or a write of
        # this one that failed): the rest may only go where it belongs, never move whole.
        pinned: set[int] = set(replayed) & todo
        try:
            left = self._write_all(plan, replayed, failed, claim, todo, pinned)
        except _Claimed:
            raise  # nothing written: the caller settles on the store's record
        except Exception:
            self._give_up(plan, todo, replayed, failed)
            raise
        if left:
            self._give_up(plan, set(left) - failed, replayed, failed)
        return left

    def _give_up(
        self,
        plan: _Plan,
        unwritten: set[int],
        replayed: dict[int, int],
        failed: set[int],
    ) -> None:
        """Give back or seal the ranges of `unwritten` that this attempt allocated itself:
        fresh ones, and those it moved to."""
        mine = (unwritten - set(replayed) - failed) | (unwritten & plan.moved)
        own = {p: plan.firsts[p] + plan.count - 1 for p in mine if plan.firsts[p]}
        if not own:
            return
        tried = plan.tried
        never = {p: last for p, last in own.items() if p not in tried}
        # A range a write was sent to may hold a part (a failed write on MongoDB). Without a
        # record nobody writes there again: sealed around that part. With one, the client's
        # retry fills it in place (the store's record points there): left as it is. Nor is
        # anything sealed after the store failed: the 503 stays fast, and readers seal such
        # a range after the grace period, as for a writer that died.
        sealed = (
            {}
            if plan.record is not None or plan.store_failed
            else {p: own[p] for p in own if p in tried}
        )
        if never or sealed:
            metrics.SEQUENCE_REPAIRS.labels("abandoned").inc(len(never) + len(sealed))
        self.repairs.abandon(plan.timelines, plan.count, never)
        self.repairs.abandon(plan.timelines, plan.count, sealed, release=False)

    def _write_all(
        self,
        plan: _Plan,
        replayed: dict[int, int],
        failed: set[int],
        claim: Claim | None,
        todo: set[int],
        pinned: set[int],
    ) -> list[int]:
        """Write until every timeline's copies are stored, retrying what may succeed.
        `replayed`: the positions an earlier attempt allocated, with how long ago (ms);
        `failed`: those never allocated (reported, never written); `claim`: to be stored
        with the first write (raises _Claimed, nothing written, when the store holds
        another record of the message).

        Returns the positions whose copies could not be stored (the plan's firsts say where
        the others finally are: some may have moved). Raises when the history copies cannot
        be stored: without them no sync copy is attempted. Once they are stored the request
        tries hard to finish (store errors and Redis hiccups alike are retried with backoff,
        up to write_attempts), because a client retry is only idempotent while Redis keeps
        the message's record; before, it gives up once retry_budget_ms is spent.
        """
        total = len(plan.ids)
        # `todo`: positions whose copies are not all stored yet (those whose allocation
        # failed are reported, never written); `pinned`: see _store.
        given_up: set[int] = set(failed)  # pinned and refused there, or never allocated
        stale = sorted(p for p in pinned if replayed[p] >= self.policy.gap_grace_ms)
        if stale:
            # A replay older than the grace period must not fill the holes its first attempt
            # left: readers may have passed them. What is stored stays; the rest moves.
            self.repairs.settle(plan, [p for p in stale if p == 0], todo, True, pinned, given_up)
            self.repairs.settle(plan, [p for p in stale if p != 0], todo, True, pinned, given_up)
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
            history = plan.one(0, plan.messages) if 0 in todo else None
            pending = len(todo) - (0 in todo)
            everyone = pending == total - 1 and pending <= per_write
            positions = range(1, total) if everyone else sorted(todo - {0})[:per_write]
            sync = plan.copies(None if everyone else positions) if positions else None
            try:
                result = self.store.write(history, sync, claim, self._clock_ms())
                if claim is not None:
                    if result.claimed is not None:
                        raise _Claimed(result.claimed)  # another record: nothing written
                    if result.history_taken:
                        # Nothing written, the claim neither: stored on its own, before
                        # anything is looked at or moved.
                        stored = self.store.claim(claim, self._clock_ms())
                        if stored != claim:
                            raise _Claimed(stored)
                    claim = None  # stored
                self._count_written(history, sync, result)
                if result.history_taken:
                    taken = [0]
                    plan.tried.add(0)
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
                    plan.tried.update(taken)
                    todo.difference_update(set(positions) - set(taken))
                    todo.discard(0)
                if not taken:
                    continue
                if self.repairs.settle(plan, taken, todo, False, pinned, given_up):
                    moves += 1
            except _MoveLost as lost:
                # Without a record a second move could skip the sequences a lost reply
                # gave: report these copies instead.
                if 0 in todo:
                    raise Unavailable("history sequence could not be moved") from lost
                return sorted(todo | given_up)
            except Unavailable as exc:
                plan.store_failed = True
                plan.tried.update(positions)  # the failed write may have stored a part
                if history is not None:
                    plan.tried.add(0)
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
