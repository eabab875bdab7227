"""The MongoDB store: the production backend, collections chat_sync and chat_history.

What it relies on, from the MongoDB manual:

- Reads go to the primary, whatever read preference the URI gives: the hole logic and the
  floors compare what one read saw with what the next one sees, which a lagging secondary
  breaks ("Read Preference": secondaries may return stale data).
- What a client is shown (pages, gaps, backward pages, the floors they honour) is read at
  read concern "majority": at "local" a reader "can see the result of a write operation
  before the write operation is acknowledged to the issuing client" and "can read data
  which may be subsequently rolled back during replica set failovers" ("Read Isolation,
  Consistency, and Recency"). A device that was given a sequence a failover then rolled
  back would never be given the message that takes its place. The reads a write makes
  about itself (which keys it found taken, the floors it must stay above, the highest
  sequence a counter is seeded from, an idempotency record it collided with) are at
  "local": the unique index decides a collision against the primary's own data, so the
  document that collided is looked up there, whether or not a majority has it yet.
- Writes are acknowledged by a majority, journaled: an acknowledged `w:1` write can be
  rolled back on failover ("Rollbacks During Replica Set Failover"), and the counter would
  have moved on past a message that no longer exists. The server's default is not always
  majority ("Default MongoDB Read Concerns/Write Concerns": arbiters, setDefaultRWConcern).
  A write error hides a write concern error in pymongo (DuplicateKeyError is raised, the
  writeConcernError dropped), so what a write found taken is read again at majority
  before the write counts it as stored (_confirm_taken).
- Only the unique (id, seq) index gates writes: a build on existing data takes as long as
  the data is big, and the uniqueness of documents written during the build is only
  checked at its end ("Index Builds on Populated Collections"), so no copy is written
  before it is ready. The other indexes (the purge's, the idempotency records' TTL) are
  built after it, beside the traffic. Every build has a deadline and, on a replica set, a
  commit quorum of "majority", not the default "votingMembers", which waits for ever
  while a voting member is down ("createIndexes", commitQuorum). A createIndexes for an
  index already being built joins that build.
- Nothing removes a document without raising its timeline's floor first: a counter that
  Redis lost is seeded from the highest sequence stored or floored, so a deletion below no
  floor would let sequences devices have read be allocated again. So there is no TTL
  index on the entries (a TTL index deletes with no hook); the purge removes them.
- pymongo's client-side operation timeout (timeoutMS) bounds each operation from server
  selection to reply and sends the rest as maxTimeMS, so the server gives up too. Server
  selection alone is bounded by mongo_timeout_ms (see _bound_selection).
- Idempotency records (chat_idempotency) rely on the unique `_id` index for "one record per
  message", and on a TTL index on `expires_at` to forget them: see CLAIMS and prepare().
- Conversations, read positions and devices (chat_conversations, chat_memberships,
  chat_devices) change only by maximums and inserts-if-absent, so a retry applies a change
  again harmlessly; see CONVERSATIONS for what each holds, and write() for the order in
  which a message's history copies and its conversation's state are stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson
import pymongo
from bson.dbref import DBRef
from bson.int64 import Int64
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from timeline.errors import PartialWrite, Unavailable
from timeline.metrics import EXPIRED_REMOVED, dependency_failed
from timeline.model import HOLE_MID, Activity, Conversation, Copies, Entry, Kind, peer_of
from timeline.settings import Settings
from timeline.store import (
    COLLECTIONS,
    Claim,
    ConversationState,
    Cursor,
    Device,
    Gap,
    Page,
    WriteResult,
    split,
)

log = logging.getLogger(__name__)

INDEX_NAME = "id_seq_unique"
INDEX_KEY = [("id", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)]
#: The index the purge finds expired entries by (a plain one: it removes nothing itself).
PURGE_INDEX_NAME = "created_at_purge"
#: The TTL index earlier versions made as a backstop to the purge. It deleted below no floor,
#: so prepare() drops it.
TTL_INDEX_NAME = "created_at_ttl"
#: Every write: acknowledged by a majority of the replica set, and journaled.
WRITE_CONCERN = WriteConcern(w="majority", j=True)
#: What a client is shown: only what a failover cannot roll back.
VISIBLE = ReadConcern("majority")
#: What a write reads about itself: the primary's own data, where collisions are decided.
OWN = ReadConcern("local")
#: Documents removed per purge pass: one find, one bulk write of floors, one delete.
PURGE_BATCH = 1_000
#: How many colliding (id, seq) keys a blocked index build names (and counts up to).
_COLLISIONS_SHOWN = 3
_DUPLICATE_KEY = 11000
_PROJECTION = {
    "_id": 0,
    "seq": 1,
    "message": 1,
    "created_at": 1,
    "mid": 1,
    "conv_kind": 1,
    "conv": 1,
    "conv_seq": 1,
}
#: Documents per batch of a read bounded in bytes (Store.read's max_bytes).
_READ_BATCH = 64
#: Branches per `$or` query of keys: a replay to 10,000 members is many small queries, each
#: planned and served by the (id, seq) index, not one query of 10,000 branches.
_OR_BRANCHES = 256
#: A big write is cut into insert_many calls of whole timelines (a timeline's batch is never
#: cut), each at most this many documents and bytes of messages: each is one operation with
#: its own deadline (mongo_operation_timeout_ms), and a failure leaves those before it
#: stored, found again by a retry as its own. A 10,000-member fan-out of one message is one.
WRITE_CHUNK_ROWS = 10_000
WRITE_CHUNK_BYTES = 16 << 20
#: Idempotent messages' records (Store.claim), one per message:
#: `{_id: mid, fingerprint, lasts: [int64...], allocated_at: Date, expires_at: Date}`.
#: A 10,000-member fan-out's lasts are 10,001 int64, about 140 KB of BSON (an array's
#: elements carry their index as a key), far below the 16 MiB a document may hold.
CLAIMS = "chat_idempotency"
#: Removes a record once its expires_at has passed (expireAfterSeconds 0: at that date).
#: Legal on a sharded collection ("TTL Indexes", the MongoDB manual,
#: https://www.mongodb.com/docs/manual/core/index-ttl/: a TTL index is a single-field index,
#: on any field but _id; sharded clusters are not excluded). Sharded, the collection would
#: be sharded on {_id: "hashed"}: _id is then the shard key, and the _id index enforces its
#: uniqueness across the cluster, which it does only when _id is the shard key ("Shard Key
#: Indexes", https://www.mongodb.com/docs/manual/core/sharding-shard-key-indexes/); every
#: operation below names _id, so each is routed to the one shard holding it.
CLAIMS_TTL_INDEX_NAME = "expires_at_ttl"
#: How many times claim() reads again after losing a race (an insert or a replacement of an
#: expired record that another claim made first); each round, another claim made progress.
_CLAIM_ROUNDS = 5
#: Conversations (Store.conversations), one document per history timeline:
#: `{_id: history id, kind, latest, last: {seq, message, created_at, mid}, activity_at: Date,
#: members: digest}`. `latest` only rises (a conditional update: see _raise_conversation);
#: `last` is the message at `latest`, `activity_at` its creation time (what the list is
#: ordered by); `members` the digest of the member list whose memberships are all stored
#: (a group's sends mostly list the same members: then none is written). No secondary index:
#: the list looks documents up by `_id` only (see conversations()).
CONVERSATIONS = "chat_conversations"
#: Conversation ids one find of a member's list names at most (each up to ~300 bytes as
#: BSON: far below a command's 16 MB).
_IN_CHUNK = 20_000
#: One document per member and conversation: `{member, conversation, kind, peer, read,
#: listed}`. `read` only rises; `listed` (in the member's list: it sent or received a message
#: there) only turns true: mark_read alone leaves a position unlisted.
MEMBERSHIPS = "chat_memberships"
#: One document per member and device: `{member, device, position, last_seen: Date}`.
DEVICES = "chat_devices"
#: Their unique indexes. They gate what upserts by their key (write(), mark_read, the
#: devices' calls): without one, two upserts of the same key racing both insert (MongoDB
#: retries an upsert's duplicate key error only where a unique index raised it: "Upsert with
#: Duplicate Values", db.collection.update()), and the index could then never be built. On
#: collections this version makes they are empty, so built at once, before the (id, seq) ones.
MEMBERSHIP_INDEX_NAME = "member_conversation_unique"
MEMBERSHIP_KEY = [("member", pymongo.ASCENDING), ("conversation", pymongo.ASCENDING)]
DEVICE_INDEX_NAME = "member_device_unique"
DEVICE_KEY = [("member", pymongo.ASCENDING), ("device", pymongo.ASCENDING)]
#: The placeholders of the history timelines, and only they: an unread count subtracts those
#: after the member's read position, a count over a few index keys. Same key as the unique
#: index, told apart by its partial filter (MongoDB 5.0 and later keep both: the filter is
#: part of an index's identity, "Partial Indexes", Restrictions). Not gating: until it is
#: built the count scans the conversation's range of the unique index.
HOLES_INDEX_NAME = "id_seq_holes"
HOLES_FILTER = {"mid": HOLE_MID}
#: Membership upserts per bulk write (a fan-out to 10,000+ members is several).
MEMBERSHIP_CHUNK = 10_000
T = TypeVar("T")


class SchemaProblem(Exception):
    """The collections hold something that stops the service's indexes being built."""


