"""What operators use: health and readiness probes, metrics, the OpenAPI document, and the
per-request hooks (request id, one access log line, latency histogram)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request

from timeline import metrics
from timeline.errors import TimelineError, Unavailable
from timeline.openapi import openapi_document
from timeline.service import TimelineService

bp = Blueprint("ops", __name__)
access_log = logging.getLogger("timeline.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _service() -> TimelineService:
    service: TimelineService = current_app.extensions["timeline"]["service"]
    return service


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    """Liveness: the process answers. Never depends on Redis or the store."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, Any]:
    """Readiness: 200 only when Redis and the store both answer."""
    service = _service()
    checks: dict[str, str] = {}
    for name, ping in (("redis", service.allocator.ping), ("store", service.store.ping)):
        try:
            ping()
            checks[name] = "ok"
        except TimelineError:
            checks[name] = "down"
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        raise Unavailable(f"not ready: {', '.join(down)} down", **checks)
    return {"status": "ready", "checks": checks}


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return openapi_document()


def _start() -> None:
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    duration = time.perf_counter() - g.get("started", time.perf_counter())
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-ID"] = request_id
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUEST_DURATION.labels(route, request.method, str(response.status_code)).observe(
        duration
    )
    # The path names users and groups, never message contents; the query string is left out.
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status_code,
        extra={
            "method": request.method,
            "path": request.path,
            "route": route,
            "status": response.status_code,
            "duration_ms": round(duration * 1000, 3),
            "request_id": request_id,
            "remote": request.remote_addr,
        },
    )
    return response


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start)
    app.after_request(_finish)
