"""Health, readiness, metrics, request ids and access logs, and the OpenAPI document."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support import RedisServer, free_port, sample
from timeline.api import PREFIX, ROUTES
from timeline.errors import PartialWrite, Unavailable
from timeline.factory import close_app, create_app
from timeline.logs import JsonFormatter
from timeline.model import Copies
from timeline.openapi import openapi_document
from timeline.settings import Settings
from timeline.store import Preparer, Purger, Store, WriteResult
from timeline.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent


def test_healthz_answers_even_with_every_dependency_down(request: pytest.FixtureRequest) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=200,
    )
    app = create_app(settings)
    # Closed at the end: its store would otherwise be retried in the background for the
    # rest of the session, counting store errors while other tests measure them.
    request.addfinalizer(lambda: close_app(app))
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    reply = client.get("/readyz")
    assert reply.status_code == 503
    body = reply.get_json()
    assert body["reason"] == "TIMELINE_UNAVAILABLE"
    assert body["metadata"]["redis"] == "down"
    assert body["metadata"]["store"] == "down"
    assert body["metadata"]["indexes"] in ("building", "failed")  # never built
    assert "redis" in body["message"]
    assert "store" in body["message"]


def test_readyz_is_200_when_redis_and_the_store_answer(client: Any) -> None:
    reply = client.get("/readyz")
    assert reply.status_code == 200
    checks = {"redis": "ok", "store": "ok", "indexes": "ready"}
    assert reply.get_json() == {"status": "ready", "checks": checks}


def test_readyz_names_redis_once_it_is_killed(
    tmp_path: Path, redis_factory: Any, sqlite_store: SQLiteStore
) -> None:
    server = redis_factory()
    client = create_app(Settings(redis_url=server.url), store=sqlite_store).test_client()
    assert client.get("/readyz").status_code == 200
    server.stop()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.get_json()["metadata"] == {"redis": "down", "store": "ok", "indexes": "ready"}
    assert client.get("/healthz").status_code == 200
    server.start()
    assert client.get("/readyz").status_code == 200


# --- metrics ---------------------------------------------------------------------------------


def scrape(client: Any) -> str:
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.content_type.startswith("text/plain")
    text: str = reply.get_data(as_text=True)
    return text


class Scrapes:
    """/metrics before and after a scenario: the metrics are process-global (every app of
    the test session counts into them), so a test reads what its scenario added."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.before = self.after = scrape(client)

    def again(self) -> None:
        self.after = scrape(self.client)

    def grew(self, name: str, **labels: str) -> float:
        return sample(self.after, name, **labels) - sample(self.before, name, **labels)


@pytest.fixture
def quiet_background() -> None:
    """Stop what apps of earlier tests still run in the background: a Preparer retries a
    store that is down for ever (test_faults leaves one behind), counting a store error
    each time, into the counter a test is about to measure."""
    for leftover in gc.get_objects():
        # type(), not isinstance(): the heap holds weak proxies, whose dead ones raise.
        if type(leftover) in (Preparer, Purger):
            leftover.stop()
    for thread in threading.enumerate():
        if thread.name in ("timeline-prepare", "timeline-purge"):
            thread.join(30)  # stopped: it ends with the attempt it is in, if any
            assert not thread.is_alive()


def group_body(group: str, members: list[str]) -> str:
    return json.dumps({"group_name": group, "group_members": members, "message": "{}"})


