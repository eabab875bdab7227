"""The domain's values: timelines, messages, stored documents and the entries read back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import repeat
from typing import Any, NamedTuple


class Kind(StrEnum):
    """The two kinds of timeline of the seed's model."""

    SYNC = "sync"  # write-diffusion: one per user, the offline inbox (chat_sync)
    HISTORY = "history"  # read-diffusion: one per conversation (chat_history)


class Timeline(NamedTuple):
    """One timeline: a kind and the id it is kept under (a user or a conversation).

    A named tuple: a fan-out to 10,000 members makes 10,001 of them per request, and a
    frozen dataclass costs ten times as much to build."""

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
class Copies:
    """The copies a request stores in several timelines of one kind, column by column:
    timeline `ids[i]` gets `messages[j]` at sequence `firsts[i] + j`, for every j.

    Columns, not an object per copy: a fan-out to 10,000 members is 10,000 copies, and rows
    zipped from columns cost the store nothing to build.
    """

    ids: Sequence[str]
    firsts: Sequence[int]
    messages: Sequence[Message]
    created_at_ms: int
    mid: str

    def __len__(self) -> int:
        return len(self.ids) * len(self.messages)

    def rows(self) -> Iterator[tuple[str, int, str, int, str]]:
        """(id, seq, message JSON, created_at_ms, mid) for each copy, timeline by timeline."""
        if len(self.messages) == 1:
            text = self.messages[0].json
            return zip(
                self.ids, self.firsts, repeat(text), repeat(self.created_at_ms), repeat(self.mid)
            )
        return (
            (id_, first + j, message.json, self.created_at_ms, self.mid)
            for id_, first in zip(self.ids, self.firsts, strict=True)
            for j, message in enumerate(self.messages)
        )

    def timeline_of(self, copy: int) -> int:
        """Which of `ids` the copy at this position (in `rows()` order) belongs to."""
        return copy // len(self.messages)


#: The mid of a placeholder that seals a hole a reader stepped over: a late write of that
#: sequence then finds it taken and moves above, where readers will see it.
HOLE_MID = "~hole"


class Entry(NamedTuple):
    """One message read back from a timeline; `message` is its JSON text.

    A named tuple: a sync page builds a score of them per request, at C speed.
    """

    seq: int
    message: str
    created_at_ms: int
    mid: str = ""
