"""What the service's parts share: its policy, the plan of a request being stored, and what
each part is made with (Parts: the allocator, the store, the policy, the clock)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from timeline.allocator import Allocator, Record
from timeline.model import About, Activity, Conversation, Copies, Kind, Message, Timeline
from timeline.settings import Settings
from timeline.store import Claim, Store


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _nobody(timelines: Sequence[Timeline]) -> None:
    """No one to tell (a service without waiting readers)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The service's knobs, from the settings."""

    gap_grace_ms: int = 6_000
    request_deadline_ms: int = 3_000
    record_ttl_ms: int = 86_400_000  # the store's record of an idempotent message
    record_redis_ttl_ms: int = 300_000  # Redis's (a hint: see Writer._settled)
    write_attempts: int = 4
    retry_backoff_ms: int = 100
    retry_budget_ms: int = 1000
    sync_retention_ms: int = 0
    history_retention_ms: int = 0
    page_max_bytes: int = 4 << 20  # of a page's entries, as JSON encodes them
    device_idle_ms: int = 30 * 86_400_000  # a device not seen for longer holds nothing back

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The knobs as the settings set them (HTTP and gRPC serve with the same)."""
        return cls(
            gap_grace_ms=settings.gap_grace_ms,
            request_deadline_ms=settings.request_deadline_ms,
            record_ttl_ms=settings.idempotency_ttl_seconds * 1000,
            record_redis_ttl_ms=settings.idempotency_redis_seconds * 1000,
            write_attempts=settings.store_write_attempts,
            retry_backoff_ms=settings.store_retry_backoff_ms,
            retry_budget_ms=settings.store_retry_budget_ms,
            sync_retention_ms=settings.sync_retention_seconds * 1000,
            history_retention_ms=settings.history_retention_seconds * 1000,
            page_max_bytes=settings.page_max_bytes,
            device_idle_ms=settings.device_idle_seconds * 1000,
        )

    def retention_ms(self, kind: Kind) -> int:
        return self.sync_retention_ms if kind is Kind.SYNC else self.history_retention_ms


@dataclass(slots=True)
class _Allocated:
    """A request's sequences: the last of each timeline's range (0 where none), which of
    them an earlier attempt allocated (position: when, ms since the epoch), and the
    positions whose allocation failed (reported to the caller, never written)."""

    lasts: list[int]
    replayed: dict[int, int]
    failed: set[int]
    allocated_ms: int  # when the sequences were allocated (the earliest, for a replay)


@dataclass(slots=True)
class _Plan:
    """What one request stores, by timeline position: 0 is the history timeline, then each
    recipient's sync timeline; timeline p gets the messages at firsts[p], firsts[p] + 1..."""

    ids: list[str]
    timelines: list[Timeline]  # the same positions, with their kinds
    firsts: list[int]
    messages: Sequence[Message]
    created_at_ms: int
    mid: str
    record: Record | None
    claim: Claim | None  # the store's record of an idempotent message
    deadline_ms: int  # no store write starts after this (the request's deadline)
    # Positions a write was sent for at their current range, and positions this request
    # moved to a range it allocated itself (see Writer._give_up).
    tried: set[int] = field(default_factory=set)
    moved: set[int] = field(default_factory=set)
    store_failed: bool = False  # a store write of this request failed
    # The conversation: its kind, the sender ("" when the request names none), and for a
    # one-to-one send the name each position's member knows it by (the other user).
    conversation: Conversation = Conversation.GROUP
    sender: str = ""
    peers: Sequence[str] | None = None

    @property
    def count(self) -> int:
        return len(self.messages)

    @staticmethod
    def kind(position: int) -> Kind:
        return Kind.HISTORY if position == 0 else Kind.SYNC

    def timeline(self, position: int) -> Timeline:
        return self.timelines[position]

    def copies(self, positions: Sequence[int] | None) -> Copies:
        """The sync copies of these positions; None: every sync timeline (the usual case).
        The history's are `one(0, messages)`."""
        if positions is None:
            ids, firsts = self.ids[1:], self.firsts[1:]
            peers = self.peers[1:] if self.peers is not None else None
        else:
            ids = [self.ids[p] for p in positions]
            firsts = [self.firsts[p] for p in positions]
            peers = [self.peers[p] for p in positions] if self.peers is not None else None
        about = About(self.conversation, self.ids[0], self.firsts[0], peers)
        return Copies(ids, firsts, self.messages, self.created_at_ms, self.mid, about)

    def one(self, position: int, messages: Sequence[Message], offset: int = 0) -> Copies:
        """The copies of one position: `messages`, the request's from `offset` on."""
        first = self.firsts[position] + offset
        if position == 0:
            return Copies(
                [self.ids[0]],
                [first],
                messages,
                self.created_at_ms,
                self.mid,
                activity=self.activity(first + len(messages) - 1, messages[-1], first),
            )
        peers = [self.peers[position]] if self.peers is not None else None
        about = About(self.conversation, self.ids[0], self.firsts[0] + offset, peers)
        return Copies([self.ids[position]], [first], messages, self.created_at_ms, self.mid, about)

    def activity(self, last: int = 0, message: Message | None = None, first: int = 0) -> Activity:
        """What the history copies change in the conversation's state: those of the whole
        request, or (`first`, `last`, `message`) of the part of it being written."""
        members = self.ids[1:]
        if self.sender and self.sender not in members:
            members = [*members, self.sender]
        peers = None
        if self.peers is not None:
            peers = list(self.peers[1:])
            if len(peers) < len(members):
                peers.append(self.ids[0])
        return Activity(
            kind=self.conversation,
            conversation=self.ids[0],
            members=members,
            peer=self.ids[0],
            peers=peers,
            sender=self.sender,
            first=first or self.firsts[0],
            last=last or self.firsts[0] + self.count - 1,
            message=(message or self.messages[-1]).json,
            created_at_ms=self.created_at_ms,
        )

    def keys(self, position: int) -> list[tuple[str, int]]:
        first = self.firsts[position]
        return [(self.ids[position], first + j) for j in range(self.count)]


@dataclass(frozen=True, slots=True)
class Parts:
    """What the parts of the service work with: the allocator, the store, the policy, the
    clock, and who to tell that timelines got entries (timeline.wakes: readers waiting for
    them). Each part (Reader, Repairer, Writer) takes what it needs from it when made."""

    allocator: Allocator
    store: Store
    policy: Policy
    clock_ms: Callable[[], int] = _now_ms
    sleep: Callable[[float], None] = time.sleep
    notify: Callable[[Sequence[Timeline]], None] = _nobody
