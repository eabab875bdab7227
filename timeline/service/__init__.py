"""The service layer: send, send_group, ack, sync and history. It knows nothing of HTTP, nor
of how Redis is deployed (the allocator does).

Three parts, one module each, each an object made with what it needs (common.Parts):
writing.py's Writer (allocate, record, store), repairing.py's Repairer (what a write does off
the steady state, and giving back what it will not write) and reading.py's Reader (pages that
never skip a hole, ack). TimelineService holds them and is what the API layers call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from timeline.allocator import Allocator
from timeline.model import Timeline
from timeline.service.common import Parts, Policy, _now_ms
from timeline.service.conversations import ConversationPage, Conversations
from timeline.service.reading import HistoryPage, Reader, SyncResult
from timeline.service.repairing import Repairer
from timeline.service.writing import Delivery, Writer
from timeline.store import Store

__all__ = [
    "ConversationPage",
    "Delivery",
    "HistoryPage",
    "Policy",
    "SyncResult",
    "TimelineService",
    "_now_ms",
]


class TimelineService:
    """Allocates sequences in one Redis round trip and stores a request in one bulk write.

    Off the steady state it repairs what it finds: counters Redis lost are seeded from the
    store; sequences found taken by another message move to new ones; failed writes are
    retried; an idempotent message's retries reuse its recorded sequences, and the store's
    record of it decides when Redis forgot.

    Made of three parts, each an object that holds what it needs: a Writer (with its
    Repairer) and a Reader, over the same Parts.
    """

    def __init__(
        self,
        allocator: Allocator,
        store: Store,
        policy: Policy | None = None,
        clock_ms: Callable[[], int] = _now_ms,
        sleep: Callable[[float], None] = time.sleep,
        notify: Callable[[Sequence[Timeline]], None] | None = None,
    ) -> None:
        parts = Parts(allocator, store, policy or Policy(), clock_ms, sleep)
        self.parts = parts if notify is None else dataclasses.replace(parts, notify=notify)
        self.writer = Writer(self.parts, Repairer(self.parts))
        self.conversations = Conversations(self.parts)
        self.reader = Reader(self.parts, self.conversations)
        # What the API layers call, each answered by the part that does it.
        self.send = self.writer.send
        self.send_group = self.writer.send_group
        self.sync = self.reader.sync
        self.history = self.reader.history
        self.history_backward = self.reader.history_backward
        self.ack = self.reader.ack
        self.read = self.conversations.read
        self.conversation_list = self.conversations.page
        self.devices = self.conversations.devices

    @property
    def allocator(self) -> Allocator:
        return self.parts.allocator

    @property
    def store(self) -> Store:
        return self.parts.store

    @property
    def policy(self) -> Policy:
        return self.parts.policy

    def with_policy(self, policy: Policy) -> TimelineService:
        """The same service (allocator, store, clock) under another policy: a gRPC call's
        sooner deadline, say."""
        parts = self.parts
        return TimelineService(
            parts.allocator, parts.store, policy, parts.clock_ms, parts.sleep, parts.notify
        )
