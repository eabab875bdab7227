"""The MongoDB store as a real server would hold it: reads on the primary, journaled majority
writes, a deadline per operation, indexes built beside the requests and never in one.

What only a real server shows runs when TIMELINE_TEST_MONGO_URI is set and says so when it
skips; the README's MongoDB section lists what was verified where.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, ClassVar

import mongomock
import pymongo
import pytest
from pymongo.errors import AutoReconnect, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from support import free_port
from timeline.errors import Unavailable
from timeline.factory import create_app
from timeline.model import Copies, Kind, Message
from timeline.settings import Settings
from timeline.store import Claim, Preparer, WriteResult
from timeline.store import mongo as mongo_module
from timeline.store.mongo import (
    CLAIMS,
    CLAIMS_TTL_INDEX_NAME,
    INDEX_NAME,
    MongoStore,
    _date,
    _key_queries,
    _ms,
)

REAL_MONGO = os.environ.get("TIMELINE_TEST_MONGO_URI")
needs_real_mongo = pytest.mark.skipif(
    not REAL_MONGO, reason="needs a real MongoDB server: set TIMELINE_TEST_MONGO_URI"
)


def one(text: str) -> Message:
    return Message({"text": text}, f'{{"text":"{text}"}}')


def copies(ids: list[str], first: int, mid: str = "m", created_at_ms: int = 1_000) -> Copies:
    return Copies(ids, [first] * len(ids), [one(mid)], created_at_ms, mid)


#: An hour from now: records' times the TTL index (and mongomock's imitation of it) leaves
#: alone; tests expire records by the `now_ms` they give claim().
NOW = int(time.time() * 1000) + 3_600_000


def claim_of(fingerprint: str = "f" * 16, expires_ms: int = NOW + 1_000) -> Claim:
    return Claim("c" * 32, fingerprint, (7, 12, 3), NOW, expires_ms)


# --- where reads go and how writes are acknowledged ---------------------------------------


def test_the_uri_cannot_send_reads_to_a_secondary_or_weaken_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/?readPreference=secondaryPreferred&w=1"
    settings = Settings(mongo_uri=uri, mongo_operation_timeout_ms=1500)
    with caplog.at_level(logging.WARNING, logger="timeline.store.mongo"):
        store = MongoStore.connect(settings, {})  # lazy: no server is needed to look
    try:
        client: pymongo.MongoClient[Any] = store._client
        assert client.read_preference == ReadPreference.PRIMARY
        assert client.write_concern == WriteConcern(w="majority", j=True)
        assert client.options.timeout == 1.5  # timeoutMS: also sent as maxTimeMS
        assert "readPreference=secondaryPreferred" in caplog.text
        assert "w=1" in caplog.text
    finally:
        store.close()


class Recorder:
    """Records the read preference of every read and the write concern of every write that
    mongomock's collections serve."""

    READS = ("find", "find_one", "count_documents", "aggregate")
    WRITES = (
        "insert_one",
        "insert_many",
        "update_one",
        "replace_one",
        "delete_many",
        "find_one_and_update",
    )

    #: (collection, operation, read concern level) of every read, for the test to clear.
    levels: ClassVar[list[tuple[str, str, str | None]]] = []

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        Recorder.levels = []
        self.reads: list[tuple[str, str, Any]] = []
        self.writes: list[tuple[str, str, Any]] = []
        collection = mongomock.collection.Collection
        for name in self.READS + self.WRITES:
            log = self.reads if name in self.READS else self.writes
            monkeypatch.setattr(collection, name, self._wrap(getattr(collection, name), name, log))

    @staticmethod
    def _wrap(method: Any, name: str, log: list[tuple[str, str, Any]]) -> Any:
        def recorded(collection: Any, *args: Any, **kwargs: Any) -> Any:
            setting = collection.read_preference if name in Recorder.READS else None
            if setting is None:
                concern = collection.write_concern
                setting = getattr(concern, "document", concern)
            log.append((collection.name, name, setting))
            if name in Recorder.READS:
                Recorder.levels.append((collection.name, name, collection.read_concern.level))
            return method(collection, *args, **kwargs)

        return recorded


