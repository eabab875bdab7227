"""The service layer: send, send_group, sync and history. It knows nothing of HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from timeline.errors import WriteFailed
from timeline.model import Document, Entry, Kind, Message, Timeline, conversation_id
from timeline.sequence import SequenceAllocator
from timeline.store import Store

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class SyncResult:
    """A page of a member's sync timeline and the newest sequence allocated to it."""

    latest_seq: int
    entries: list[Entry]


class TimelineService:
    """Allocates sequences in one Redis round trip and stores a request in one bulk write."""

    def __init__(
        self,
        allocator: SequenceAllocator,
        store: Store,
        gap_grace_ms: int = 5000,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.allocator = allocator
        self.store = store
        self._gap_grace_ms = gap_grace_ms
        self._clock_ms = clock_ms

    def send(self, sender: str, receiver: str, message: Message) -> int:
        """A one-to-one message; returns the receiver's sync sequence for it."""
        recipients = [sender] if sender == receiver else [sender, receiver]
        failed, sequences = self._fan_out(conversation_id(sender, receiver), recipients, message)
        if failed:
            raise WriteFailed(
                "message could not be stored for every recipient", failedMembers=failed
            )
        return sequences[-1]  # the receiver is the last recipient

    def send_group(self, group: str, members: Sequence[str], message: Message) -> list[str]:
        """A group message to the listed (distinct) members; returns those not written."""
        failed, _ = self._fan_out(group, members, message)
        return failed

    def _fan_out(
        self, history_id: str, recipients: Sequence[str], message: Message
    ) -> tuple[list[str], list[int]]:
        """Allocate for the history and every recipient at once, then write it all.

        Returns the recipients whose sync copy was not stored and each one's sequence.
        """
        timelines = [Timeline(Kind.HISTORY, history_id)]
        timelines += [Timeline(Kind.SYNC, member) for member in recipients]
        last = self.allocator.allocate(timelines)
        now = self._clock_ms()
        history = [Document(history_id, last[0], message, now)]
        sync = [
            Document(member, seq, message, now)
            for member, seq in zip(recipients, last[1:], strict=True)
        ]
        failed = [recipients[i] for i in self.store.write(history, sync)]
        if failed:
            log.warning(
                "%d of %d sync copies not stored (timeline %s seq %d)",
                len(failed),
                len(sync),
                history_id,
                last[0],
            )
        return failed, last[1:]

    def sync(self, member: str, last_read: int, count: int) -> SyncResult:
        """The member's sync entries after last_read, and the newest sequence allocated."""
        # Store first, then Redis: latestSeq is then never below the last entry returned.
        entries = self._readable(Kind.SYNC, member, last_read, count)
        latest = self.allocator.latest(Timeline(Kind.SYNC, member))
        return SyncResult(latest_seq=latest, entries=entries)

    def history(self, conversation: str, last_read: int, count: int) -> list[Entry]:
        """A conversation's history entries after last_read, ascending."""
        return self._readable(Kind.HISTORY, conversation, last_read, count)

    def _readable(self, kind: Kind, timeline_id: str, after: int, count: int) -> list[Entry]:
        """Entries after `after`, cut before a hole whose write may still be in flight.

        A sequence is allocated before its document is written, so a reader can see seq 7
        stored while seq 6 is still being written. Handing out 7 would make the client
        move past 6 and never see it. The hole is passed over only once the entry after it
        is older than the grace period: by then the writer of 6 has failed (and its caller
        was told).
        """
        entries = self.store.read(kind, timeline_id, after, count)
        expected = after + 1
        now = None
        for position, entry in enumerate(entries):
            if entry.seq != expected:
                now = self._clock_ms() if now is None else now
                if now - entry.created_at_ms < self._gap_grace_ms:
                    return entries[:position]
            expected = entry.seq + 1
        return entries
