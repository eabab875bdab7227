"""The store protocol: where documents live. One module per backend (mongo, sqlite)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from timeline.model import Document, Entry, Kind
from timeline.settings import Settings

#: The collection (MongoDB) or table (SQLite) of each kind of timeline.
COLLECTIONS = {Kind.SYNC: "chat_sync", Kind.HISTORY: "chat_history"}


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write left undone because an `(id, seq)` was already stored."""

    history_taken: bool = False  # then no sync document was attempted
    sync_taken: list[int] = field(default_factory=list)  # positions in `sync`


class Store(Protocol):
    """Documents `{id, seq, message}`, unique on `(id, seq)`, read back in sequence order."""

    backend: str

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> WriteResult:
        """Store a request's documents: one bulk write per collection.

        The history documents are written first, all or none: if one's `(id, seq)` is
        taken, no sync document is attempted. The sync documents are written independently
        of each other; those whose `(id, seq)` is taken are reported, the others kept.
        Any other failure raises Unavailable; the write may then have been partly done
        (MongoDB), and writing the same documents again is how to finish it.
        """
        ...

    def seal(
        self, kind: Kind, timeline_id: str, seqs: Sequence[int], created_at_ms: int
    ) -> list[int]:
        """Store hole placeholders (mid HOLE_MID) at the given sequences where none is stored;
        return the sequences that turned out to be taken (a late write got there first)."""
        ...

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The `mid` of the stored document at each `(id, seq)` that exists."""
        ...

    def max_seqs(self, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        """The highest stored sequence of each timeline; 0 for one with no document."""
        ...

    def read(self, kind: Kind, timeline_id: str, after: int, limit: int) -> list[Entry]:
        """Entries of one timeline with `seq > after`, ascending, at most `limit`."""
        ...

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...

    def close(self) -> None: ...


def open_store(settings: Settings) -> Store:
    """The store the settings name: MongoDB when a URI is set, else SQLite."""
    if settings.mongo_uri:
        from timeline.store.mongo import MongoStore

        return MongoStore.connect(settings)
    from timeline.store.sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
