"""The store protocol: where documents live. One module per backend (mongo, sqlite)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from timeline.model import Document, Entry, Kind
from timeline.settings import Settings

#: The collection (MongoDB) or table (SQLite) of each kind of timeline.
COLLECTIONS = {Kind.SYNC: "chat_sync", Kind.HISTORY: "chat_history"}


class Store(Protocol):
    """Documents `{id, seq, message}`, unique on `(id, seq)`, read back in sequence order."""

    backend: str

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> list[int]:
        """Store a request's documents: one bulk write per collection.

        The history documents are written first and all together: if any fails, nothing
        of the sync documents is attempted and WriteFailed (or Unavailable) is raised. The
        sync documents are written independently of each other; the positions (in `sync`)
        of those that could not be stored are returned, the others are kept.
        """
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