@pytest.mark.usefixtures("quiet_background")
def test_metrics_count_requests_messages_fan_out_and_failures(client: Any) -> None:
    metrics = Scrapes(client)
    members = ["a", "b", "c"]
    reply = client.post("/timeline/sendGroup", data=group_body("g", members))
    assert reply.get_json() == {"failedMembers": []}
    assert client.get("/timeline/sync?member=a").status_code == 200
    assert client.get("/timeline/sync?member=a").status_code == 200
    assert client.get("/timeline/sync?member=a:b").status_code == 400
    metrics.again()

    assert metrics.grew("timeline_messages_written_total", kind="history") == 1
    assert metrics.grew("timeline_messages_written_total", kind="sync") == 3
    assert metrics.grew("timeline_fan_out_recipients_count") == 1
    assert metrics.grew("timeline_fan_out_recipients_sum") == 3
    assert metrics.grew("timeline_fan_out_recipients_bucket", le="2.0") == 0
    assert metrics.grew("timeline_fan_out_recipients_bucket", le="5.0") == 1
    sync = {"route": "/timeline/sync", "method": "GET"}
    assert metrics.grew("timeline_http_request_duration_seconds_count", **sync, status="200") == 2
    assert metrics.grew("timeline_http_request_duration_seconds_count", **sync, status="400") == 1
    send = {"route": "/timeline/sendGroup", "method": "POST", "status": "200"}
    assert metrics.grew("timeline_http_request_duration_seconds_count", **send) == 1
    assert metrics.grew("timeline_http_request_duration_seconds_bucket", **send, le="+Inf") == 1
    assert metrics.grew("timeline_http_request_duration_seconds_sum", **send) > 0
    # A new group: its history timeline and each member's sync timeline are seeded, once.
    assert metrics.grew("timeline_sequence_repairs_total", repair="seeded") == 4
    assert metrics.grew("timeline_sequence_repairs_total", repair="moved") == 0
    # Everything stored, every dependency answered.
    assert metrics.grew("timeline_failed_members_total") == 0
    assert metrics.grew("timeline_dependency_errors_total", dependency="redis") == 0
    assert metrics.grew("timeline_dependency_errors_total", dependency="store") == 0

    metrics = Scrapes(client)
    reply = client.post("/timeline/ack", data=json.dumps({"member": "a", "seq": "1"}))
    assert reply.status_code == 200
    metrics.again()
    assert metrics.grew("timeline_acks_total") == 1


