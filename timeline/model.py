"""The domain's values: timelines, messages, stored documents and the entries read back."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """The two kinds of timeline of the seed's model."""

    SYNC = "sync"  # write-diffusion: one per user, the offline inbox (chat_sync)
    HISTORY = "history"  # read-diffusion: one per conversation (chat_history)


@dataclass(frozen=True, slots=True)
class Timeline:
    """One timeline: a kind and the id it is kept under (a user or a conversation)."""

    kind: Kind
    id: str


def conversation_id(a: str, b: str) -> str:
    """The history timeline of a one-to-one chat: `smaller:larger` in plain string order."""
    return f"{a}:{b}" if a <= b else f"{b}:{a}"


@dataclass(frozen=True, slots=True)
class Message:
    """A validated client message: the JSON object and its compact encoding."""

    document: dict[str, Any]
    json: str


@dataclass(frozen=True, slots=True)
class Document:
    """One stored copy of a message: `{id, seq, message}`, its creation time and `mid`.

    `mid` names the message across all its copies and all attempts to store it: when a
    write finds its `(id, seq)` taken, the stored `mid` says whether it is this message
    (written by an earlier attempt) or another one (the counter was behind).
    """

    id: str
    seq: int
    message: Message
    created_at_ms: int
    mid: str = ""


#: The mid of a placeholder that seals a hole a reader stepped over: a late write of that
#: sequence then finds it taken and moves above, where readers will see it.
HOLE_MID = "~hole"


@dataclass(frozen=True, slots=True)
class Entry:
    """One message read back from a timeline; `message` is its JSON text."""

    seq: int
    message: str
    created_at_ms: int
    mid: str = ""

    @property
    def is_hole(self) -> bool:
        return self.mid == HOLE_MID
