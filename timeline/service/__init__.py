"""The service layer: send, send_group, ack, sync and history. It knows nothing of HTTP, nor
of how Redis is deployed (the allocator does).

Three parts, one module each: writing.py (allocate, record, store), repairing.py (what a
write does off the steady state) and reading.py (pages that never skip a hole, ack).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from timeline.allocator import Allocator
from timeline.service.common import Policy, _now_ms
from timeline.service.reading import HistoryPage, Reading, SyncResult
from timeline.service.writing import Delivery, Writing
from timeline.store import Store

__all__ = ["Delivery", "HistoryPage", "Policy", "SyncResult", "TimelineService", "_now_ms"]


class TimelineService(Writing, Reading):
    """Allocates sequences in one Redis round trip and stores a request in one bulk write.

    Off the steady state it repairs what it finds: counters Redis lost are seeded from the
    store; sequences found taken by another message move to new ones; failed writes are
    retried; an idempotent message's retries reuse its recorded sequences, and the store's
    record of it stands when Redis forgot.
    """

    def __init__(
        self,
        allocator: Allocator,
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