def test_every_read_and_write_of_the_store_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a database whose default is to read from secondaries and write with w:1 (as a
    # URI or a client made elsewhere would say),
    client = mongomock.MongoClient(tz_aware=True)
    database = client.get_database(
        "pins",
        read_preference=ReadPreference.SECONDARY_PREFERRED,
        write_concern=WriteConcern(w=1),
    )
    store = MongoStore(database, retention_ms={Kind.SYNC: 1000})
    store.prepare()
    recorder = Recorder(monkeypatch)
    # when every operation of the store runs,
    store.write(copies(["g"], 1), copies(["a", "b"], 1))
    store.write(copies(["g"], 1, mid="n"), copies(["a"], 1, mid="n"))  # taken: the rare path
    store.seal(Kind.SYNC, [("a", 2)], 1_000)
    store.unwrite(Kind.SYNC, [("b", 1)], "m")
    store.ack("a", 1, 1)
    store.gap(Kind.SYNC, "a", 1, 3, 500)
    store.gap(Kind.SYNC, "a", 3, 5, 500)
    store.owners(Kind.SYNC, [("a", 2), ("b", 1)])
    store.max_seqs(Kind.SYNC, ["a", "b"])
    store.read(Kind.SYNC, "a", 0, 10)
    store.read_backward(Kind.HISTORY, "g", 0, 10, 0)
    store.page(Kind.SYNC, "a", 0, 10, 0)
    store.claim_purge(10_000, 1000)
    store.purge(Kind.SYNC, 10_000)
    store.claim(claim_of(), NOW)  # stored
    store.claim(claim_of("e" * 16), NOW)  # taken: the earlier record, read
    store.claim(claim_of("d" * 16), NOW + 1_000)  # expired: replaced
    store.reclaim(claim_of("d" * 16), (8, 8))
    # then each read went to the primary and each write waited for a journaled majority.
    touched = {name for name, _, _ in recorder.reads + recorder.writes}
    assert touched >= {"chat_sync", "chat_history", "chat_sync_floor", "timeline_claims", CLAIMS}
    idempotency = {op for name, op, _ in recorder.reads + recorder.writes if name == CLAIMS}
    assert idempotency >= {"insert_one", "find_one", "replace_one", "find_one_and_update"}
    assert {op for _, op, _ in recorder.reads} == set(Recorder.READS)
    assert all(setting == ReadPreference.PRIMARY for _, _, setting in recorder.reads)
    assert {op for _, op, _ in recorder.writes} == set(Recorder.WRITES)
    assert all(setting == {"w": "majority", "j": True} for _, _, setting in recorder.writes)


def test_a_uri_asking_for_local_reads_is_overridden(caplog: pytest.LogCaptureFixture) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/?readConcernLevel=local"
    with caplog.at_level(logging.WARNING, logger="timeline.store.mongo"):
        store = MongoStore.connect(Settings(mongo_uri=uri), {})  # lazy: no server is needed
    try:
        assert store._client.read_concern == ReadConcern("majority")
        assert "readConcernLevel=local" in caplog.text
        for kind in Kind:  # each collection pinned, whatever the client's default
            assert store._visible[kind].read_concern == ReadConcern("majority")
            assert store._collections[kind].read_concern == ReadConcern("local")
    finally:
        store.close()


def test_every_read_a_client_is_shown_is_at_majority(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the app on a database whose default read concern is "local" (as a URI with
    # readConcernLevel=local would make it),
    client = mongomock.MongoClient(tz_aware=True)
    database = client.get_database("probe", read_concern=ReadConcern("local"))
    store = MongoStore(database, retention_ms={Kind.SYNC: 60_000})
    store.prepare()
    api = create_app(settings, store=store).test_client()
    recorder = Recorder(monkeypatch)
    for i in range(3):
        assert (
            api.post(
                "/timeline/send", json={"from": "a", "to": "b", "message": f'{{"i":{i}}}'}
            ).status_code
            == 200
        )
    members = {"group_members": ["a", "b", "c"], "group_name": "g", "message": '{"g":1}'}
    assert api.post("/timeline/sendGroup", json=members).status_code == 200
    # when a client reads every way there is (sync pages, history both ways),
    Recorder.levels = []
    for path in (
        "/timeline/sync?member=b&count=2",
        "/timeline/sync?member=b&last_read=2&count=2",
        "/timeline/sync?member=c",
        "/timeline/history/single/a/b?count=2",
        "/timeline/history/single/b/a?direction=backward&before=3&count=2",
        "/timeline/history/group/g",
    ):
        reply = api.get(path)
        assert reply.status_code == 200, (path, reply.get_data(as_text=True))
        assert reply.get_json()["entrySet"], path
    # then each of its reads was at majority, the floors' too,
    shown = Recorder.levels
    assert {name for name, _, _ in shown} >= {"chat_sync", "chat_history", "chat_sync_floor"}
    assert {level for _, _, level in shown} == {"majority"}, shown
    # while what a write reads about itself is read where collisions are decided.
    Recorder.levels = []
    store.owners(Kind.SYNC, [("b", 1)])
    store.max_seqs(Kind.SYNC, ["b"])
    assert {level for _, _, level in Recorder.levels} == {"local"}
    del recorder


class Uncommitted:
    """A collection as a majority reader sees it while what the primary holds is not yet
    acknowledged by a majority (or is about to roll back): none of it."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def find(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def find_one(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_a_key_found_taken_counts_only_once_a_majority_has_it(mongo_store: MongoStore) -> None:
    # Given copies stored (by another attempt) that a majority does not have yet,
    store = mongo_store
    assert store.write(copies(["g"], 1), copies(["a", "b"], 1)) == WriteResult()
    committed = dict(store._visible)
    store._visible = {kind: Uncommitted(c) for kind, c in committed.items()}  # type: ignore[misc]
    # a write that collides with them fails (the write concern error a duplicate key hides
    # in pymongo would say the same) instead of counting them stored or taken,
    with pytest.raises(Unavailable):
        store.write(copies(["g"], 1, mid="n"), None)
    with pytest.raises(Unavailable):
        store.write(copies(["g", "h"], 1, mid="n"), None)  # an ordered insert_many
    with pytest.raises(Unavailable):
        store.write(None, copies(["a"], 1, mid="n"))
    # and once a majority has them, the same writes find them taken.
    store._visible = committed
    assert store.write(copies(["g"], 1, mid="n"), None) == WriteResult(history_taken=True)
    assert store.write(None, copies(["a"], 1, mid="n")) == WriteResult(sync_taken=[0])


def test_an_idempotency_record_is_adopted_only_once_a_majority_has_it(
    mongo_store: MongoStore,
) -> None:
    store = mongo_store
    first = claim_of()
    assert store.claim(first, NOW) == first
    store._visible_idempotency = Uncommitted(None)  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        store.claim(claim_of("e" * 16), NOW)  # the record it collided with may roll back
    with pytest.raises(Unavailable):
        store.reclaim(claim_of("e" * 16), (9, 9, 9))  # no swap: the winner, unconfirmed
    store._visible_idempotency = store._idempotency.with_options()
    assert store.claim(claim_of("e" * 16), NOW) == first


# --- indexes: built beside the requests, never in one -------------------------------------


def test_prepare_builds_the_unique_index_once_and_again_harmlessly(database: Any) -> None:
    MongoStore(database).prepare()
    MongoStore(database).prepare()  # a second worker, or timeline-admin migrate
    for name in ("chat_sync", "chat_history"):
        index = database[name].index_information()[INDEX_NAME]
        assert index["key"] == [("id", 1), ("seq", 1)]
        assert index["unique"] is True


def test_prepare_builds_the_ttl_index_that_forgets_idempotency_records(database: Any) -> None:
    MongoStore(database).prepare()
    MongoStore(database).prepare()  # again: harmless
    index = database[CLAIMS].index_information()[CLAIMS_TTL_INDEX_NAME]
    assert index["key"] == [("expires_at", 1)]
    assert index["expireAfterSeconds"] == 0  # removed at expires_at, not later
    assert not index.get("unique")
    # The field the index looks at holds a date (a number never expires), the record's:
    store = MongoStore(database)
    store.prepare()
    store.claim(claim_of(expires_ms=NOW + 1_234), NOW)
    record = database[CLAIMS].find_one({"_id": "c" * 32})
    assert _ms(record["expires_at"]) == NOW + 1_234
    assert _ms(record["allocated_at"]) == NOW


def test_dates_round_trip_to_the_millisecond() -> None:
    # int(timestamp() * 1000) is a millisecond short for these (floating point).
    for ms in (537_815_791_823, 2_193_427_399_726, 1_088_978_727_399, 0, NOW):
        assert _ms(_date(ms)) == ms


def test_writes_wait_for_the_index_and_reads_do_not(database: Any) -> None:
    store = MongoStore(database)
    assert store.readiness() == "building"
    with pytest.raises(Unavailable, match="indexes building") as refused:
        store.write(copies(["g"], 1), copies(["a"], 1))
    assert refused.value.metadata == {"indexes": "building"}
    with pytest.raises(Unavailable):
        store.seal(Kind.SYNC, [("a", 1)], 1)
    assert store.read(Kind.SYNC, "a", 0, 10) == []
    assert database["chat_sync"].count_documents({}) == 0
    store.prepare()
    assert store.write(copies(["g"], 1), copies(["a"], 1)) == WriteResult()


def test_a_unique_index_of_another_name_is_used(
    database: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("chat_sync", "chat_history"):
        database[name].create_index([("id", 1), ("seq", 1)], unique=True, name="migrated")
    store = MongoStore(database)
    with caplog.at_level(logging.WARNING):
        store.prepare()
    assert store.readiness() == "ready"
    assert "'migrated'" in caplog.text
    for name in ("chat_sync", "chat_history"):
        assert INDEX_NAME not in database[name].index_information()
    store.write(copies(["g"], 1), copies(["a"], 1))
    assert store.write(None, copies(["a"], 1, mid="x")) == WriteResult(sync_taken=[0])


def test_a_non_unique_index_on_id_and_seq_is_reported_not_written_past(database: Any) -> None:
    database["chat_sync"].create_index([("id", 1), ("seq", 1)], name="plain")
    store = MongoStore(database)
    with pytest.raises(Unavailable, match="'plain' on \\(id, seq\\) that is not unique"):
        store.prepare()
    assert store.readiness() == "blocked"
    assert "db.chat_sync.dropIndex('plain')" in store.problem()
    with pytest.raises(Unavailable, match="blocked"):
        store.write(None, copies(["a"], 1))


@pytest.fixture
def colliding(database: Any) -> tuple[Any, list[Any]]:
    """go-timeline creates no index: its data may hold a sequence twice."""
    documents = [
        {"id": "a", "seq": 1, "v": 1},
        {"id": "a", "seq": 1, "v": 2},
        {"id": "b", "seq": 1},
    ]
    ids = database["chat_sync"].insert_many(documents).inserted_ids
    return database, ids[:2]


def test_colliding_documents_block_the_build_named_in_one_line_tried_once(
    colliding: tuple[Any, list[Any]], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, ids = colliding
    builds: list[str] = []
    build = mongo_module._ensure_unique

    def counted(collection: Any) -> None:
        builds.append(collection.name)
        build(collection)

    monkeypatch.setattr(mongo_module, "_ensure_unique", counted)
    # Given a Preparer that would try again every 10 ms,
    store = MongoStore(database)
    Preparer(store, retry_s=0.01, retry_max_s=0.01).start()
    deadline = time.monotonic() + 5
    while store.readiness() != "blocked" and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    # then the build was tried once: colliding documents need an operator, not a rescan;
    assert builds == ["chat_sync"]
    # the problem is one line naming both documents and how to resolve it,
    problem = store.problem()
    assert "\n" not in problem
    assert "chat_sync" in problem
    assert "(id 'a', seq 1)" in problem
    assert all(f"ObjectId('{i}')" in problem for i in ids)
    assert "deleteOne" in problem
    assert "timeline-admin migrate" in problem
    # and /readyz says it, while reads are served and an app made anew does not build again.
    client = create_app(settings, store=store).test_client()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.get_json()["message"] == f"not ready: store indexes blocked: {problem}"
    assert reply.get_json()["metadata"]["problem"] == problem
    assert client.get("/readyz?for=reads").status_code == 200
    assert client.get("/readyz?for=both").status_code == 400
    assert client.get("/timeline/sync?member=a").status_code == 200
    assert (
        client.post("/timeline/send", json={"from": "a", "to": "b", "message": "{}"}).status_code
        == 503
    )
    time.sleep(0.1)
    assert builds == ["chat_sync"]


def test_migrate_names_colliding_documents_in_one_line(
    colliding: tuple[Any, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from timeline import admin

    database, ids = colliding
    monkeypatch.setattr(admin, "open_store", lambda settings: MongoStore(database))
    assert admin.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("timeline-admin: store (mongo) indexes blocked:")
    assert all(f"ObjectId('{i}')" in err for i in ids)
    assert "(id 'a', seq 1)" in err


def test_no_request_waits_on_an_index_build_and_readyz_says_so(
    database: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an index build that takes as long as the test says (a big existing collection),
    release = threading.Event()
    building = threading.Event()
    build = mongo_module._ensure_unique

    def slow_build(collection: Any) -> None:
        building.set()
        release.wait(30)
        build(collection)

    monkeypatch.setattr(mongo_module, "_ensure_unique", slow_build)
    store = MongoStore(database)
    client = create_app(settings, store=store).test_client()  # starts the build beside
    assert building.wait(5)
    try:
        # while it builds: not ready, writes refused at once, reads served,
        reply = client.get("/readyz")
        assert reply.status_code == 503
        assert reply.get_json()["metadata"] == {"redis": "ok", "store": "ok", "indexes": "building"}
        started = time.monotonic()
        reply = client.post("/timeline/send", json={"from": "a", "to": "b", "message": "{}"})
        assert reply.status_code == 503
        assert reply.get_json()["metadata"]["indexes"] == "building"
        # The bound is the behaviour: the build holds for up to 30 s; a request must not.
        assert time.monotonic() - started < 5.0
        reply = client.get("/timeline/sync?member=b")
        assert reply.status_code == 200
        assert reply.get_json()["entrySet"] == []
    finally:
        release.set()
    # and once it is built, everything is.
    deadline = time.monotonic() + 10
    while store.readiness() != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/readyz").status_code == 200
    reply = client.post("/timeline/send", json={"from": "a", "to": "b", "message": "{}"})
    assert reply.get_json() == {"sequence": "1"}


# --- queries of many keys -----------------------------------------------------------------


def test_key_queries_match_exactly_the_keys_in_bounded_or_queries() -> None:
    # 600 timelines with sequences of their own, and 400 sharing theirs (a fan-out).
    keys = [(f"u{i}", i + 1) for i in range(600)] + [(f"v{i}", 7) for i in range(400)]
    keys += [("w", 1), ("w", 2), ("w", 5)]
    queries = list(_key_queries(keys))
    assert len(queries) == 3  # 600 + 1 (the 400 share one) + 1 branches, 256 at most per query
    branches = [b for q in queries for b in q.get("$or", [q])]
    assert all(len(q.get("$or", [q])) <= 256 for q in queries)
    matched = set()
    for branch in branches:
        ids = branch["id"]["$in"] if isinstance(branch["id"], dict) else [branch["id"]]
        seqs = branch["seq"]["$in"] if isinstance(branch["seq"], dict) else [branch["seq"]]
        matched |= {(id_, seq) for id_ in ids for seq in seqs}
    assert matched == set(keys)


# --- floors that rise while a write is in flight ------------------------------------------


class AckDuringInsert:
    """The sync collection, with an ack of the member run just before its insert lands: the
    floor rises between whatever the writer checked before and the insert itself."""

    def __init__(self, store: MongoStore, member: str, seq: int) -> None:
        self.inner = store._collections[Kind.SYNC]
        self.store, self.member, self.seq = store, member, seq

    def insert_many(self, documents: Any, **kwargs: Any) -> Any:
        self.store.ack(self.member, self.seq, self.seq)
        return self.inner.insert_many(documents, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_copy_the_floor_passed_mid_write_is_reported_taken(mongo_store: MongoStore) -> None:
    mongo_store.write(None, copies(["a"], 1, mid="m1"))
    mongo_store._collections[Kind.SYNC] = AckDuringInsert(mongo_store, "a", 2)  # type: ignore[assignment]
    # seq 2 of "b" and "a": the ack of a's 2 (its client acking latestSeq) lands first.
    result = mongo_store.write(copies(["g"], 1), copies(["b", "a"], 2, mid="m2"))
    assert result == WriteResult(sync_taken=[1])  # a's copy: below its floor, so moved
    assert mongo_store.owners(Kind.SYNC, [("a", 2), ("b", 2)]) == {("b", 2): "m2"}


# --- idempotency records: races and failures ----------------------------------------------


class Intercepted:
    """The idempotency collection, with something done just before one of its operations."""

    def __init__(self, store: MongoStore, **before: Any) -> None:
        self.inner = store._idempotency
        self.before = before

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.before:
            return method

        def intercepted(*args: Any, **kwargs: Any) -> Any:
            self.before[name]()
            return method(*args, **kwargs)

        return intercepted


def test_a_claim_that_loses_the_replacement_of_an_expired_record_returns_the_winner(
    mongo_store: MongoStore,
) -> None:
    mongo_store.claim(claim_of(expires_ms=NOW), NOW - 1)
    winner = claim_of("a" * 16, expires_ms=NOW + 5_000)
    records = mongo_store._idempotency

    def another_claim_first() -> None:  # replaces the expired record just before us
        mongo_store._idempotency = records
        assert mongo_store.claim(winner, NOW) == winner
        mongo_store._idempotency = intercepted  # type: ignore[assignment]

    intercepted = Intercepted(mongo_store, replace_one=another_claim_first)
    mongo_store._idempotency = intercepted  # type: ignore[assignment]
    assert mongo_store.claim(claim_of("b" * 16, expires_ms=NOW + 9_000), NOW) == winner
    mongo_store._idempotency = records
    assert records.find_one({"_id": "c" * 32})["fingerprint"] == "a" * 16


def test_a_record_removed_between_insert_and_read_is_claimed_again(
    mongo_store: MongoStore,
) -> None:
    mongo_store.claim(claim_of(expires_ms=NOW), NOW - 1)
    records = mongo_store._idempotency
    # The TTL index removes the expired record after our insert found it, before we read it.
    removed = Intercepted(mongo_store, find_one=lambda: records.delete_one({"_id": "c" * 32}))
    mongo_store._idempotency = removed  # type: ignore[assignment]
    mine = claim_of("b" * 16, expires_ms=NOW + 9_000)
    assert mongo_store.claim(mine, NOW) == mine
    mongo_store._idempotency = records
    assert records.find_one({"_id": "c" * 32})["fingerprint"] == "b" * 16


def test_every_operation_waits_for_a_server_no_longer_than_the_selection_timeout() -> None:
    # pymongo waits for a server for the whole timeoutMS (here 5 s), also for the retry of a
    # write after a step-down; the store bounds that wait by mongo_timeout_ms (300 ms). No
    # server answers at this address: every operation has to select one, and fails.
    settings = Settings(
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=300,
        mongo_operation_timeout_ms=5000,
    )
    store = MongoStore.connect(settings, {})
    store._state = "ready"  # as if prepare() had succeeded before the server went away
    try:
        for action in (
            lambda: store.write(copies(["g"], 1), copies(["a", "b"], 1)),
            lambda: store.write(None, copies(["a", "b"], 1)),
            lambda: store.read(Kind.SYNC, "a", 0, 10),
            lambda: store.page(Kind.SYNC, "a", 0, 10, 0),
            lambda: store.owners(Kind.SYNC, [("a", 1)]),
            lambda: store.ack("a", 1, 1),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                action()
            # The bound is the behaviour: one selection timeout, not the operation's 5 s.
            assert time.monotonic() - started < 1.5
    finally:
        store.close()


def test_claims_on_an_unreachable_server_are_a_fast_unavailable() -> None:
    settings = Settings(
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=300,
    )
    store = MongoStore.connect(settings, {})
    store._state = "ready"  # as if prepare() had succeeded before the server went away
    try:
        for action in (
            lambda: store.claim(claim_of(), NOW),
            lambda: store.reclaim(claim_of(), (8, 8)),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable) as raised:
                action()
            assert isinstance(raised.value.__cause__, PyMongoError)
            # The bound is the behaviour: within mongo_timeout_ms (300 ms), well before the
            # 2 s operation timeout a driver call outside the store's _call would take.
            assert time.monotonic() - started < 1.5
    finally:
        store.close()


@pytest.mark.parametrize(
    "failing", ["insert_one", "find_one", "replace_one", "find_one_and_update"]
)
def test_a_claim_failing_at_any_step_is_unavailable(mongo_store: MongoStore, failing: str) -> None:
    mongo_store.claim(claim_of(expires_ms=NOW), NOW - 1)  # expired at NOW: every step runs

    def fail() -> None:
        raise AutoReconnect(f"injected: connection reset at {failing}")

    mongo_store._idempotency = Intercepted(mongo_store, **{failing: fail})  # type: ignore[assignment]
    if failing == "find_one_and_update":
        action = lambda: mongo_store.reclaim(claim_of(), (8, 8))  # noqa: E731
    else:
        action = lambda: mongo_store.claim(claim_of("b" * 16), NOW)  # noqa: E731
    with pytest.raises(Unavailable) as raised:
        action()
    assert isinstance(raised.value.__cause__, AutoReconnect)


def test_claims_wait_for_the_indexes_as_writes_do(database: Any) -> None:
    store = MongoStore(database)
    with pytest.raises(Unavailable, match="indexes building"):
        store.claim(claim_of(), NOW)
    with pytest.raises(Unavailable, match="indexes building"):
        store.reclaim(claim_of(), (8, 8))
    assert database[CLAIMS].count_documents({}) == 0
    store.prepare()
    assert store.claim(claim_of(), NOW) == claim_of()


# --- only a real server shows these -------------------------------------------------------


@needs_real_mongo
def test_a_slow_operation_is_stopped_by_the_server_too() -> None:
    # timeoutMS bounds the whole operation and is sent as maxTimeMS: the server gives up
    # as well, instead of running a query nobody waits for (pymongo's CSOT documentation).
    assert REAL_MONGO is not None
    settings = Settings(mongo_uri=REAL_MONGO, mongo_operation_timeout_ms=300)
    store = MongoStore.connect(settings, {})
    try:
        collection = store._collections[Kind.SYNC]
        collection.insert_one({"id": "slow", "seq": 1})
        started = time.monotonic()
        with pytest.raises(PyMongoError) as stopped:
            list(collection.find({"$where": "sleep(2000) || true"}))
        assert stopped.value.timeout
        assert time.monotonic() - started < 1.5  # 300 ms, with room for a loaded machine
    finally:
        store._database.drop_collection("chat_sync")
        store.close()


@needs_real_mongo
def test_majority_writes_are_accepted_by_the_server() -> None:
    assert REAL_MONGO is not None
    name = f"timeline_test_{uuid.uuid4().hex[:12]}"
    settings = Settings(mongo_uri=REAL_MONGO, mongo_database=name)
    store = MongoStore.connect(settings, {})
    try:
        store.prepare()
        assert store.write(copies(["g"], 1), copies(["a"], 1)) == WriteResult()
        assert [e.seq for e in store.read(Kind.SYNC, "a", 0, 10)] == [1]
    finally:
        store._client.drop_database(name)
        store.close()


# --- timeline-admin migrate ---------------------------------------------------------------


def test_migrate_reports_a_store_it_cannot_prepare(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from timeline.admin import main

    monkeypatch.setenv("TIMELINE_MONGO_URI", f"mongodb://127.0.0.1:{free_port()}/")
    monkeypatch.setenv("TIMELINE_MONGO_TIMEOUT_MS", "200")
    assert main(["migrate"]) == 1
    assert "timeline-admin: store (mongo) indexes cannot be made ready" in capsys.readouterr().err


def test_migrate_on_the_embedded_store_has_nothing_to_wait_for(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from timeline.admin import main

    monkeypatch.delenv("TIMELINE_MONGO_URI", raising=False)
    monkeypatch.setenv("TIMELINE_SQLITE_PATH", str(tmp_path / "t.sqlite3"))
    assert main(["migrate"]) == 0
    assert "ready" in capsys.readouterr().out
