"""The MongoDB store: the production backend, collections chat_sync and chat_history."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import pymongo
from bson.dbref import DBRef
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.read_preferences import ReadPreference

from timeline.errors import PartialWrite, Unavailable
from timeline.metrics import EXPIRED_REMOVED, dependency_failed
from timeline.model import HOLE_MID, Copies, Entry, Kind
from timeline.settings import Settings
from timeline.store import COLLECTIONS, Page, WriteResult

log = logging.getLogger(__name__)

INDEX_NAME = "id_seq_unique"
TTL_INDEX_NAME = "created_at_ttl"
TTL_BACKSTOP_S = 86_400  # the TTL index acts this long after the retention
_DUPLICATE_KEY = 11000
_PROJECTION = {"_id": 0, "seq": 1, "message": 1, "created_at": 1, "mid": 1}
T = TypeVar("T")


def _date(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _bson(copies: Copies) -> list[dict[str, Any]]:
    """The documents of these copies, as MongoDB stores them (`message` as a document)."""
    created_at = _date(copies.created_at_ms)
    documents = [message.document for message in copies.messages]
    return [
        {"id": id_, "seq": first + j, "message": document, "created_at": created_at}
        | {"mid": copies.mid}
        for id_, first in zip(copies.ids, copies.firsts, strict=True)
        for j, document in enumerate(documents)
    ]


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


def _unexpired(not_before_ms: int) -> dict[str, Any]:
    """Created at or after the cutoff; a document without a creation time (written by
    go-timeline) never expires, as MongoDB's TTL index treats it."""
    if not not_before_ms:
        return {}
    return {
        "$or": [{"created_at": {"$gte": _date(not_before_ms)}}, {"created_at": {"$exists": False}}]
    }


def _entry(document: dict[str, Any]) -> Entry:
    return Entry(
        int(document["seq"]),
        orjson.dumps(document.get("message") or {}, default=_json_default).decode(),
        _ms(document.get("created_at")),
        document.get("mid", ""),
    )


