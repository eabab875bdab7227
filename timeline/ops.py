"""What operators use: health and readiness probes, metrics, the OpenAPI document, and the
per-request hooks (request id, one access log line, latency histogram)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from timeline import logs, metrics
from timeline.errors import InvalidParam, TimelineError, Unavailable
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
    """Readiness for every request (`for=writes`, the default): 200 only when Redis and the
    store both answer and what gates writes (MongoDB's unique indexes) is built. For reads
    (`for=reads`): when Redis and the store answer, also while indexes build, since reads
    never wait for them. A problem only an operator can solve (documents that collide on
    (id, seq)) is named in one line, in `problem` and in the message."""
    purpose = request.args.get("for", "writes")
    if purpose not in ("reads", "writes"):
        raise InvalidParam("for must be reads or writes", param="for")
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
    problem = service.store.problem()
    if problem:
        checks["problem"] = problem
    if purpose == "writes" and checks["indexes"] != "ready":
        down.append(f"store indexes {checks['indexes']}" + (f": {problem}" if problem else ""))
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
_BOUND = "timeline.request_id_bound"


def begin(environ: dict[str, Any]) -> float:
    """A request starts: its id (the client's X-Request-ID when valid, else a new one) goes
    into the environ and onto every log line it causes. Returns when it started."""
    started = time.perf_counter()
    environ[_STARTED] = started
    given = environ.get("HTTP_X_REQUEST_ID", "")
    request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else os.urandom(16).hex()
    environ[REQUEST_ID] = request_id
    environ[_BOUND] = logs.bind_request_id(request_id)
    return started


def end(environ: dict[str, Any]) -> str:
    """A request's work is over: its id leaves the log lines. Returns the id."""
    bound = environ.pop(_BOUND, None)
    if bound is not None:
        logs.unbind_request_id(bound)
    request_id: str | None = environ.get(REQUEST_ID)
    return request_id or os.urandom(16).hex()


def record(
    environ: dict[str, Any],
    route: str,
    method: str,
    status: int,
    path: str,
    started: float | None,
    request_id: str,
) -> None:
    """A request answered: its latency in the histogram, its access line in the log."""
    duration = time.perf_counter() - (started or time.perf_counter())
    metrics.observe_request(route, method, status, duration)
    if access_log.isEnabledFor(logging.INFO):
        # The path names users and groups, never message contents; the query is left out.
        fields = {
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "remote": environ.get("REMOTE_ADDR"),
        }
        access_log.info(
            "%s %s %s", method, path, status, extra={"fields": fields, "request_id": request_id}
        )


def _start() -> None:
    begin(request.environ)


def _finish(response: Response) -> Response:
    req = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    request_id = environ.get(REQUEST_ID) or os.urandom(16).hex()
    response.headers["X-Request-ID"] = request_id
    rule = req.url_rule
    route = rule.rule if rule is not None else "unmatched"
    status = response.status_code
    record(environ, route, req.method, status, req.path, environ.get(_STARTED), request_id)
    return response


def _teardown(_error: BaseException | None) -> None:
    end(request.environ)


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_teardown)
