"""The MongoDB store: the production backend, collections chat_sync and chat_history."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pymongo
from bson.dbref import DBRef
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.read_preferences import ReadPreference

from timeline.errors import PartialWrite, Unavailable
from timeline.metrics import dependency_failed
from timeline.model import HOLE_MID, Document, Entry, Kind
from timeline.settings import Settings
from timeline.store import COLLECTIONS, WriteResult

log = logging.getLogger(__name__)

INDEX_NAME = "id_seq_unique"
_DUPLICATE_KEY = 11000


def _bson(document: Document) -> dict[str, Any]:
    return {
        "id": document.id,
        "seq": document.seq,
        "message": document.message.document,
        "created_at": datetime.fromtimestamp(document.created_at_ms / 1000, tz=UTC),
        "mid": document.mid,
    }


def _json_default(value: Any) -> Any:
    """BSON types JSON lacks, in documents this service did not write (go-timeline's)."""
    if isinstance(value, DBRef):
        return dict(value.as_doc())
    return str(value)  # ObjectId, Decimal128, Binary, Timestamp...


def _ms(value: Any) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # pymongo decodes naive UTC datetimes by default
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    return 0  # documents written by go-timeline carry no creation time


class MongoStore:
    """pymongo's client pools connections and is thread-safe; create it after the fork."""

    backend = "mongo"

    def __init__(self, database: Database[Any], client: Any = None) -> None:
        self._client = client
        self._collections: dict[Kind, Collection[Any]] = {
            kind: database[name] for kind, name in COLLECTIONS.items()
        }
        self._indexes_ready = False
        self._indexes_lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings) -> MongoStore:
        """A store on the settings' URI; connecting happens lazily, at the first operation."""
        timeout = settings.mongo_timeout_ms
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(
            settings.mongo_uri,
            serverSelectionTimeoutMS=timeout,
            connectTimeoutMS=timeout,
            socketTimeoutMS=settings.mongo_socket_timeout_ms,
            appname="timeline",
            tz_aware=True,
        )
        return cls(client[settings.mongo_database], client=client)

    def ensure_indexes(self) -> None:
        """Create the unique (id, seq) index on both collections; idempotent, once per process."""
        if self._indexes_ready:
            return
        with self._indexes_lock:
            if self._indexes_ready:
                return
            try:
                for collection in self._collections.values():
                    collection.create_index(
                        [("id", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)],
                        unique=True,
                        name=INDEX_NAME,
                    )
            except PyMongoError as exc:
                # Also raised when old data holds duplicates: never write without the index.
                log.error("cannot create the unique (id, seq) index: %s", exc)
                dependency_failed("store")
                raise Unavailable("store (mongo) is unavailable") from exc
            self._indexes_ready = True

    def write(self, history: Sequence[Document], sync: Sequence[Document]) -> WriteResult:
        self.ensure_indexes()
        try:
            if history and not self._write_history(history):
                return WriteResult(history_taken=True)
        except PyMongoError as exc:
            log.warning("mongo write failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc
        if not sync:
            return WriteResult()
        # From here on the history copy is stored: a failure says so (PartialWrite).
        try:
            taken = self._insert_unordered(Kind.SYNC, [_bson(d) for d in sync])
        except PyMongoError as exc:
            log.warning("mongo write failed after the history copy: %s", exc)
            dependency_failed("store")
            if history:
                raise PartialWrite("store (mongo) failed midway") from exc
            raise Unavailable("store (mongo) is unavailable") from exc
        return WriteResult(sync_taken=taken)

    def _insert_unordered(self, kind: Kind, documents: list[dict[str, Any]]) -> list[int]:
        """insert_many(ordered=False): the positions whose (id, seq) was taken.

        Any other write error, or a write concern error (the write may be rolled back), is
        raised: writing the same documents again is how to finish, since what did get stored
        comes back as taken, with its own mid.
        """
        try:
            self._collections[kind].insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if exc.details.get("writeConcernErrors") or any(
                e.get("code") != _DUPLICATE_KEY for e in errors
            ):
                raise
            return sorted({int(e["index"]) for e in errors})
        return []

    def seal(
        self, kind: Kind, timeline_id: str, seqs: Sequence[int], created_at_ms: int
    ) -> list[int]:
        self.ensure_indexes()
        created_at = datetime.fromtimestamp(created_at_ms / 1000, tz=UTC)
        holes = [
            {
                "id": timeline_id,
                "seq": seq,
                "message": {},
                "created_at": created_at,
                "mid": HOLE_MID,
            }
            for seq in seqs
        ]
        try:
            taken = self._insert_unordered(kind, holes)
        except PyMongoError as exc:
            log.warning("mongo write failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc
        return [seqs[i] for i in taken]

    def _write_history(self, history: Sequence[Document]) -> bool:
        """Insert the history documents; False when one's (id, seq) is taken."""
        collection = self._collections[Kind.HISTORY]
        try:
            if len(history) == 1:
                collection.insert_one(_bson(history[0]))
            else:
                collection.insert_many([_bson(d) for d in history], ordered=True)
        except DuplicateKeyError:
            return False
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and all(e.get("code") == _DUPLICATE_KEY for e in errors):
                # ordered: those before the taken one are stored; the caller writes them
                # again and finds them taken with its own mid.
                return False
            raise
        return True

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        if not keys:
            return {}
        by_id: dict[str, list[int]] = {}
        for id_, seq in keys:
            by_id.setdefault(id_, []).append(seq)
        query = {"$or": [{"id": id_, "seq": {"$in": seqs}} for id_, seqs in by_id.items()]}
        documents = self._find(kind, query, {"_id": 0, "id": 1, "seq": 1, "mid": 1})
        return {(d["id"], int(d["seq"])): d.get("mid", "") for d in documents}

    def max_seqs(self, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        self.ensure_indexes()
        # Sorted backwards along the (id, seq) index, $first per id is one index probe each
        # (a DISTINCT_SCAN), not a scan of every entry.
        pipeline: list[dict[str, Any]] = [
            {"$match": {"id": {"$in": list(ids)}}},
            {"$sort": {"id": -1, "seq": -1}},
            {"$group": {"_id": "$id", "seq": {"$first": "$seq"}}},
        ]
        try:
            collection = self._primary(kind)
            found = {d["_id"]: int(d["seq"]) for d in collection.aggregate(pipeline)}
        except PyMongoError as exc:
            log.warning("mongo read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc
        return {id_: found.get(id_, 0) for id_ in ids}

    def _primary(self, kind: Kind) -> Collection[Any]:
        """The collection read on the primary: repairs must see the latest writes, whatever
        read preference the URI gives to ordinary reads."""
        return self._collections[kind].with_options(read_preference=ReadPreference.PRIMARY)

    def _find(self, kind: Kind, query: dict[str, Any], projection: dict[str, Any]) -> list[Any]:
        self.ensure_indexes()
        try:
            return list(self._primary(kind).find(query, projection))
        except PyMongoError as exc:
            log.warning("mongo read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    def read(self, kind: Kind, timeline_id: str, after: int, limit: int) -> list[Entry]:
        self.ensure_indexes()
        try:
            cursor = (
                self._collections[kind]
                .find(
                    {"id": timeline_id, "seq": {"$gt": after}},
                    {"_id": 0, "seq": 1, "message": 1, "created_at": 1, "mid": 1},
                )
                .sort("seq", pymongo.ASCENDING)
                .limit(limit)
            )
            documents = list(cursor)
        except PyMongoError as exc:
            log.warning("mongo read failed: %s", exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc
        return [
            Entry(
                int(d["seq"]),
                orjson.dumps(d.get("message") or {}, default=_json_default).decode(),
                _ms(d.get("created_at")),
                d.get("mid", ""),
            )
            for d in documents
        ]

    def ping(self) -> None:
        try:
            database = next(iter(self._collections.values())).database
            database.command("ping")
        except PyMongoError as exc:
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
