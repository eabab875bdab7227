"""Conversations: the member's list with unread counts, read positions, and the devices that
hold a member's sync entries until each has them. The store keeps all of it (see the Store
protocol's "conversations, read positions, devices"); this part names conversations as the
API does and pages the list."""

from __future__ import annotations

import base64
import dataclasses
import re
import threading
from dataclasses import dataclass

from timeline.errors import InvalidParam
from timeline.model import Conversation, conversation_id
from timeline.service.common import Parts
from timeline.store import ConversationState, Cursor, Device
from timeline.validation import INT64_MAX

#: A device's sighting (a sync naming it) is written at most this often per process: a sync
#: stays a read. An ack always writes it.
_SEEN_EVERY_MS = 60_000
#: Sightings remembered per process (then forgotten, all at once: a few more writes).
_SEEN_KEPT = 100_000
_MILLIS = re.compile("[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """A page of the member's conversation list and the cursor of the next ("" at the end)."""

    conversations: list[ConversationState]
    next: str


def _cursor_text(cursor: Cursor) -> str:
    raw = f"{cursor.activity_ms}:{cursor.conversation}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(text: str) -> Cursor:
    """A `next` this service gave; anything else is a 400."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        millis, sep, conversation = raw.partition(":")
        if not sep or not _MILLIS.fullmatch(millis) or not conversation:
            raise ValueError(raw)
        if int(millis) > INT64_MAX:
            raise ValueError(raw)
        return Cursor(int(millis), conversation)
    except ValueError:
        raise InvalidParam("before is not a cursor this service gave", field="before") from None


class Conversations:
    """The member's conversations, its read positions, its devices."""

    def __init__(self, parts: Parts) -> None:
        self.store, self.policy = parts.store, parts.policy
        self._clock_ms = parts.clock_ms
        self._seen: dict[tuple[str, str], int] = {}
        self._seen_lock = threading.Lock()

    @staticmethod
    def history_id(member: str, kind: Conversation, name: str) -> str:
        """The history timeline of a conversation the member names: the other user (single),
        the group's name (group)."""
        return conversation_id(member, name) if kind is Conversation.SINGLE else name

    def read(self, member: str, kind: Conversation, name: str, seq: int) -> ConversationState:
        """The member has read the conversation up to `seq` (never back; never past its
        latest message)."""
        history = self.history_id(member, kind, name)
        return self._current(self.store.mark_read(member, kind, history, name, seq))

    def page(self, member: str, count: int, before: Cursor | None) -> ConversationPage:
        """A page of the member's conversations, most recent activity first."""
        found = self.store.conversations(member, count + 1, before)
        page = [self._current(state) for state in found[:count]]
        more = len(found) > count
        last = page[-1] if page else None
        cursor = _cursor_text(Cursor(last.activity_ms, last.conversation)) if more and last else ""
        return ConversationPage(page, cursor)

    def _current(self, state: ConversationState) -> ConversationState:
        """The state without a latest message that has expired (history_retention_seconds):
        an expired entry is never shown, here neither."""
        retention = self.policy.history_retention_ms
        last = state.last
        if retention and last is not None and last.created_at_ms < self._clock_ms() - retention:
            return dataclasses.replace(state, last=None)
        return state

    # --- devices ---------------------------------------------------------------------------

    def seen(self, member: str, device: str) -> None:
        """A sync named the device: it holds the member's entries from now on (position 0
        until it acks), and stays seen for device_idle_seconds."""
        now = self._clock_ms()
        key = (member, device)
        every = min(_SEEN_EVERY_MS, self.policy.device_idle_ms // 4)
        with self._seen_lock:
            if now - self._seen.get(key, -every) < every:
                return
        self.store.device_seen(member, device, now)
        with self._seen_lock:  # only once it is recorded: a failed write is tried again
            if len(self._seen) >= _SEEN_KEPT:
                self._seen.clear()
            self._seen[key] = now

    def acked(self, member: str, device: str, seq: int) -> int:
        """The device has what it pulled up to `seq`; returns what the member's timeline may
        release up to: the lowest position among its devices seen lately."""
        now = self._clock_ms()
        upto = self.store.device_ack(member, device, seq, now, self.policy.device_idle_ms)
        with self._seen_lock:
            self._seen[(member, device)] = now
        return upto

    def devices(self, member: str) -> list[Device]:
        return self.store.devices(member)