def test_sequence_repairs_count_seeded_and_moved_timelines(
    client: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    members = ["a", "b", "c"]
    assert client.post("/timeline/sendGroup", data=group_body("g", members)).status_code == 200

    # Counters in Redis: nothing to repair.
    metrics = Scrapes(client)
    assert client.post("/timeline/sendGroup", data=group_body("g", members)).status_code == 200
    metrics.again()
    assert metrics.grew("timeline_sequence_repairs_total", repair="seeded") == 0
    assert metrics.grew("timeline_sequence_repairs_total", repair="moved") == 0

    # Redis lost one counter: that timeline alone is seeded from the store.
    redis_client.delete(f"{key_prefix}seq:sync:a")
    metrics = Scrapes(client)
    assert client.post("/timeline/sendGroup", data=group_body("g", members)).status_code == 200
    metrics.again()
    assert metrics.grew("timeline_sequence_repairs_total", repair="seeded") == 1
    assert metrics.grew("timeline_sequence_repairs_total", repair="moved") == 0

    # One counter lags the store (a stale replica promoted): b's copy finds its sequence
    # taken by another message and moves above the store's highest.
    redis_client.set(f"{key_prefix}seq:sync:b", 1)
    metrics = Scrapes(client)
    assert client.post("/timeline/sendGroup", data=group_body("g", members)).status_code == 200
    metrics.again()
    assert metrics.grew("timeline_sequence_repairs_total", repair="seeded") == 0
    assert metrics.grew("timeline_sequence_repairs_total", repair="moved") == 1
    assert metrics.grew("timeline_messages_written_total", kind="sync") == 3
    assert metrics.grew("timeline_failed_members_total") == 0
    latest = client.get("/timeline/sync?member=b").get_json()["latestSeq"]
    assert latest == "4"


class SyncCopiesRefused:
    """A real store that takes history copies and refuses every sync copy, failing halfway
    as MongoDB can (PartialWrite: the history copy is stored)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.backend = inner.backend

    def write(self, history: Copies | None, sync: Copies | None, *claim: Any) -> WriteResult:
        if sync is None:
            return self.inner.write(history, None, *claim)
        if history is not None:
            if self.inner.write(history, None, *claim).history_taken:
                return WriteResult(history_taken=True)
            raise PartialWrite("injected: stored the history copy, not the sync copies")
        raise Unavailable("injected: sync copies not stored")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_sync_copies_not_stored_are_counted_as_failed_members(
    settings: Settings, sqlite_store: SQLiteStore
) -> None:
    settings = settings.replace(store_retry_backoff_ms=1, store_write_attempts=3)
    client = create_app(settings, store=SyncCopiesRefused(sqlite_store)).test_client()  # type: ignore[arg-type]
    metrics = Scrapes(client)
    members = ["a", "b", "c", "d"]
    reply = client.post("/timeline/sendGroup", data=group_body("g", members))
    assert reply.get_json() == {"failedMembers": members}
    metrics.again()
    assert metrics.grew("timeline_failed_members_total") == 4
    assert metrics.grew("timeline_messages_written_total", kind="sync") == 0
    assert metrics.grew("timeline_fan_out_recipients_count") == 1
    assert metrics.grew("timeline_fan_out_recipients_sum") == 4


@pytest.mark.usefixtures("quiet_background")
def test_store_errors_are_counted_once_per_failed_call(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "locked.sqlite3"
    store = SQLiteStore(path, busy_timeout_ms=20)
    settings = settings.replace(
        store_write_attempts=3, store_retry_backoff_ms=1, store_retry_budget_ms=60_000
    )
    client = create_app(settings, store=store).test_client()
    metrics = Scrapes(client)
    # Another process holds SQLite's write lock: every write attempt times out; reads still
    # answer (WAL), so the counters are seeded and only the 3 writes fail.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        reply = client.post("/timeline/sendGroup", data=group_body("g", ["a", "b"]))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert reply.status_code == 503
    metrics.again()
    assert metrics.grew("timeline_dependency_errors_total", dependency="store") == 3
    assert metrics.grew("timeline_dependency_errors_total", dependency="redis") == 0
    assert metrics.grew("timeline_messages_written_total", kind="history") == 0
    assert metrics.grew("timeline_messages_written_total", kind="sync") == 0
    assert metrics.grew("timeline_failed_members_total") == 0  # a 503, not a report
    route = {"route": "/timeline/sendGroup", "method": "POST", "status": "503"}
    assert metrics.grew("timeline_http_request_duration_seconds_count", **route) == 1
    store.close()


@pytest.mark.usefixtures("quiet_background")
def test_redis_errors_are_counted(sqlite_store: SQLiteStore) -> None:
    client = create_app(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), store=sqlite_store
    ).test_client()
    metrics = Scrapes(client)
    assert client.get("/timeline/sync?member=a").status_code == 503
    assert client.get("/timeline/sync?member=b").status_code == 503
    metrics.again()
    assert metrics.grew("timeline_dependency_errors_total", dependency="redis") == 2
    assert metrics.grew("timeline_dependency_errors_total", dependency="store") == 0


# prometheus_client's multiprocess mode, as gunicorn runs it: each process writes its own
# files; a process of its own (the variable is read at import) records what it is told.
_WRITER = """
import sys
from timeline import metrics
metrics.SYNC_WRITTEN.inc(int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    metrics.observe_request("/timeline/sync", "GET", 200, 0.003)
"""


def record_in_a_worker(directory: Path, synced: int, requests: int) -> None:
    directory.mkdir(exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    command = [sys.executable, "-c", _WRITER, str(synced), str(requests)]
    subprocess.run(command, env=env, cwd=ROOT, check=True, timeout=60)


def library_reads(path: Path) -> bool:
    """Whether prometheus_client's own merge reads this one file."""
    try:
        list(MultiProcessCollector.merge([str(path)]))  # type: ignore[no-untyped-call]
    except Exception:
        return False
    return True


def skipped_files() -> float:
    return REGISTRY.get_sample_value("timeline_metrics_files_skipped_total") or 0.0


def test_a_scrape_leaves_out_metrics_files_being_created_or_cut_short(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sqlite_store: SQLiteStore,
) -> None:
    shared = tmp_path / "metrics"
    record_in_a_worker(shared, synced=3, requests=2)
    record_in_a_worker(shared, synced=4, requests=1)
    # Beside them, files as a worker leaves them when it dies while creating them (names no
    # process can have: pids stay below 2**22): one empty, one cut short inside its first
    # entry, so that no sample can come out of it, however a reader copes.
    empty = shared / "counter_4194999.db"
    empty.touch()
    cut = shared / "histogram_4194998.db"
    real = next(shared.glob("histogram_*.db"))
    cut.write_bytes(real.read_bytes()[:20])
    # How many of them prometheus_client itself refuses (both, up to 0.26 at least): the
    # scrape must not fail with them, whatever the version installed.
    refused = [path for path in (empty, cut) if not library_reads(path)]

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    client = create_app(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), store=sqlite_store
    ).test_client()
    caplog.set_level(logging.DEBUG, logger="timeline.metrics")
    sync = {"route": "/timeline/sync", "method": "GET", "status": "200"}

    def served() -> str:
        skipped = skipped_files()
        caplog.clear()
        text = scrape(client)  # a 200, not a 500
        assert skipped_files() - skipped == len(refused)
        named = {r.args[0] for r in caplog.records if r.name == "timeline.metrics"}
        assert named == {str(path) for path in refused}
        return text

    text = served()
    assert sample(text, "timeline_messages_written_total", kind="sync") == 7
    assert sample(text, "timeline_http_request_duration_seconds_count", **sync) == 3
    assert sample(text, "timeline_http_request_duration_seconds_bucket", **sync, le="0.0025") == 0
    assert sample(text, "timeline_http_request_duration_seconds_bucket", **sync, le="0.005") == 3
    assert sample(text, "timeline_http_request_duration_seconds_sum", **sync) == pytest.approx(
        0.009
    )
    assert sample(text, "timeline_fan_out_recipients_count") == 0
    assert all(r.levelno == logging.DEBUG for r in caplog.records)  # may be being created

    # Still unreadable at the next scrape: still left out, and now worth a warning.
    text = served()
    assert sample(text, "timeline_messages_written_total", kind="sync") == 7
    assert sample(text, "timeline_http_request_duration_seconds_count", **sync) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)

    # The empty file, once written, counts like any other: nothing is left out for good.
    record_in_a_worker(tmp_path / "later", synced=5, requests=0)
    shutil.copyfile(next((tmp_path / "later").glob("counter_*.db")), empty)
    refused = [path for path in refused if path != empty]
    text = served()
    assert sample(text, "timeline_messages_written_total", kind="sync") == 12
    assert sample(text, "timeline_http_request_duration_seconds_count", **sync) == 3