class MongoStore:
    """pymongo's client pools connections and is thread-safe; create it after the fork."""

    backend = "mongo"

    def __init__(
        self,
        database: Database[Any],
        client: Any = None,
        retention_ms: dict[Kind, int] | None = None,
    ) -> None:
        self._client = client
        self._database = database
        self._collections: dict[Kind, Collection[Any]] = {
            kind: database[name] for kind, name in COLLECTIONS.items()
        }
        # What ack removed, per timeline: {_id: timeline id, seq: highest removed}.
        self._floors: dict[Kind, Collection[Any]] = {
            kind: database[f"{name}_floor"] for kind, name in COLLECTIONS.items()
        }
        self._retention = {kind: (retention_ms or {}).get(kind, 0) for kind in Kind}
        self._indexes_ready = False
        self._indexes_lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings, retention_ms: dict[Kind, int]) -> MongoStore:
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
        return cls(client[settings.mongo_database], client=client, retention_ms=retention_ms)

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run an operation; a driver error becomes Unavailable (its cause logged)."""
        self.ensure_indexes()
        try:
            return operation()
        except PyMongoError as exc:
            log.warning("mongo %s failed: %s", what, exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    # --- indexes --------------------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """The unique (id, seq) index on both collections, and the TTL index a retention
        asks for; idempotent, once per process, retried until it succeeds."""
        if self._indexes_ready:
            return
        with self._indexes_lock:
            if self._indexes_ready:
                return
            try:
                for kind, collection in self._collections.items():
                    collection.create_index(
                        [("id", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)],
                        unique=True,
                        name=INDEX_NAME,
                    )
                    retention_s = self._retention[kind] // 1000
                    self._ensure_ttl(collection, retention_s + TTL_BACKSTOP_S if retention_s else 0)
            except PyMongoError as exc:
                # Also raised when old data holds duplicates: never write without the index.
                log.error("cannot create the indexes: %s", exc)
                dependency_failed("store")
                raise Unavailable("store (mongo) is unavailable") from exc
            self._indexes_ready = True

    @staticmethod
    def _ensure_ttl(collection: Collection[Any], seconds: int) -> None:
        """A backstop: the purge removes expired documents (raising floors) first, and this
        index, a day later, whatever a purge did not (no service running). Placeholders are
        left alone, having no created_at. It also finds expired documents for the purge."""
        existing = collection.index_information().get(TTL_INDEX_NAME)
        if existing and existing.get("expireAfterSeconds") == seconds:
            return
        if existing:
            # A changed retention: the index is rebuilt (collMod would do, but not everywhere).
            collection.drop_index(TTL_INDEX_NAME)
        if not seconds:
            return
        collection.create_index("created_at", name=TTL_INDEX_NAME, expireAfterSeconds=seconds)

    # --- writing --------------------------------------------------------------------------

    def write(self, history: Copies | None, sync: Copies | None) -> WriteResult:
        if history is not None and not self._call("write", lambda: self._write_history(history)):
            return WriteResult(history_taken=True)
        if sync is None:
            return WriteResult()
        # From here on the history copy is stored: a failure says so (PartialWrite).
        try:
            below = self._below_floors(sync)
            documents = _bson(sync)
            if below:
                documents = [d for i, d in enumerate(documents) if i not in below]
                positions = [i for i in range(len(sync)) if i not in below]
            taken = self._insert_unordered(Kind.SYNC, documents)
            if below:
                taken = sorted({positions[i] for i in taken} | below)
        except PyMongoError as exc:
            log.warning("mongo write failed after the history copy: %s", exc)
            dependency_failed("store")
            if history is not None:
                raise PartialWrite("store (mongo) failed midway") from exc
            raise Unavailable("store (mongo) is unavailable") from exc
        return WriteResult(sync_taken=taken)

    def _write_history(self, history: Copies) -> bool:
        """Insert the history documents; False when one's (id, seq) is taken."""
        collection = self._collections[Kind.HISTORY]
        documents = _bson(history)
        try:
            if len(documents) == 1:
                collection.insert_one(documents[0])
            else:
                collection.insert_many(documents, ordered=True)
        except DuplicateKeyError:
            return False
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and all(e.get("code") == _DUPLICATE_KEY for e in errors):
                # ordered: those before the taken one are stored; the caller finds them
                # taken with its own mid, or removes them when it moves the range.
                return False
            raise
        return True

    def _below_floors(self, sync: Copies) -> set[int]:
        """Copies at or below their timeline's floor (what ack and purge removed): they count
        as taken, so that a lagging counter never writes where no reader looks any more."""
        floors = {
            f["_id"]: int(f["seq"])
            for f in self._floors[Kind.SYNC].find({"_id": {"$in": list(set(sync.ids))}})
        }
        if not floors:
            return set()
        return {i for i, (id_, seq, *_) in enumerate(sync.rows()) if seq <= floors.get(id_, 0)}

    def _insert_unordered(self, kind: Kind, documents: list[dict[str, Any]]) -> list[int]:
        """insert_many(ordered=False): the positions whose (id, seq) was taken.

        Any other write error, or a write concern error (the write may be rolled back), is
        raised: writing the same documents again is how to finish, since what did get stored
        comes back as taken, with its own mid.
        """
        if not documents:
            return []
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
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        # With a created_at, the purge removes old seals too (raising the floor over them).
        created_at = _date(created_at_ms)
        holes = [
            {"id": id_, "seq": seq, "message": {}, "created_at": created_at, "mid": HOLE_MID}
            for id_, seq in keys
        ]
        taken = self._call("seal", lambda: self._insert_unordered(kind, holes))
        return [keys[i] for i in taken]

    def unwrite(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        if keys:
            query = {"$or": [{"id": id_, "seq": seq, "mid": mid} for id_, seq in keys]}
            self._call("unwrite", lambda: self._collections[kind].delete_many(query))

    def ack(self, member: str, seq: int, floor: int) -> None:
        def acknowledge() -> None:
            if floor > 0:
                # The floor first: should the delete then fail, nothing is lost but space.
                self._floors[Kind.SYNC].update_one(
                    {"_id": member}, {"$max": {"seq": floor}}, upsert=True
                )
            self._collections[Kind.SYNC].delete_many({"id": member, "seq": {"$lte": seq}})

        self._call("ack", acknowledge)

    def raise_floor(self, kind: Kind, timeline_id: str, seq: int) -> None:
        floors = self._floors[kind]
        self._call(
            "floor",
            lambda: floors.update_one({"_id": timeline_id}, {"$max": {"seq": seq}}, upsert=True),
        )

    def count(self, kind: Kind, timeline_id: str, low: int, high: int) -> int:
        query = {"id": timeline_id, "seq": {"$gte": low, "$lt": high}}
        collection = self._primary(kind)
        return int(self._call("count", lambda: collection.count_documents(query)))

    def purge(self, kind: Kind, before_ms: int) -> int:
        collection = self._primary(kind)
        expired = {"created_at": {"$lt": _date(before_ms)}}  # served by the TTL index
        removed = 0

        def batch() -> int:
            found = list(collection.find(expired, {"_id": 1, "id": 1, "seq": 1}).limit(500))
            highest: dict[str, int] = {}
            for document in found:
                highest[document["id"]] = max(int(document["seq"]), highest.get(document["id"], 0))
            if highest:
                # Floors first: should the delete then fail, nothing is lost but space.
                for id_, seq in highest.items():
                    self._floors[kind].update_one({"_id": id_}, {"$max": {"seq": seq}}, upsert=True)
                collection.delete_many({"_id": {"$in": [d["_id"] for d in found]}})
            return len(found)

        while True:
            count = self._call("purge", batch)
            removed += count
            if count < 500:
                break
        if removed:
            EXPIRED_REMOVED.labels(kind.value).inc(removed)
        return removed

    def claim_purge(self, now_ms: int, period_ms: int) -> bool:
        claims = self._database["timeline_claims"]

        def claim() -> bool:
            try:
                claims.update_one(
                    {"_id": "purge", "until": {"$lte": _date(now_ms)}},
                    {"$set": {"until": _date(now_ms + period_ms * 9 // 10)}},
                    upsert=True,
                )
            except DuplicateKeyError:
                return False  # another process holds this period's claim
            return True

        return self._call("claim", claim)

    # --- reading --------------------------------------------------------------------------

    def _primary(self, kind: Kind) -> Collection[Any]:
        """The collection read on the primary: repairs must see the latest writes, whatever
        read preference the URI gives to ordinary reads."""
        return self._collections[kind].with_options(read_preference=ReadPreference.PRIMARY)

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        if not keys:
            return {}
        by_id: dict[str, list[int]] = {}
        for id_, seq in keys:
            by_id.setdefault(id_, []).append(seq)
        query = {"$or": [{"id": id_, "seq": {"$in": seqs}} for id_, seqs in by_id.items()]}
        projection = {"_id": 0, "id": 1, "seq": 1, "mid": 1}
        documents = self._call("read", lambda: list(self._primary(kind).find(query, projection)))
        return {(d["id"], int(d["seq"])): d.get("mid", "") for d in documents}

    def max_seqs(self, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        # Sorted backwards along the (id, seq) index, $first per id is one index probe each
        # (a DISTINCT_SCAN), not a scan of every entry.
        pipeline: list[dict[str, Any]] = [
            {"$match": {"id": {"$in": list(ids)}}},
            {"$sort": {"id": -1, "seq": -1}},
            {"$group": {"_id": "$id", "seq": {"$first": "$seq"}}},
        ]
        floors_query = {"_id": {"$in": list(ids)}}

        def highest() -> dict[str, int]:
            found = {d["_id"]: int(d["seq"]) for d in self._primary(kind).aggregate(pipeline)}
            for floor in self._floors[kind].find(floors_query):
                found[floor["_id"]] = max(found.get(floor["_id"], 0), int(floor["seq"]))
            return found

        found = self._call("read", highest)
        return {id_: found.get(id_, 0) for id_ in ids}

    def read(
        self, kind: Kind, timeline_id: str, after: int, limit: int, not_before_ms: int = 0
    ) -> list[Entry]:
        query = {"id": timeline_id, "seq": {"$gt": after}, "mid": {"$ne": HOLE_MID}}
        query |= _unexpired(not_before_ms)
        cursor = self._collections[kind].find(query, _PROJECTION).sort("seq", 1).limit(limit)
        return [_entry(d) for d in self._call("read", lambda: list(cursor))]

    def read_backward(
        self, kind: Kind, timeline_id: str, before: int, limit: int, not_before_ms: int
    ) -> list[Entry]:
        query: dict[str, Any] = {"id": timeline_id, "mid": {"$ne": HOLE_MID}}
        if before > 0:
            query["seq"] = {"$lt": before}
        query |= _unexpired(not_before_ms)
        cursor = self._collections[kind].find(query, _PROJECTION).sort("seq", -1).limit(limit)
        return [_entry(d) for d in self._call("read", lambda: list(cursor))]

    def page(
        self, kind: Kind, timeline_id: str, after: int, limit: int, not_before_ms: int
    ) -> Page:
        query: dict[str, Any] = {"id": timeline_id, "mid": {"$ne": HOLE_MID}}
        query |= _unexpired(not_before_ms)
        collection = self._collections[kind]

        def find() -> tuple[Entry | None, int]:
            lowest = collection.find_one(query, _PROJECTION, sort=[("seq", 1)])
            floor = self._floors[kind].find_one({"_id": timeline_id})
            return (
                _entry(lowest) if lowest is not None else None,
                int(floor["seq"]) if floor is not None else 0,
            )

        lowest, floor = self._call("read", find)
        entries = self.read(kind, timeline_id, after, limit, not_before_ms) if limit else []
        return Page(lowest, floor, entries)

    def ping(self) -> None:
        try:
            self._database.command("ping")
        except PyMongoError as exc:
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
