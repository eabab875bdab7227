"""What operators use: health and readiness probes, metrics, the OpenAPI document, and the
per-request hooks (request id, one access log line, latency histogram)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from timeline import metrics
from timeline.errors import TimelineError, Unavailable
from timeline.logs import REQUEST_ID, REQUEST_ID_PATTERN
from timeline.openapi import openapi_document
from timeline.service import TimelineService

bp = Blueprint("ops", __name__)
access_log = logging.getLogger("timeline.access")


def _service() -> TimelineService:
    service: TimelineService = current_app.extensions["timeline"]["service"]
    return service


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    """Liveness: the process answers. Never depends on Redis or the store."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, Any]:
    """Readiness: 200 only when Redis and the store both answer and the store's indexes are
    built."""
    service = _service()
    checks: dict[str, str] = {}
    for name, ping in (("redis", service.allocator.ping), ("store", service.store.ping)):
        try:
            ping()
            checks[name] = "ok"
        except TimelineError:
            checks[name] = "down"
    down = [f"{name} down" for name, state in checks.items() if state != "ok"]
    # The store's own preparation (MongoDB's indexes): writes wait for it.
    checks["indexes"] = service.store.readiness()
    if checks["indexes"] != "ready":
        down.append(f"store indexes {checks['indexes']}")
    if down:
        raise Unavailable(f"not ready: {', '.join(down)}", **checks)
    return {"status": "ready", "checks": checks}


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return openapi_document()


# Request-scoped values live in the WSGI environ: plain dict access, on every request.
_STARTED = "timeline.started"


def _start() -> None:
    environ = request.environ
    environ[_STARTED] = time.perf_counter()
    given = environ.get("HTTP_X_REQUEST_ID", "")
    environ[REQUEST_ID] = given if REQUEST_ID_PATTERN.fullmatch(given) else os.urandom(16).hex()


def _finish(response: Response) -> Response:
    req = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    duration = time.perf_counter() - environ.get(_STARTED, time.perf_counter())
    request_id = environ.get(REQUEST_ID) or os.urandom(16).hex()
    status = response.status_code
    response.headers["X-Request-ID"] = request_id
    rule = req.url_rule
    route = rule.rule if rule is not None else "unmatched"
    method = req.method
    metrics.observe_request(route, method, status, duration)
    if access_log.isEnabledFor(logging.INFO):
        # The path names users and groups, never message contents; the query is left out.
        path = req.path
        fields = {
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "remote": req.remote_addr,
        }
        access_log.info(
            "%s %s %s", method, path, status, extra={"fields": fields, "request_id": request_id}
        )
    return response


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start)
    app.after_request(_finish)
