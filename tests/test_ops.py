"""Health, readiness, metrics, request ids and access logs, and the OpenAPI document."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support import RedisServer, free_port, sample
from timeline.factory import create_app
from timeline.logs import JsonFormatter
from timeline.openapi import openapi_document
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore


def test_healthz_answers_even_with_every_dependency_down() -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=200,
    )
    client = create_app(settings).test_client()
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


def test_metrics_count_requests_messages_fan_out_and_failures(client: Any) -> None:
    before = client.get("/metrics").get_data(as_text=True)
    members = ["a", "b", "c"]
    body = {"group_name": "g", "group_members": members, "message": "{}"}
    assert client.post("/timeline/sendGroup", data=json.dumps(body)).status_code == 200
    client.get("/timeline/sync?member=a")
    client.get("/timeline/sync?member=a:b")  # a 400
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.content_type.startswith("text/plain")
    after = reply.get_data(as_text=True)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("timeline_messages_written_total", kind="history") == 1
    assert grew("timeline_messages_written_total", kind="sync") == 3
    assert grew("timeline_fan_out_recipients_count") == 1
    assert grew("timeline_fan_out_recipients_sum") == 3
    route = {"route": "/timeline/sync", "method": "GET"}
    assert grew("timeline_http_request_duration_seconds_count", **route, status="200") == 1
    assert grew("timeline_http_request_duration_seconds_count", **route, status="400") == 1
    assert "timeline_failed_members_total" in after
    assert "timeline_dependency_errors_total" in after


def test_dependency_errors_are_counted(sqlite_store: SQLiteStore) -> None:
    client = create_app(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), store=sqlite_store
    ).test_client()
    before = sample(
        client.get("/metrics").get_data(as_text=True),
        "timeline_dependency_errors_total",
        dependency="redis",
    )
    client.get("/timeline/sync?member=a")
    after = sample(
        client.get("/metrics").get_data(as_text=True),
        "timeline_dependency_errors_total",
        dependency="redis",
    )
    assert after - before == 1


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
    body = {"from": "a", "to": "b", "message": {"secret": "do-not-log"}}
    client.post("/timeline/send", data=json.dumps(body), headers={"X-Request-ID": "req-1"})
    [record] = [r for r in caplog.records if r.name == "timeline.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "POST"
    assert line["path"] == "/timeline/send"
    assert line["status"] == 200
    assert line["request_id"] == "req-1"
    assert line["duration_ms"] > 0
    assert line["level"] == "info"
    assert "do-not-log" not in caplog.text


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
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
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
    Settings(redis_url=_SCHEMA_REDIS.url, sqlite_path=str(_SCHEMA_DIR / "t.sqlite3")),
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