def test_request_ids_are_honoured_or_made_and_echoed(client: Any) -> None:
    reply = client.get("/timeline/sync?member=a", headers={"X-Request-ID": "abc-123"})
    assert reply.headers["X-Request-ID"] == "abc-123"
    made = client.get("/timeline/sync?member=a").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    # A header that could forge log lines is replaced, not echoed.
    reply = client.get("/healthz", headers={"X-Request-ID": 'x" "evil'})
    assert reply.headers["X-Request-ID"] != 'x" "evil'
    assert client.get("/nope", headers={"X-Request-ID": "r-404"}).headers["X-Request-ID"] == "r-404"


def test_one_structured_access_line_per_request(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="timeline.access")
    body = {"from": "a", "to": "b", "message": {"text": "hello"}}
    client.post("/timeline/send", data=json.dumps(body), headers={"X-Request-ID": "req-1"})
    [record] = [r for r in caplog.records if r.name == "timeline.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "POST"
    assert line["path"] == "/timeline/send"
    assert line["route"] == "/timeline/send"
    assert line["status"] == 200
    assert line["request_id"] == "req-1"
    assert line["duration_ms"] > 0
    assert line["level"] == "info"
    assert line["msg"] == "POST /timeline/send 200"


def test_message_contents_are_never_logged_at_info(
    client: Any, sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Every logger, at info: whatever the service says about a request is looked at.
    caplog.set_level(logging.INFO)
    secret = {"secret": "do-not-log"}
    send = {"from": "a", "to": "b", "message": secret}
    assert client.post("/timeline/send", data=json.dumps(send)).status_code == 200
    bad = {"from": "a", "to": "b:c", "message": secret}
    assert client.post("/timeline/send", data=json.dumps(bad)).status_code == 400
    group = {"group_name": "g", "group_members": ["a", "b"], "message": secret}
    assert client.post("/timeline/sendGroup", data=json.dumps(group)).status_code == 200
    # A failing request logs the most: its cause and the error, besides its access line.
    down = create_app(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), store=sqlite_store
    ).test_client()
    assert down.post("/timeline/send", data=json.dumps(send)).status_code == 503

    access = [
        (r.fields["path"], r.fields["status"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "timeline.access"
    ]
    sends = [("/timeline/send", 200), ("/timeline/send", 400), ("/timeline/sendGroup", 200)]
    assert access == [*sends, ("/timeline/send", 503)]
    causes = [r for r in caplog.records if r.name == "timeline.allocator"]
    assert causes
    assert all("Connection refused" in r.getMessage() for r in causes)
    [error] = [r for r in caplog.records if r.name == "timeline.api"]
    assert "TIMELINE_UNAVAILABLE" in error.getMessage()
    # What was logged, formatted as it is written (fields and all).
    written = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "do-not-log" not in written
    assert "secret" not in written


def test_errors_are_logged_with_their_cause(
    sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), store=sqlite_store
    ).test_client()
    caplog.set_level(logging.WARNING)
    client.get("/timeline/sync?member=a", headers={"X-Request-ID": "req-503"})
    causes = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert causes


# --- OpenAPI ---------------------------------------------------------------------------------


def normalized(path: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def test_the_document_describes_exactly_the_routes_served(app: Any) -> None:
    served = {
        (normalized(rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        # The console's page and assets (tests/test_console.py) are not the API.
        if rule.endpoint != "static" and not rule.endpoint.startswith("console.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    } | {(normalized(PREFIX + rule), method.lower()) for method, rule, _ in ROUTES}
    documented = {
        (normalized(path), method)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }
    assert documented == served


def test_the_document_is_served(client: Any) -> None:
    reply = client.get("/openapi.json")
    assert reply.status_code == 200
    document = reply.get_json()
    assert document["openapi"].startswith("3.")
    send = document["components"]["schemas"]["SendReply"]["properties"]["sequence"]
    assert send["type"] == "string"  # int64 as a string, as go-timeline writes it


# schemathesis' lazy fixture loader does not run under pytest 9, so the app it drives is
# built at import, on a port and a file of its own; a fixture starts that redis-server.
_SCHEMA_DIR = Path(tempfile.mkdtemp(prefix="timeline-schemathesis-"))
_SCHEMA_REDIS = RedisServer(_SCHEMA_DIR / "redis")
_SCHEMA_APP = create_app(
    Settings(
        redis_url=_SCHEMA_REDIS.url,
        sqlite_path=str(_SCHEMA_DIR / "t.sqlite3"),
        # Generated reads carry any wait_ms: each may be held this long (clamped), not 30 s,
        # so that 40 examples stay well within the test's timeout.
        sync_wait_max_ms=50,
    ),
)
schema = schemathesis.openapi.from_wsgi("/openapi.json", _SCHEMA_APP)


@pytest.fixture(scope="module")
def schema_redis() -> Any:
    _SCHEMA_REDIS.start()
    yield
    _SCHEMA_REDIS.stop()
    shutil.rmtree(_SCHEMA_DIR, ignore_errors=True)


@pytest.mark.usefixtures("schema_redis")
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_document(case: Any) -> None:
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ]
    )
