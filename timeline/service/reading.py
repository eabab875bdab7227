"""The Reader: sync, history and ack. A read never hands out a sequence past a hole a write
may still fill (see Reader._readable)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from timeline import metrics
from timeline.errors import Unavailable
from timeline.model import Entry, Kind, Timeline
from timeline.service.common import Parts
from timeline.service.conversations import Conversations
from timeline.store import Page

log = logging.getLogger("timeline.service")

#: Pages one read may go through when placeholders, expired entries or late writes are in
#: the way.
_READ_PAGES = 5
#: Placeholders a reader stores at once: a bigger gap (data another system thinned out) is
#: sealed a chunk at a time, never in one insert that a timeout would keep failing.
_SEAL_CHUNK = 1000
#: What an entry takes besides its message: `{"sequence":"…","message":…,"timestamp":"…"},`.
_ENTRY_BYTES = 80


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


class _PageBytes:
    """The bytes a page's entries take as JSON encodes them (the message as a JSON string:
    escaping doubles a quote, and a control character takes six bytes; gRPC's protobuf
    carries the message as it is, so less), against page_max_bytes."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, entry: Entry) -> bool:
        """Count the entry in, if it fits; False (counting nothing) when it does not."""
        size = _ENTRY_BYTES + len(orjson.dumps(entry.message))
        if size > self.left:
            return False
        self.left -= size
        return True


class Reader:
    """Pages of sync and history timelines, and the ack that releases what a device pulled."""

    def __init__(self, parts: Parts, devices: Conversations) -> None:
        self.allocator, self.store, self.policy = parts.allocator, parts.store, parts.policy
        self._clock_ms = parts.clock_ms
        self.devices = devices

    def ack(self, member: str, seq: int, device: str = "") -> int:
        """The member's device (without a name: the member as one device) has its sync
        entries up to `seq`: remove those every device seen lately has; returns the new
        minSeq."""
        latest = self._latest(member)
        # A device's position is what it can have pulled: never past the latest (an ack of
        # "everything" must not release, later, entries that arrive after it).
        upto = self.devices.acked(member, device, min(seq, latest))
        # Whatever the ack removes is at most min(upto, latest): that floor covers it all and
        # never runs ahead of what was allocated (a lost counter continues above it).
        if upto > 0:
            self.store.ack(member, upto, min(upto, latest))
        metrics.ACKED.inc()
        cutoff = self._cutoff(Kind.SYNC)
        first = self.store.page(Kind.SYNC, member, 0, 0, cutoff)
        return self._min_seq(Kind.SYNC, member, first, latest, cutoff)

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

    def sync(self, member: str, last_read: int, count: int, device: str = "") -> SyncResult:
        """The member's sync entries after last_read, the newest sequence allocated, and
        the lowest sequence the timeline can still return (minSeq). A named device is seen:
        from then on the member's entries are released only once it has acked them too."""
        if device:
            self.devices.seen(member, device)
        cutoff = self._cutoff(Kind.SYNC)
        first = self.store.page(
            Kind.SYNC, member, last_read, count, cutoff, self.policy.page_max_bytes
        )
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
        first = self.store.page(
            Kind.HISTORY, conversation, last_read, count, cutoff, self.policy.page_max_bytes
        )
        return self._readable(Kind.HISTORY, conversation, last_read, count, cutoff, first)

    def history_backward(self, conversation: str, before: int, count: int) -> HistoryPage:
        """Up to `count` history entries below `before` (0: from the newest), newest first."""
        cutoff = self._cutoff(Kind.HISTORY)
        page = self.store.read_backward(Kind.HISTORY, conversation, before, count + 1, cutoff)
        entries = self._within_bytes(page[:count])
        next_before = entries[-1].seq if len(page) > len(entries) else 0
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
        budget = _PageBytes(self.policy.page_max_bytes)
        expected = max(after, first.floor) + 1
        now = self._clock_ms()
        page: list[Entry] | None = first.entries if expected == after + 1 else None
        for _ in range(_READ_PAGES):
            if page is None:
                page = self.store.read(
                    kind, timeline_id, expected - 1, count, cutoff, self.policy.page_max_bytes
                )
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
                if not budget.take(entry) and entries:
                    return entries  # the page is full: the client pages on from here
                entries.append(entry)
                if len(entries) == count:
                    return entries
                expected = entry.seq + 1
            if not reread and len(page) < count:
                return entries  # the end of the timeline
            page = None
        return entries

    def _within_bytes(self, entries: list[Entry]) -> list[Entry]:
        """The first entries that fit in a page (at least one)."""
        budget = _PageBytes(self.policy.page_max_bytes)
        kept: list[Entry] = []
        for entry in entries:
            if not budget.take(entry) and kept:
                break
            kept.append(entry)
        return kept

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
