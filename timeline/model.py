"""The domain's values: timelines, messages, stored documents and the entries read back."""

from __future__ import annotations

import hashlib
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


class Conversation(StrEnum):
    """The two kinds of conversation: a history timeline is one's."""

    SINGLE = "single"  # two users; its history id is conversation_id(a, b)
    GROUP = "group"  # a group; its history id is the group's name


def peer_of(conversation: str, member: str) -> str:
    """The other user of a one-to-one conversation id (ids never hold ':')."""
    a, _, b = conversation.partition(":")
    return b if a == member else a


@dataclass(frozen=True, slots=True)
class About:
    """What each sync copy of a request records of its conversation: the kind, the
    conversation as that member names it (the other user; the group), and where the same
    message sits in the conversation's history (`first` + its place in the request).

    `peers` is one name per copy timeline (a one-to-one send: the other user of each);
    None: every copy names `name` (a group)."""

    kind: Conversation
    name: str
    first: int
    peers: Sequence[str] | None = None

    def part(self, start: int, stop: int) -> About:
        if self.peers is None:
            return self
        return About(self.kind, self.name, self.first, self.peers[start:stop])


@dataclass(frozen=True, slots=True)
class Activity:
    """What storing a request's history copies changes in its conversation's state (see
    Store.write): the conversation's latest message, who has the conversation in their list
    (`members`, each naming it `peers[i]`, or `peer` for all), and the sender's read
    position, moved to its own last message (a user has read what they wrote)."""

    kind: Conversation
    conversation: str  # the history timeline's id
    members: Sequence[str]
    peer: str  # what every member calls it (a group's name) when `peers` is None
    peers: Sequence[str] | None
    sender: str  # "" when the request names none (go-timeline's sendGroup)
    # A member listed by this request starts with what the history holds below `first`
    # read: a new member of a group, or a conversation older than this version, is not
    # unread back to its start.
    first: int  # the history sequence of the request's first message
    last: int  # the history sequence of the request's last message
    message: str  # its JSON
    created_at_ms: int

    def peer_of(self, position: int) -> str:
        return self.peers[position] if self.peers is not None else self.peer

    def members_digest(self) -> str:
        """What a conversation keeps of the member list last recorded (the store writes the
        members' list entries only when it changes): a digest of the members sorted, so that
        the same members listed in another order need nothing written either."""
        return hashlib.sha256("\x00".join(sorted(self.members)).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Copies:
    """The copies a request stores in several timelines of one kind, column by column:
    timeline `ids[i]` gets `messages[j]` at sequence `firsts[i] + j`, for every j.

    Columns, not an object per copy: a fan-out to 10,000 members is 10,000 copies, and rows
    zipped from columns cost the store nothing to build. Sync copies say what they are
    about (`about`); history copies carry what they change (`activity`).
    """

    ids: Sequence[str]
    firsts: Sequence[int]
    messages: Sequence[Message]
    created_at_ms: int
    mid: str
    about: About | None = None
    activity: Activity | None = None

    def __len__(self) -> int:
        return len(self.ids) * len(self.messages)

    def rows(self) -> Iterator[tuple[str, int, str, int, str, str, str, int]]:
        """(id, seq, message JSON, created_at_ms, mid, conversation kind, conversation,
        conversation seq) for each copy, timeline by timeline; the last three are
        ("", "", 0) without `about`."""
        about = self.about
        kind, first = (about.kind.value, about.first) if about is not None else ("", 0)
        names: Iterator[str] | Sequence[str] = (
            repeat("")
            if about is None
            else repeat(about.name)
            if about.peers is None
            else about.peers
        )
        if len(self.messages) == 1:
            text = self.messages[0].json
            return zip(
                self.ids,
                self.firsts,
                repeat(text),
                repeat(self.created_at_ms),
                repeat(self.mid),
                repeat(kind),
                names,
                repeat(first),
            )
        return (
            (
                id_,
                seq + j,
                message.json,
                self.created_at_ms,
                self.mid,
                kind,
                name,
                first + j if first else 0,
            )
            for id_, seq, name in zip(self.ids, self.firsts, names, strict=False)
            for j, message in enumerate(self.messages)
        )

    def part(self, start: int, stop: int) -> Copies:
        """The copies of timelines `start` to `stop` (of `ids`)."""
        return Copies(
            self.ids[start:stop],
            self.firsts[start:stop],
            self.messages,
            self.created_at_ms,
            self.mid,
            self.about.part(start, stop) if self.about is not None else None,
            self.activity,
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
    # A sync entry's conversation (written since sync copies say it; "" / 0 before): its
    # kind, its name as the member knows it, and the message's sequence in its history.
    conv_kind: str = ""
    conv: str = ""
    conv_seq: int = 0