class NotCommitted(PyMongoError):
    """What a write found taken is not yet majority-committed (or was rolled back): it
    cannot count as stored. The write fails (Unavailable); its retry finds it committed,
    or free."""


def _date(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _bson(copies: Copies) -> list[dict[str, Any]]:
    """The documents of these copies, as MongoDB stores them (`message` as a document). Sync
    copies with `about` also hold their conversation: `conv_kind`, `conv` (its name as that
    member knows it) and `conv_seq` (the message's history sequence), as Copies.rows()."""
    created_at = _date(copies.created_at_ms)
    documents = [message.document for message in copies.messages]
    about = copies.about
    if about is None:
        return [
            {"id": id_, "seq": first + j, "message": document, "created_at": created_at}
            | {"mid": copies.mid}
            for id_, first in zip(copies.ids, copies.firsts, strict=True)
            for j, document in enumerate(documents)
        ]
    kind, start = about.kind.value, about.first
    names = about.peers if about.peers is not None else [about.name] * len(copies.ids)
    return [
        {"id": id_, "seq": first + j, "message": document, "created_at": created_at}
        | {"mid": copies.mid, "conv_kind": kind, "conv": name}
        | {"conv_seq": start + j if start else 0}
        for id_, first, name in zip(copies.ids, copies.firsts, names, strict=True)
        for j, document in enumerate(documents)
    ]


def _json_default(value: Any) -> Any:
    """BSON types JSON lacks, in documents this service did not write (go-timeline's)."""
    if isinstance(value, DBRef):
        return dict(value.as_doc())
    return str(value)  # ObjectId, Decimal128, Binary, Timestamp...


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _ms(value: Any) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # pymongo decodes naive UTC datetimes by default
            value = value.replace(tzinfo=UTC)
        # Exact: int(timestamp() * 1000) is a millisecond short for some dates (floats).
        return int((value - _EPOCH) // _MS)
    return 0  # documents written by go-timeline carry no creation time


#: The latest date a cursor can name (datetime's range); a cursor above it bounds nothing.
_LATEST_MS = 253_402_300_799_999


def _unread_range(membership: dict[str, Any], conversation: dict[str, Any]) -> tuple[str, int, int]:
    """(history id, read, latest): where the member's unread messages are."""
    latest = int(conversation.get("latest", 0))
    return conversation["_id"], min(int(membership.get("read", 0)), latest), latest


def _state(
    membership: dict[str, Any], conversation: dict[str, Any], holes: int, last: Entry | None
) -> ConversationState:
    """The conversation as the member sees it, from its membership and conversation
    documents, the number of placeholders after the member's read position, and its latest
    message as the history holds it."""
    _, read, latest = _unread_range(membership, conversation)
    kind = conversation.get("kind") or membership.get("kind") or Conversation.GROUP.value
    return ConversationState(
        kind=Conversation(kind),
        conversation=conversation["_id"],
        peer=membership.get("peer", ""),
        latest=latest,
        read=read,
        unread=max(0, latest - read - holes),
        last=last,
        activity_ms=_ms(conversation.get("activity_at")),
    )


def _peer_of_sender(activity: Activity) -> str:
    """What the sender calls the conversation: the other user of a one-to-one one."""
    if activity.kind is Conversation.SINGLE:
        return peer_of(activity.conversation, activity.sender)
    return activity.peer


def _upsert(collection: Collection[Any], key: dict[str, Any], change: dict[str, Any]) -> Any:
    """update_one(upsert=True) by a unique key. Two upserts of a new key racing: MongoDB
    retries the one that lost itself (an equality match on the unique index's fields, "Upsert
    with Duplicate Values"); should a server not, it is retried here once: it matches now."""
    try:
        return collection.update_one(key, change, upsert=True)
    except DuplicateKeyError:
        return collection.update_one(key, change, upsert=True)


def _upserted(
    collection: Collection[Any],
    key: dict[str, Any],
    change: dict[str, Any],
    projection: dict[str, Any],
) -> dict[str, Any] | None:
    """_upsert, answering the document as the change left it (find_one_and_update)."""

    def once() -> dict[str, Any] | None:
        found: dict[str, Any] | None = collection.find_one_and_update(
            key, change, projection, upsert=True, return_document=pymongo.ReturnDocument.AFTER
        )
        return found

    try:
        return once()
    except DuplicateKeyError:  # lost the race to insert it: it matches now
        return once()


def _upsert_all(collection: Collection[Any], upserts: list[UpdateOne]) -> None:
    """One unordered bulk write of upserts by a unique key; those that lost a race for a new
    key (a duplicate key error) are sent once more, as _upsert does. Any other error, or a
    write concern error, is raised."""
    for attempt in range(2):
        try:
            collection.bulk_write(upserts, ordered=False)
            return
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if (
                attempt
                or exc.details.get("writeConcernErrors")
                or not errors
                or any(e.get("code") != _DUPLICATE_KEY for e in errors)
            ):
                raise
            upserts = [upserts[int(e["index"])] for e in errors]


def _claim_document(claim: Claim) -> dict[str, Any]:
    return {
        "_id": claim.mid,
        "fingerprint": claim.fingerprint,
        "lasts": [Int64(last) for last in claim.lasts],
        "allocated_at": _date(claim.allocated_ms),
        "expires_at": _date(claim.expires_ms),
    }


def _claim_of(document: dict[str, Any]) -> Claim:
    return Claim(
        document["_id"],
        document["fingerprint"],
        tuple(map(int, document["lasts"])),
        _ms(document["allocated_at"]),
        _ms(document["expires_at"]),
    )


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
        document.get("conv_kind", ""),
        document.get("conv", ""),
        int(document.get("conv_seq", 0)),
    )


class MongoStore:
    """pymongo's client pools connections and is thread-safe; create it after the fork."""

    backend = "mongo"

    def __init__(
        self,
        database: Database[Any],
        client: Any = None,
        retention_ms: dict[Kind, int] | None = None,
        write_chunk_rows: int = WRITE_CHUNK_ROWS,
        write_chunk_bytes: int = WRITE_CHUNK_BYTES,
        index_build_timeout_s: float = 0,
    ) -> None:
        self._client = client
        self.write_chunk_rows = write_chunk_rows
        self.write_chunk_bytes = write_chunk_bytes
        self._database = database
        # Two handles on each collection: what a write does and reads about itself (OWN),
        # and what a client is shown (VISIBLE). See the module's docstring.
        self._collections: dict[Kind, Collection[Any]] = {
            kind: _pinned(database[name], OWN) for kind, name in COLLECTIONS.items()
        }
        self._visible: dict[Kind, Collection[Any]] = {
            kind: _pinned(database[name], VISIBLE) for kind, name in COLLECTIONS.items()
        }
        # What ack and the purge removed, per timeline: {_id: timeline id, seq: highest}.
        self._floors: dict[Kind, Collection[Any]] = {
            kind: _pinned(database[f"{name}_floor"], OWN) for kind, name in COLLECTIONS.items()
        }
        self._visible_floors: dict[Kind, Collection[Any]] = {
            kind: _pinned(database[f"{name}_floor"], VISIBLE) for kind, name in COLLECTIONS.items()
        }
        self._claims = _pinned(database["timeline_claims"], OWN)
        self._idempotency = _pinned(database[CLAIMS], OWN)
        self._visible_idempotency = _pinned(database[CLAIMS], VISIBLE)
        self._conversations = _pinned(database[CONVERSATIONS], OWN)
        self._visible_conversations = _pinned(database[CONVERSATIONS], VISIBLE)
        self._memberships = _pinned(database[MEMBERSHIPS], OWN)
        self._visible_memberships = _pinned(database[MEMBERSHIPS], VISIBLE)
        self._devices = _pinned(database[DEVICES], OWN)
        self._visible_devices = _pinned(database[DEVICES], VISIBLE)
        self.membership_chunk = MEMBERSHIP_CHUNK
        self._retention = {kind: (retention_ms or {}).get(kind, 0) for kind in Kind}
        # 0: no deadline (timeline-admin migrate); the service sets one (see connect()).
        self._index_build_timeout_s = index_build_timeout_s
        self._state = "building"  # of the unique indexes, which gate writes
        # The unique indexes of memberships and devices, built first (instantly: new
        # collections): read positions and devices need only them, not the (id, seq) ones.
        self._positions_ready = False
        self._others = "building"  # of the indexes built beside the traffic
        self._problem = ""  # why the state is "blocked": one line for an operator
        self._purge_index: dict[Kind, str | None] = {}  # its name, once built
        self._prepare_lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings, retention_ms: dict[Kind, int]) -> MongoStore:
        """A store on the settings' URI; connecting happens lazily, at the first operation.

        The keyword options override the URI's (pymongo gives keywords precedence): reads
        on the primary, majority writes with journal, and one deadline per operation.
        """
        assert settings.mongo_uri is not None
        for name, value in _overridden(settings.mongo_uri):
            log.warning(
                "mongo_uri sets %s=%s; the service overrides it: reads go to the primary, "
                "clients are shown only majority-committed data and writes wait for a "
                "journaled majority, or messages could be skipped or lost",
                name,
                value,
            )
        timeout = settings.mongo_timeout_ms
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(
            settings.mongo_uri,
            serverSelectionTimeoutMS=timeout,
            connectTimeoutMS=timeout,
            timeoutMS=settings.mongo_operation_timeout_ms,
            readPreference="primary",
            readConcernLevel="majority",
            w="majority",
            journal=True,
            appname="timeline",
            tz_aware=True,
        )
        _bound_selection()
        return cls(
            client[settings.mongo_database],
            client=client,
            retention_ms=retention_ms,
            index_build_timeout_s=settings.mongo_index_build_timeout_seconds,
        )

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run an operation; a driver error becomes Unavailable (its cause logged)."""
        try:
            return operation()
        except PyMongoError as exc:
            log.warning("mongo %s failed: %s", what, exc)
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    def _writable(self) -> None:
        """Refuse a write, at once, until the unique index is built: MongoDB checks the
        uniqueness of documents written during a build only at its end."""
        if self._state != "ready":
            raise Unavailable(
                f"store (mongo) is not ready: indexes {self._state} (see /readyz)",
                indexes=self._state,
            )

    def _positions_writable(self) -> None:
        """Refuse an upsert of a read position or a device, at once, until the unique
        indexes on their keys are built (see MEMBERSHIP_INDEX_NAME)."""
        if not self._positions_ready:
            state = "building" if self._state == "ready" else self._state
            raise Unavailable(
                f"store (mongo) is not ready: indexes {state} (see /readyz)", indexes=state
            )

    # --- indexes --------------------------------------------------------------------------

    def prepare(self) -> None:
        """First the unique indexes, which gate writes: those of memberships and devices
        (on collections this version makes: built at once), then (id, seq) on both
        collections; then, beside the traffic, the index the purge finds expired entries by
        (when a retention asks for one), the TTL index that forgets expired idempotency
        records and the partial index of the history's placeholders. Each
        build has the store's deadline (none for timeline-admin migrate) and, on a replica
        set, a commit quorum of "majority". Run at start-up in a thread of its own
        (Preparer) or by `timeline-admin migrate`, never in a request.

        Documents that collide on (id, seq) block the unique index until an operator
        removes them: readiness() says "blocked", problem() names them, and the Preparer
        stops trying (a build scans and sorts the whole collection)."""
        with self._prepare_lock:
            if self._state == "ready" and self._others == "ready":
                return
            started = time.monotonic()
            try:
                with pymongo.timeout(self._index_build_timeout_s):
                    if self._state != "ready":
                        self._state = "building"
                        if not self._positions_ready:
                            _ensure_unique_key(
                                self._memberships, MEMBERSHIP_KEY, MEMBERSHIP_INDEX_NAME
                            )
                            _ensure_unique_key(self._devices, DEVICE_KEY, DEVICE_INDEX_NAME)
                            # A conversation's memberships, for its member list's changes.
                            _create_index(
                                self._memberships,
                                [("conversation", pymongo.ASCENDING)],
                                name="conversation_1",
                            )
                            self._positions_ready = True
                        for collection in self._collections.values():
                            _ensure_unique(collection)
                        self._state = "ready"
                        log.info("mongo unique indexes ready: writes accepted")
                    self._others = "building"
                    for kind, collection in self._collections.items():
                        wanted = bool(self._retention[kind])
                        self._purge_index[kind] = _ensure_purge_index(collection, wanted)
                    _ensure_expiry(self._idempotency)
                    _ensure_holes_index(self._collections[Kind.HISTORY])
                    self._others = "ready"
            except PyMongoError as exc:
                deadline = self._index_build_timeout_s
                if deadline and time.monotonic() - started >= deadline:  # MongoDB aborts
                    late = SchemaProblem(
                        f"an index build took longer than mongo_index_build_timeout_seconds "
                        f"({self._index_build_timeout_s:g} s) and was aborted; run timeline-admin "
                        f"migrate (no deadline) or raise the setting ({exc})"
                    )
                    self._block(late)
                    raise Unavailable(f"store (mongo) indexes blocked: {late}") from exc
                if self._state != "ready":
                    self._state = "failed"
                self._others = "failed"
                log.error("mongo indexes cannot be made ready: %s", exc)
                dependency_failed("store")
                raise Unavailable(f"store (mongo) indexes cannot be made ready: {exc}") from exc
            except SchemaProblem as exc:
                self._block(exc)
                raise Unavailable(f"store (mongo) indexes blocked: {exc}") from exc
            log.info("mongo indexes ready")

    def _block(self, problem: Exception) -> None:
        """Stop building until an operator acts: a retry would scan the collection again
        and fail the same way."""
        if self._state != "ready":
            self._state = "blocked"
        self._others = "blocked"
        self._problem = str(problem)
        log.error("mongo indexes blocked: %s", problem)
        dependency_failed("store")

    def readiness(self) -> str:
        return self._state

    def problem(self) -> str:
        """Why an index cannot be built without an operator, in one line; "" when none."""
        return self._problem if "blocked" in (self._state, self._others) else ""

    # --- writing --------------------------------------------------------------------------

    def write(
        self,
        history: Copies | None,
        sync: Copies | None,
        claim: Claim | None = None,
        now_ms: int = 0,
    ) -> WriteResult:
        self._writable()
        if claim is not None:
            # Its own collection, so not one transaction with the copies: the claim first,
            # as claim() stores it (the contract asks no more).
            stored = self.claim(claim, now_ms)
            if stored != claim:
                return WriteResult(claimed=stored)
        if history is not None and not self._store_history(history):
            return WriteResult(history_taken=True)
        if sync is None:
            return WriteResult()
        # From here on the history copy is stored: a failure says so (PartialWrite).
        taken: list[int] = []
        try:
            for offset, part in split(sync, self.write_chunk_rows, self.write_chunk_bytes):
                taken.extend(offset + position for position in self._write_sync(part))
        except PyMongoError as exc:
            log.warning("mongo write failed after the history copy: %s", exc)
            dependency_failed("store")
            if history is not None:
                raise PartialWrite("store (mongo) failed midway") from exc
            raise Unavailable("store (mongo) is unavailable") from exc
        return WriteResult(sync_taken=taken)

    def _store_history(self, history: Copies) -> bool:
        """The history copies, with their Activity around them: the memberships and the
        sender's read position before (a reader in between sees the sender's message as read,
        never as unread), the conversation's latest after, once they are stored or found
        stored by this very message (a retry of a write whose copies got in and whose
        conversation may not have followed). Whether they went in.

        A failure after the copies went in but before the conversation followed is
        Unavailable, not PartialWrite: the caller then writes the history copies again, and
        that retry (found taken, by this mid) is what moves the conversation; after
        PartialWrite it would not write them again."""
        activity = history.activity
        if activity is not None:
            self._call("write", lambda: self._before_history(activity))
        if self._call("write", lambda: self._write_history(history)):
            if activity is not None:
                self._call("write", lambda: self._raise_conversation(activity))
            return True
        if activity is not None and self._call("write", lambda: self._stored_as(history)):
            self._call("write", lambda: self._raise_conversation(activity))
        return False

    def _stored_as(self, history: Copies) -> bool:
        """Whether every history copy is stored, by this message (read at "local", like
        owners(): the collision was decided on the primary's data; a majority has the first
        one, see _confirm_taken, and the majority write that follows waits for the rest)."""
        keys = list(_keys(history))
        found = {
            (d["id"], int(d["seq"])): d.get("mid", "")
            for query in _key_queries(keys)
            for d in self._collections[Kind.HISTORY].find(
                query, {"_id": 0, "id": 1, "seq": 1, "mid": 1}
            )
        }
        return all(found.get(key) == history.mid for key in keys)

    def _before_history(self, activity: Activity) -> None:
        """Every member's list entry (none written when the conversation's digest says its
        members are all stored already), then the sender's read position, raised to its
        own last message."""
        conversation = activity.conversation
        kind = activity.kind.value
        digest = activity.members_digest()
        stored = self._conversations.find_one({"_id": conversation}, {"members": 1})
        sender_listed = False
        if stored is None or stored.get("members") != digest:
            # A new member has read what the history holds below this message (not
            # `first - 1`: a message below may still be on its way, and it is sent to this
            # member too). At "local": the write's own read, as owners() is.
            below = self._collections[Kind.HISTORY].find_one(
                {"id": conversation, "seq": {"$lt": activity.first}},
                {"_id": 0, "seq": 1},
                sort=[("seq", pymongo.DESCENDING)],
            )
            start = int(below["seq"]) if below is not None else 0
            entries: list[UpdateOne] = []
            for i, member in enumerate(activity.members):
                change: dict[str, Any] = {
                    "$set": {"listed": True, "kind": kind, "peer": activity.peer_of(i)}
                }
                if member == activity.sender:
                    change["$max"] = {"read": activity.last}
                    sender_listed = True
                else:  # a new member has read what came before (see Activity.first)
                    change["$setOnInsert"] = {"read": start}
                key = {"member": member, "conversation": conversation}
                entries.append(UpdateOne(key, change, upsert=True))
            step = max(1, self.membership_chunk)
            for start in range(0, len(entries), step):
                _upsert_all(self._memberships, entries[start : start + step])
            if stored is not None and stored.get("members"):
                # A member the new list leaves out (removed from a group) leaves the list:
                # it is no longer sent the conversation's messages.
                self._memberships.update_many(
                    {
                        "conversation": conversation,
                        "listed": True,
                        "member": {"$nin": list(activity.members)},
                    },
                    {"$set": {"listed": False}},
                )
            _upsert(
                self._conversations,
                {"_id": conversation},
                {"$set": {"members": digest}, "$setOnInsert": {"kind": kind, "latest": 0}},
            )
        if activity.sender and not sender_listed:
            # Listed already (the digest held), or not among the members (a request that
            # names its sender apart): its read position alone.
            peer = _peer_of_sender(activity)
            _upsert(
                self._memberships,
                {"member": activity.sender, "conversation": conversation},
                {
                    "$max": {"read": activity.last},
                    "$set": {"listed": True},
                    "$setOnInsert": {"kind": kind, "peer": peer},
                },
            )

    def _raise_conversation(self, activity: Activity) -> None:
        """latest = max(latest, activity.last), with its time when it is the new maximum
        (the message itself is read from the history, see _latest_entries): an update that
        matches only a lower `latest`, so that a late or retried write of an earlier message
        never overwrites a later one. Two first messages racing: the upsert of one meets the
        other's document (duplicate _id), and updates it only while it is still lower."""
        conversations = self._conversations
        below = {"_id": activity.conversation, "latest": {"$lt": activity.last}}
        change = {
            "$set": {
                "kind": activity.kind.value,
                "latest": activity.last,
                "activity_at": _date(activity.created_at_ms),
            }
        }
        try:
            conversations.update_one(below, change, upsert=True)
        except DuplicateKeyError:
            # It exists: as high already (nothing to do), or made a moment ago lower.
            conversations.update_one(below, change)

    def _write_history(self, history: Copies) -> bool:
        """Insert the history documents; False when one's (id, seq) is taken (and that
        document is majority-committed: see _confirm_taken)."""
        collection = self._collections[Kind.HISTORY]
        documents = _bson(history)
        keys = list(_keys(history))
        try:
            if len(documents) == 1:
                collection.insert_one(documents[0])
            else:
                collection.insert_many(documents, ordered=True)
        except DuplicateKeyError:
            # pymongo raises the write error and drops a write concern error beside it.
            self._confirm_taken(Kind.HISTORY, keys[:1])
            return False
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if exc.details.get("writeConcernErrors") or not errors:
                raise  # those stored before the error may be rolled back
            if all(e.get("code") == _DUPLICATE_KEY for e in errors):
                # ordered: those before the taken one are stored; the caller finds them
                # taken with its own mid, or removes them when it moves the range.
                self._confirm_taken(Kind.HISTORY, [keys[int(e["index"])] for e in errors])
                return False
            raise
        if self._below_floors(Kind.HISTORY, history):
            self._delete(Kind.HISTORY, list(_keys(history)), history.mid)
            return False
        return True

    def _write_sync(self, sync: Copies) -> list[int]:
        """insert_many(ordered=False) of (a part of) the sync copies; the positions taken."""
        taken = self._insert_unordered(Kind.SYNC, _bson(sync))
        keys = list(_keys(sync))
        self._confirm_taken(Kind.SYNC, [keys[i] for i in taken])
        below = self._below_floors(Kind.SYNC, sync) - set(taken)
        if not below:
            return taken
        self._delete(Kind.SYNC, [keys[i] for i in sorted(below)], sync.mid)
        return sorted(below.union(taken))

    def _confirm_taken(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> None:
        """Raise NotCommitted unless every one of these keys, which a write found taken, is
        stored at read concern majority. A duplicate key is decided against the primary's
        own data, which may hold a write not yet acknowledged by a majority (another
        attempt's, still waiting for it, or one a failover will roll back); and pymongo
        drops the write concern error of a reply that also holds a write error. A key
        counted taken that then rolls back would be a copy acknowledged and lost."""
        if not keys:
            return
        visible = self._visible[kind]
        projection = {"_id": 0, "id": 1, "seq": 1}
        found = {
            (d["id"], int(d["seq"]))
            for query in _key_queries(keys)
            for d in visible.find(query, projection)
        }
        missing = [key for key in keys if key not in found]
        if missing:
            raise NotCommitted(
                f"{len(missing)} {COLLECTIONS[kind]} key(s) found taken are not "
                f"majority-committed, first {missing[0]}"
            )

    def _below_floors(self, kind: Kind, copies: Copies) -> set[int]:
        """Copies at or below their timeline's floor (what ack and the purge removed), by
        position in `copies.rows()`: no reader looks there, so they count as taken, and the
        write moves them above. Checked after the insert, not before: a floor that rose
        while the insert was in flight (a concurrent ack) must count too. SQLite's trigger
        decides the same inside its transaction; here a copy that a device read and acked
        in the moment between the insert and this check would be moved, and so delivered
        twice, rather than lost."""
        ids = list(set(copies.ids))
        floors = {f["_id"]: int(f["seq"]) for f in self._floors[kind].find({"_id": {"$in": ids}})}
        if not floors:
            return set()
        return {i for i, (id_, seq) in enumerate(_keys(copies)) if seq <= floors.get(id_, 0)}

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

    def _delete(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        """Delete the documents of message `mid` at these keys."""
        for query in _key_queries(keys):
            self._collections[kind].delete_many(query | {"mid": mid})

    def seal(
        self, kind: Kind, keys: Sequence[tuple[str, int]], created_at_ms: int
    ) -> list[tuple[str, int]]:
        self._writable()
        # With a created_at, the purge removes old seals too (raising the floor over them).
        created_at = _date(created_at_ms)
        holes = [
            {"id": id_, "seq": seq, "message": {}, "created_at": created_at, "mid": HOLE_MID}
            for id_, seq in keys
        ]
        step = self.write_chunk_rows

        def insert() -> list[int]:
            return [
                start + i
                for start in range(0, len(holes), step)
                for i in self._insert_unordered(kind, holes[start : start + step])
            ]

        return [keys[i] for i in self._call("seal", insert)]

    def unwrite(self, kind: Kind, keys: Sequence[tuple[str, int]], mid: str) -> None:
        if keys:
            self._call("unwrite", lambda: self._delete(kind, keys, mid))

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

    def gap(self, kind: Kind, timeline_id: str, low: int, high: int, not_before_ms: int) -> Gap:
        collection = self._visible[kind]  # what a reader may step over: see page()
        run: dict[str, Any] = {"id": timeline_id, "seq": {"$gte": low, "$lt": high}}
        hidden: dict[str, Any] = {"mid": HOLE_MID}
        if not_before_ms:  # a document without created_at (go-timeline's) never expires
            hidden = {"$or": [hidden, {"created_at": {"$lt": _date(not_before_ms)}}]}

        def counts() -> Gap:
            # Hidden first: a document stored between the two counts only adds to present,
            # which sends the reader back to read the page again.
            hidden_count = collection.count_documents(run | hidden)
            if hidden_count == high - low:
                return Gap(hidden_count, hidden_count)
            return Gap(collection.count_documents(run), hidden_count)

        return self._call("read", counts)

    def purge(self, kind: Kind, before_ms: int) -> int:
        """Passes of PURGE_BATCH expired documents, each three operations whatever the
        number of timelines: find them (by the purge index), raise every timeline's floor
        to its highest one in one unordered bulk write, then delete them. The floors come
        first: should the delete fail, nothing is lost but space; no document is ever
        removed below a floor (see the module's docstring). Nothing to do until the purge
        index is built (a pass would scan the collection)."""
        index = self._purge_index.get(kind)
        if index is None and self._retention[kind]:
            log.info("%s: the purge waits for its index (see /readyz)", COLLECTIONS[kind])
            return 0
        # A store told of no retention for this kind has no purge index: a direct call (a
        # test, a one-off) scans the collection.
        collection = self._collections[kind]
        floors = self._floors[kind]
        expired = {"created_at": {"$lt": _date(before_ms)}}
        removed = 0

        def one_pass() -> int:
            cursor = collection.find(expired, {"_id": 1, "id": 1, "seq": 1})
            found = list((cursor if index is None else cursor.hint(index)).limit(PURGE_BATCH))
            highest: dict[str, int] = {}
            for document in found:
                seq = int(document["seq"])
                highest[document["id"]] = max(seq, highest.get(document["id"], 0))
            if highest:
                raises = [
                    UpdateOne({"_id": id_}, {"$max": {"seq": seq}}, upsert=True)
                    for id_, seq in highest.items()
                ]
                floors.bulk_write(raises, ordered=False)
                collection.delete_many({"_id": {"$in": [d["_id"] for d in found]}})
            return len(found)

        while True:
            count = self._call("purge", one_pass)
            removed += count
            if count < PURGE_BATCH:
                break
        if removed:
            EXPIRED_REMOVED.labels(kind.value).inc(removed)
        return removed

    def claim_purge(self, now_ms: int, period_ms: int) -> bool:
        claims = self._claims

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

    # --- idempotency ----------------------------------------------------------------------

    def claim(self, claim: Claim, now_ms: int) -> Claim:
        """insert_one; when the mid is taken, the stored record, unless it has expired: then
        a replace_one that matches only while it still has, so that of two claims replacing
        it one wins and the other reads the winner. A record the TTL index removed between
        two steps is inserted again."""
        self._writable()
        records = self._idempotency
        document = _claim_document(claim)
        expired = {"_id": claim.mid, "expires_at": {"$lte": _date(now_ms)}}

        def inserted() -> bool:
            try:
                records.insert_one(dict(document))
            except DuplicateKeyError:
                return False
            return True

        def run() -> Claim:
            if inserted():
                return claim
            for _ in range(_CLAIM_ROUNDS):
                found = records.find_one({"_id": claim.mid})
                if found is None:
                    if inserted():  # removed since (expired): stored now, or taken again
                        return claim
                elif _ms(found["expires_at"]) > now_ms:
                    return self._committed(found)
                elif records.replace_one(expired, dict(document)).matched_count:
                    return claim
                # Another claim got there first (or the TTL index removed it): read again.
            raise PyMongoError(f"claim of {claim.mid} lost {_CLAIM_ROUNDS} races in a row")

        return self._call("claim", run)

    def reclaim(self, expected: Claim, lasts: tuple[int, ...]) -> Claim | None:
        """find_one_and_update matching the record's fingerprint and its whole `lasts` array
        (an equality match on an array matches that exact array, in order: MongoDB manual,
        "Query an Array", "Match an Array"); the update of one document is atomic, so of
        two attempts swapping from the same lasts one matches. When none matched, the
        record as it is."""
        self._writable()
        records = self._idempotency
        match = {
            "_id": expected.mid,
            "fingerprint": expected.fingerprint,
            "lasts": [Int64(last) for last in expected.lasts],
        }
        change = {"$set": {"lasts": [Int64(last) for last in lasts]}}

        def run() -> Claim | None:
            found = records.find_one_and_update(
                match, change, return_document=pymongo.ReturnDocument.AFTER
            )
            if found is not None:
                return _claim_of(found)  # its own write: a write concern error is raised
            found = records.find_one({"_id": expected.mid})
            return None if found is None else self._committed(found)

        return self._call("reclaim", run)

    def _committed(self, found: dict[str, Any]) -> Claim:
        """The record another attempt stored, once a read at majority shows it as it was
        read (it collided with this attempt's insert at the primary, where it may not be
        majority-committed yet: adopting a record a failover rolls back would let two
        attempts decide differently). Raises NotCommitted otherwise."""
        record = _claim_of(found)
        seen = self._visible_idempotency.find_one({"_id": record.mid})
        if seen is None or _claim_of(seen) != record:
            raise NotCommitted(f"the record of {record.mid} is not majority-committed")
        return record

    def forget_expired_claims(self, now_ms: int) -> int:
        """Nothing: the TTL index on expires_at removes expired records (within a minute
        or so of their expiry: the TTL monitor's period); claim() replaces an expired one
        it finds before that."""
        return 0

    # --- reading --------------------------------------------------------------------------

    def owners(self, kind: Kind, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        # At "local": a write asks whose are the keys it found taken, and the unique index
        # decided that on the primary's own data, majority-committed or not.
        projection = {"_id": 0, "id": 1, "seq": 1, "mid": 1}
        collection = self._collections[kind]

        def find() -> dict[tuple[str, int], str]:
            return {
                (d["id"], int(d["seq"])): d.get("mid", "")
                for query in _key_queries(keys)
                for d in collection.find(query, projection)
            }

        return self._call("read", find) if keys else {}

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
        # At "local": a counter is seeded from this, and must start above every sequence
        # the primary holds, also one a majority does not have yet (seeding below it would
        # hand that sequence out again).

        def highest() -> dict[str, int]:
            found = {d["_id"]: int(d["seq"]) for d in self._collections[kind].aggregate(pipeline)}
            for floor in self._floors[kind].find(floors_query):
                found[floor["_id"]] = max(found.get(floor["_id"], 0), int(floor["seq"]))
            return found

        found = self._call("read", highest)
        return {id_: found.get(id_, 0) for id_ in ids}

    def read(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int = 0,
        max_bytes: int = 0,
    ) -> list[Entry]:
        query = {"id": timeline_id, "seq": {"$gt": after}, "mid": {"$ne": HOLE_MID}}
        query |= _unexpired(not_before_ms)
        cursor = self._visible[kind].find(query, _PROJECTION).sort("seq", 1).limit(limit)
        if not max_bytes:
            return [_entry(d) for d in self._call("read", lambda: list(cursor))]

        def until() -> list[Entry]:
            # In batches of _READ_BATCH documents, stopped (and the cursor closed) once the
            # messages read are past max_bytes: a page of big ones is not fetched whole.
            entries: list[Entry] = []
            left = max_bytes
            with cursor.batch_size(min(limit, _READ_BATCH)) as documents:
                for document in documents:
                    entry = _entry(document)
                    entries.append(entry)
                    left -= len(entry.message)
                    if left < 0:
                        break
            return entries

        return self._call("read", until)

    def read_backward(
        self, kind: Kind, timeline_id: str, before: int, limit: int, not_before_ms: int
    ) -> list[Entry]:
        query: dict[str, Any] = {"id": timeline_id, "mid": {"$ne": HOLE_MID}}
        if before > 0:
            query["seq"] = {"$lt": before}
        query |= _unexpired(not_before_ms)
        cursor = self._visible[kind].find(query, _PROJECTION).sort("seq", -1).limit(limit)
        return [_entry(d) for d in self._call("read", lambda: list(cursor))]

    def page(
        self,
        kind: Kind,
        timeline_id: str,
        after: int,
        limit: int,
        not_before_ms: int,
        max_bytes: int = 0,
    ) -> Page:
        # Everything a client is shown is read at majority (VISIBLE): the entries, the
        # lowest one, the floor, and gap()'s counts, which decide whether a reader steps
        # over a hole. A copy the primary holds that a majority does not yet is missing
        # here; the reader waits for it as for any late write.
        query: dict[str, Any] = {"id": timeline_id, "mid": {"$ne": HOLE_MID}}
        query |= _unexpired(not_before_ms)
        collection = self._visible[kind]

        def find() -> tuple[Entry | None, int]:
            lowest = collection.find_one(query, _PROJECTION, sort=[("seq", 1)])
            floor = self._visible_floors[kind].find_one({"_id": timeline_id})
            return (
                _entry(lowest) if lowest is not None else None,
                int(floor["seq"]) if floor is not None else 0,
            )

        lowest, floor = self._call("read", find)
        entries = (
            self.read(kind, timeline_id, after, limit, not_before_ms, max_bytes) if limit else []
        )
        return Page(lowest, floor, entries)

    # --- conversations, read positions, devices --------------------------------------------

    def conversations(
        self, member: str, limit: int, before: Cursor | None
    ) -> list[ConversationState]:
        """Two finds and at most a few small aggregations, whatever the member's number of
        conversations: its listed memberships (the (member, conversation) index's range; a
        few small fields each), then its conversations by `_id` among them, below the cursor,
        sorted by (activity, id) and cut at `limit` on the server (a top-k sort: only
        `limit` documents are kept), then the placeholders after each read position of the
        page's conversations (see _holes). Activity is kept on the conversation alone, not
        copied into each member's membership: a group's message then updates one document,
        not one per member. All at "majority": what a client is shown."""
        if limit <= 0:
            return []
        projection = {"_id": 0, "conversation": 1, "peer": 1, "read": 1, "kind": 1}

        def run() -> list[ConversationState]:
            memberships: dict[str, dict[str, Any]] = {}
            listed = self._visible_memberships.find({"member": member, "listed": True}, projection)
            for found in listed:
                memberships[found["conversation"]] = found
            if not memberships:
                return []
            below: dict[str, Any] = {}
            if before is not None and before.activity_ms <= _LATEST_MS:
                at = _date(before.activity_ms)
                below["$or"] = [
                    {"activity_at": {"$lt": at}},
                    {"activity_at": at, "_id": {"$lt": before.conversation}},
                ]
            order = [("activity_at", pymongo.DESCENDING), ("_id", pymongo.DESCENDING)]
            ids = list(memberships)
            documents: list[dict[str, Any]] = []
            # A member in very many conversations: several finds, each a top-`limit` of its
            # share of them (a command holds at most 16 MB), merged.
            for start in range(0, len(ids), _IN_CHUNK):
                query = {"_id": {"$in": ids[start : start + _IN_CHUNK]}, "latest": {"$gt": 0}}
                cursor = self._visible_conversations.find(query | below, {"members": 0})
                documents += cursor.sort(order).limit(limit)
            if len(ids) > _IN_CHUNK:
                documents.sort(key=lambda d: (d["activity_at"], d["_id"]), reverse=True)
            found = [(memberships[d["_id"]], d) for d in documents[:limit]]
            holes = self._holes([_unread_range(m, d) for m, d in found])
            last = self._latest_entries([(d["_id"], int(d.get("latest", 0))) for _, d in found])
            return [_state(m, d, holes.get(d["_id"], 0), last.get(d["_id"])) for m, d in found]

        return self._call("read", run)

    def _latest_entries(self, keys: Sequence[tuple[str, int]]) -> dict[str, Entry]:
        """The history entry at each (conversation, latest), at "majority", in one find:
        a conversation's latest message as its history holds it (none once purged)."""
        branches = [{"id": id_, "seq": seq} for id_, seq in keys if seq > 0]
        if not branches:
            return {}
        query = branches[0] if len(branches) == 1 else {"$or": branches}
        found = self._visible[Kind.HISTORY].find(query, {**_PROJECTION, "id": 1})
        return {d["id"]: _entry(d) for d in found if d.get("mid") != HOLE_MID}

    def _holes(self, ranges: Sequence[tuple[str, int, int]]) -> dict[str, int]:
        """How many placeholders each history timeline holds in `low < seq <= high`, at
        "majority": a `$or` of one branch per range, each naming mid (so that the partial
        index of placeholders serves it: a query must imply an index's filter for the
        planner to use it), counted per timeline in one aggregation per _OR_BRANCHES ranges.
        Empty ranges (nothing unread) are not asked about."""
        branches = [
            {"id": id_, "seq": {"$gt": low, "$lte": high}, "mid": HOLE_MID}
            for id_, low, high in ranges
            if high > low
        ]
        counts: dict[str, int] = {}
        history = self._visible[Kind.HISTORY]
        for start in range(0, len(branches), _OR_BRANCHES):
            chunk = branches[start : start + _OR_BRANCHES]
            pipeline: list[dict[str, Any]] = [
                {"$match": chunk[0] if len(chunk) == 1 else {"$or": chunk}},
                {"$group": {"_id": "$id", "n": {"$sum": 1}}},
            ]
            for found in history.aggregate(pipeline):
                counts[found["_id"]] = counts.get(found["_id"], 0) + int(found["n"])
        return counts

    def mark_read(
        self, member: str, kind: Conversation, conversation: str, peer: str, seq: int
    ) -> ConversationState:
        """The conversation's latest read at "majority" (what the member can have been
        shown), `seq` clamped to it, then a `$max` on the membership (an upsert that leaves
        it unlisted when new, and never unlists one), whose result is read back from the
        update itself: its own write, acknowledged by a journaled majority, so nothing a
        failover can undo. The conversation and its placeholders are read again after it,
        at "majority", as the list shows them. Nothing is written when the clamped position
        is 0 (a conversation without messages): there is nothing to have read."""
        self._positions_writable()
        key = {"member": member, "conversation": conversation}
        projection = {"_id": 0, "conversation": 1, "peer": 1, "read": 1, "kind": 1}
        visible = self._visible_conversations

        def run() -> ConversationState:
            found = visible.find_one({"_id": conversation}, {"latest": 1})
            target = min(seq, int(found.get("latest", 0)) if found is not None else 0)
            membership: dict[str, Any] | None
            if target > 0:
                change = {
                    "$max": {"read": target},
                    "$setOnInsert": {"listed": False, "kind": kind.value, "peer": peer},
                }
                membership = _upserted(self._memberships, key, change, projection)
            else:
                membership = self._visible_memberships.find_one(key, projection)
            document = visible.find_one({"_id": conversation}, {"members": 0})
            if membership is None:
                membership = {"conversation": conversation, "peer": peer, "read": 0}
            membership.setdefault("kind", kind.value)
            membership.setdefault("peer", peer)
            if document is None:
                document = {"_id": conversation, "kind": membership["kind"], "latest": 0}
            holes = self._holes([_unread_range(membership, document)])
            latest = [(conversation, int(document.get("latest", 0)))]
            last = self._latest_entries(latest).get(conversation)
            return _state(membership, document, holes.get(conversation, 0), last)

        return self._call("mark_read", run)

    def device_seen(self, member: str, device: str, now_ms: int) -> None:
        self._positions_writable()
        change = {"$max": {"last_seen": _date(now_ms)}, "$setOnInsert": {"position": 0}}
        key = {"member": member, "device": device}
        self._call("device", lambda: _upsert(self._devices, key, change))

    def device_ack(self, member: str, device: str, seq: int, now_ms: int, idle_ms: int) -> int:
        """A `$max` of the device's position and sighting (an upsert), then the lowest
        position of the member's devices seen since the cutoff, read at "local": everything
        the primary holds, a device that a sync or an ack made a moment ago included, also
        one a majority has not acknowledged yet (a majority snapshot may not show it yet,
        and would answer higher than that device's 0). Seeing more devices, or a position
        that a failover could roll back (its device did read that far), only ever makes the
        answer lower or the same: the caller releases no entry a live device lacks."""
        self._positions_writable()
        key = {"member": member, "device": device}
        change = {"$max": {"position": seq, "last_seen": _date(now_ms)}}
        since = _date(max(0, now_ms - idle_ms))
        pipeline: list[dict[str, Any]] = [
            {"$match": {"member": member, "last_seen": {"$gte": since}}},
            {"$group": {"_id": None, "lowest": {"$min": "$position"}}},
        ]

        def run() -> int:
            own = _upserted(self._devices, key, change, {"_id": 0, "position": 1})
            lowest = int(own["position"]) if own is not None else seq
            for found in self._devices.aggregate(pipeline):
                if found.get("lowest") is not None:
                    lowest = min(lowest, int(found["lowest"]))
            return lowest

        return self._call("device", run)

    def devices(self, member: str) -> list[Device]:
        """At "majority": what a client is shown."""
        cursor = self._visible_devices.find(
            {"member": member}, {"_id": 0, "device": 1, "position": 1, "last_seen": 1}
        ).sort("device", pymongo.ASCENDING)
        return [
            Device(d["device"], int(d.get("position", 0)), _ms(d.get("last_seen")))
            for d in self._call("read", lambda: list(cursor))
        ]

    def ping(self) -> None:
        try:
            self._database.command("ping")
        except PyMongoError as exc:
            dependency_failed("store")
            raise Unavailable("store (mongo) is unavailable") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _bound_selection() -> None:
    """Make pymongo wait for a server at most serverSelectionTimeoutMS (mongo_timeout_ms)
    also when timeoutMS is set, as the client-side operations timeout specification asks
    (server selection takes "the minimum of serverSelectionTimeoutMS and the remaining
    timeoutMS"). pymongo (4.6 to 4.20 at least) waits for the whole remaining timeoutMS
    instead: after a step-down every operation, and its retry, waited 2 s for a primary.

    The one method pymongo asks for that timeout (Topology.get_server_selection_timeout)
    is wrapped, once per process; tests/test_mongo.py checks against an address where no
    server answers that a find then fails within the selection timeout. Should a pymongo
    release rename it, a warning says so and operations wait as before (slow 503s)."""
    global _SELECTION_BOUND
    if _SELECTION_BOUND:
        return
    try:
        from pymongo.synchronous.topology import Topology
    except ImportError:  # pymongo < 4.9
        from pymongo.topology import Topology  # type: ignore[no-redef,import-not-found]
    original = getattr(Topology, "get_server_selection_timeout", None)
    if original is None:
        log.warning(
            "pymongo %s: server selection cannot be bounded inside timeoutMS; after a "
            "failover requests wait mongo_operation_timeout_ms before their 503",
            pymongo.version,
        )
        return

    def bounded(topology: Any) -> float:
        return float(min(original(topology), topology._settings.server_selection_timeout))

    Topology.get_server_selection_timeout = bounded  # type: ignore[method-assign,assignment]
    _SELECTION_BOUND = True


_SELECTION_BOUND = False


def _pinned(collection: Collection[Any], concern: ReadConcern) -> Collection[Any]:
    """The collection read on the primary at this read concern and written with a
    journaled majority, whatever the URI (or a client made elsewhere) says."""
    return collection.with_options(
        read_preference=ReadPreference.PRIMARY, write_concern=WRITE_CONCERN, read_concern=concern
    )


def _overridden(uri: str) -> list[tuple[str, str]]:
    """The URI's options that connect() overrides with other values."""
    wanted = {
        "readpreference": "primary",
        "readconcernlevel": "majority",
        "w": "majority",
        "journal": "true",
    }
    query = urlsplit(uri).query
    return [
        (name, value)
        for name, value in parse_qsl(query)
        if name.lower() in wanted and value.lower() != wanted[name.lower()]
    ]


def _keys(copies: Copies) -> Iterator[tuple[str, int]]:
    """(id, seq) of each copy, in `copies.rows()` order."""
    count = len(copies.messages)
    for id_, first in zip(copies.ids, copies.firsts, strict=True):
        for j in range(count):
            yield id_, first + j


def _key_queries(keys: Sequence[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    """Queries that together match exactly these (id, seq) keys, each a `$or` of at most
    _OR_BRANCHES branches: one per set of sequences, naming every timeline that has
    exactly those (a fan-out's members often share them). A set of consecutive sequences
    (a batch's range: what a replay asks about) is a range, one index scan per timeline;
    so a replay of 10,000 timelines is 40 queries, whatever its batch's size."""
    by_id: dict[str, list[int]] = {}
    for id_, seq in keys:
        by_id.setdefault(id_, []).append(seq)
    by_seqs: dict[tuple[int, ...], list[str]] = {}
    for id_, seqs in by_id.items():
        by_seqs.setdefault(tuple(sorted(set(seqs))), []).append(id_)
    branches = [
        {"id": ids[0] if len(ids) == 1 else {"$in": ids}, "seq": _seq_query(seqs)}
        for seqs, ids in by_seqs.items()
    ]
    for start in range(0, len(branches), _OR_BRANCHES):
        chunk = branches[start : start + _OR_BRANCHES]
        yield chunk[0] if len(chunk) == 1 else {"$or": chunk}


def _seq_query(seqs: tuple[int, ...]) -> Any:
    """Exactly these distinct, ascending sequences."""
    if len(seqs) == 1:
        return seqs[0]
    if seqs[-1] - seqs[0] == len(seqs) - 1:
        return {"$gte": seqs[0], "$lte": seqs[-1]}  # consecutive
    return {"$in": list(seqs)}


def _commit_quorum(client: Any) -> str | None:
    """ "majority" on a replica set or a sharded cluster, where createIndexes would otherwise
    wait for every voting member ("votingMembers", the default: a member that is down holds
    the build, and so the writes it gates, for as long as it is down); None on a standalone
    server, which refuses the option. Looked up after the first operation (the client
    connects lazily); mongomock has no topology."""
    description = getattr(client, "topology_description", None)
    if description is None:
        return None
    name = description.topology_type_name
    return "majority" if name in ("ReplicaSetWithPrimary", "Sharded") else None


def _create_index(collection: Collection[Any], key: Any, **options: Any) -> None:
    quorum = _commit_quorum(collection.database.client)
    if quorum is not None:
        options["commitQuorum"] = quorum
    collection.create_index(key, **options)


def _ensure_unique(collection: Collection[Any]) -> None:
    """The unique (id, seq) index: ours by name, or one of another name with the same key
    (a migration's); createIndexes returns at once when it is built, and joins a build in
    progress."""
    name = INDEX_NAME
    for found, spec in collection.index_information().items():
        if list(spec.get("key", [])) != INDEX_KEY or _is_holes_index(spec):
            continue
        if not spec.get("unique") or spec.get("partialFilterExpression"):
            raise SchemaProblem(
                f"{collection.name} has the index {found!r} on (id, seq) that is not unique "
                f"over every document; the service relies on one that is: drop it "
                f"(mongosh: db.{collection.name}.dropIndex({found!r})), and the service "
                "builds its own"
            )
        if found != INDEX_NAME:
            log.warning("%s: using the unique index %r on (id, seq)", collection.name, found)
        name = found
        break
    try:
        _create_index(collection, INDEX_KEY, unique=True, name=name)
    except DuplicateKeyError as exc:
        raise SchemaProblem(_collisions(collection, exc)) from exc


def _collisions(collection: Collection[Any], error: DuplicateKeyError) -> str:
    """One line: which documents share an (id, seq), and how to resolve it. The server
    names one colliding key (keyValue); without it (mongomock), a group finds a few."""
    name = collection.name
    key = (error.details or {}).get("keyValue")
    keys: list[dict[str, Any]] = []
    if key and set(key) == {"id", "seq"}:
        keys = [dict(key)]
    else:
        pipeline: list[dict[str, Any]] = [
            {"$group": {"_id": {"id": "$id", "seq": "$seq"}, "n": {"$sum": 1}}},
            {"$match": {"n": {"$gt": 1}}},
            {"$limit": _COLLISIONS_SHOWN},
        ]
        keys = [dict(found["_id"]) for found in collection.aggregate(pipeline, allowDiskUse=True)]
    if not keys:
        return f"{name} holds two documents with the same (id, seq) ({error})"
    shown = []
    for key in keys:
        ids = [d["_id"] for d in collection.find(key, {"_id": 1})]
        shown.append(f"(id {key['id']!r}, seq {key['seq']}) in documents {_ids(ids)}")
    return (
        f"{name} holds documents that share an (id, seq), so its unique index cannot be "
        f"built: {'; '.join(shown)}; keep one document of each and delete the others "
        f"(mongosh: db.{name}.deleteOne({{_id: ...}}); all such keys: "
        f"db.{name}.aggregate([{{$group: {{_id: {{id: '$id', seq: '$seq'}}, n: {{$sum: 1}}}}}}, "
        "{$match: {n: {$gt: 1}}}])), then run timeline-admin migrate"
    )


def _ids(ids: list[Any]) -> str:
    return ", ".join(f"ObjectId('{i}')" if type(i).__name__ == "ObjectId" else repr(i) for i in ids)


def _is_holes_index(spec: dict[str, Any]) -> bool:
    """The placeholders' partial index (ours, by whatever name): not a unique one."""
    return not spec.get("unique") and spec.get("partialFilterExpression") == HOLES_FILTER


def _ensure_holes_index(collection: Collection[Any]) -> None:
    """The partial (id, seq) index of the history's placeholders (see HOLES_INDEX_NAME):
    ours, or one of another name that indexes the same."""
    for spec in collection.index_information().values():
        if list(spec.get("key", [])) == INDEX_KEY and _is_holes_index(spec):
            return
    _create_index(
        collection, INDEX_KEY, name=HOLES_INDEX_NAME, partialFilterExpression=HOLES_FILTER
    )


def _ensure_unique_key(collection: Collection[Any], key: list[tuple[str, int]], name: str) -> None:
    """A unique index on `key` over every document (ours, or one of another name); built
    at once on the new, empty collection."""
    for found, spec in collection.index_information().items():
        if list(spec.get("key", [])) != key:
            continue
        if spec.get("unique") and not spec.get("partialFilterExpression"):
            if found != name:
                log.warning("%s: using the unique index %r", collection.name, found)
            return
    fields = ", ".join(field for field, _ in key)
    try:
        _create_index(collection, key, unique=True, name=name)
    except DuplicateKeyError as exc:
        group = "{" + ", ".join(f"{field}: '${field}'" for field, _ in key) + "}"
        raise SchemaProblem(
            f"{collection.name} holds documents that share a ({fields}), so its unique index "
            f"cannot be built ({exc}); keep one document of each and delete the others (all "
            f"such keys: db.{collection.name}.aggregate([{{$group: {{_id: {group}, n: "
            "{$sum: 1}}}, {$match: {n: {$gt: 1}}}])), then run timeline-admin migrate"
        ) from exc


def _ensure_expiry(collection: Collection[Any]) -> None:
    """The TTL index that removes an idempotency record at its expires_at (ours, or one of
    another name that does the same). A mismatch is a warning, never a reason to refuse
    requests: claim() replaces an expired record it finds, removed or not; only the
    removal of those nobody claims again waits for the index."""
    key = [("expires_at", 1)]
    for name, spec in collection.index_information().items():
        if list(spec.get("key", [])) != key:
            continue
        ttl = spec.get("expireAfterSeconds")
        if ttl == 0:
            return
        if name != CLAIMS_TTL_INDEX_NAME:
            log.warning(
                "%s: the index %r on expires_at does not remove records at that date; "
                "expired idempotency records are replaced, not removed",
                collection.name,
                name,
            )
            return
        log.warning("%s: %s acts %s s after expires_at; now at it", collection.name, name, ttl)
        collection.database.command(
            "collMod",
            collection.name,
            index={"name": CLAIMS_TTL_INDEX_NAME, "expireAfterSeconds": 0},
        )
        return
    _create_index(collection, key, name=CLAIMS_TTL_INDEX_NAME, expireAfterSeconds=0)


def _ensure_purge_index(collection: Collection[Any], wanted: bool) -> str | None:
    """No TTL index on the entries (it would delete below the floors: see the module's
    docstring): earlier versions' backstop, or an operator's TTL index on created_at, is
    dropped. With a retention, a plain index on created_at for the purge to find expired
    entries by: ours, or one of another name already there. Its name; None without one."""
    found: str | None = None
    for name, spec in collection.index_information().items():
        if list(spec.get("key", [])) != [("created_at", 1)]:
            continue
        if "expireAfterSeconds" in spec:
            log.warning(
                "%s: dropping the TTL index %r: it removes entries without raising their "
                "timeline's floor, and a counter Redis lost would then hand their sequences "
                "out again; the purge removes expired entries instead",
                collection.name,
                name,
            )
            collection.drop_index(name)
        elif not wanted and name == PURGE_INDEX_NAME:
            log.info("%s: no retention; dropping %s", collection.name, name)
            collection.drop_index(name)
        else:
            found = name
    if not wanted:
        return None
    if found is None:
        _create_index(collection, "created_at", name=PURGE_INDEX_NAME)
        found = PURGE_INDEX_NAME
    return found
