"""What every timeline.v1.Timeline call gets, as ops.py and api.py give every HTTP request: a
request id, the bearer token check, the deadline, errors as go-kratos's status, one access
line and the request metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc

from timeline import logs, metrics
from timeline.errors import TimelineError
from timeline.logs import REQUEST_ID_PATTERN
from timeline.rpc.status import Cancelled, DeadlineExceeded, error_status, grpc_code
from timeline.service import TimelineService
from timeline.validation import check_bearer

SERVICE_NAME = "timeline.v1.Timeline"
#: The request id's metadata key, both ways (gRPC metadata keys are lower case).
REQUEST_ID_KEY = "x-request-id"
#: The method label of gRPC calls in timeline_http_request_duration_seconds (their route
#: label is grpc:/timeline.v1.Timeline/<Method>).
METHOD_LABEL = "GRPC"

access_log = logging.getLogger("timeline.access")
log = logging.getLogger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")
#: A method's own work: the request, the call's context, and the service to run it with.
Handler = Callable[[Request, grpc.ServicerContext, TimelineService], Reply]
#: A server-streaming method's own work: the replies, one at a time.
StreamHandler = Callable[[Request, grpc.ServicerContext, TimelineService], Iterator[Reply]]


def remote_address(peer: str) -> str:
    """The client's address from grpc's peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...),
    without the port, as the HTTP access line has it."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in {"ipv4", "ipv6"}:
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return kind or peer


class Calls:
    """Wraps each method of the servicer; one per server."""

    def __init__(self, service: TimelineService, api_token: str | None) -> None:
        self.service = service
        self._token = api_token

    def method(
        self, name: str, handler: Handler[Request, Reply], *, writes: bool = False
    ) -> Callable[[Request, grpc.ServicerContext], Reply]:
        """The gRPC method `name` running `handler`. A method that `writes` is bounded by the
        call's deadline too: its service stops starting store writes when it passes."""
        path = f"/{SERVICE_NAME}/{name}"
        route = f"grpc:{path}"

        def call(request: Request, context: grpc.ServicerContext) -> Reply:
            started = time.perf_counter()
            request_id = self._request_id(context)
            # On every line logged meanwhile (timeline.logs.RequestIdFilter), as for HTTP.
            token = logs.bind_request_id(request_id)
            status = 200
            try:
                try:
                    self._authorize(context)
                    remaining = self._remaining(context)
                    service = self._within(remaining) if writes else self.service
                    reply = handler(request, context, service)
                except TimelineError as error:
                    failure = error
                    if error.code >= 500:
                        log.warning("%s: %s (%s)", path, error.reason, error.message)
                except Exception:
                    log.exception("unhandled error on %s", path)
                    failure = TimelineError("internal error")
                else:
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    return reply
                status = failure.code
                context.abort_with_status(
                    error_status(failure, trailing=((REQUEST_ID_KEY, request_id),))
                )
                raise AssertionError("abort_with_status returned")  # pragma: no cover
            finally:
                self._record(route, path, status, started, request_id, context)
                logs.unbind_request_id(token)

        return call

    def stream(
        self, name: str, handler: StreamHandler[Request, Reply]
    ) -> Callable[[Request, grpc.ServicerContext], Iterator[Reply]]:
        """The server-streaming method `name` running `handler`: the same request id, token
        check, errors and metrics, and one access line when the stream ends (its status:
        200 ended by the server, 499 the client cancelled, 504 its deadline passed)."""
        path = f"/{SERVICE_NAME}/{name}"
        route = f"grpc:{path}"

        def call(request: Request, context: grpc.ServicerContext) -> Iterator[Reply]:
            started = time.perf_counter()
            request_id = self._request_id(context)
            token = logs.bind_request_id(request_id)
            status: int | None = None
            try:
                try:
                    self._authorize(context)
                    self._remaining(context)
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    yield from handler(request, context, self.service)
                    return
                except TimelineError as error:
                    failure = error
                    if error.code >= 500:
                        log.warning("%s: %s (%s)", path, error.reason, error.message)
                except Exception:
                    log.exception("unhandled error on %s", path)
                    failure = TimelineError("internal error")
                status = failure.code
                context.abort_with_status(
                    error_status(failure, trailing=((REQUEST_ID_KEY, request_id),))
                )
                raise AssertionError("abort_with_status returned")  # pragma: no cover
            finally:
                # Also when grpc drops the stream at a reply its client will never read.
                if status is None:
                    status = self._ended(context)
                self._record(route, path, status, started, request_id, context)
                logs.unbind_request_id(token)

        return call

    @staticmethod
    def _ended(context: grpc.ServicerContext) -> int:
        """How a stream that raised nothing ended, as an HTTP status."""
        if context.is_active():
            return 200
        remaining = context.time_remaining()
        return 504 if remaining is not None and remaining <= 0 else 499

    def _authorize(self, context: grpc.ServicerContext) -> None:
        """With an api_token set, the `authorization` metadata must be `Bearer <token>`."""
        given = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), ""
        )
        check_bearer(self._token, str(given))

    @staticmethod
    def _remaining(context: grpc.ServicerContext) -> float | None:
        """Seconds left before the call's deadline (None: it has none). A call that waited
        past it in the queue, or whose client went away, is not started."""
        if not context.is_active():
            raise Cancelled("the client cancelled the call")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it started")
        return remaining

    def _within(self, remaining: float | None) -> TimelineService:
        """The service, its request deadline brought forward to the call's when that is
        sooner: no store write starts after it (a fan-out then reports who it did not write;
        a send whose history copy was not stored answers UNAVAILABLE). The same allocator,
        store and clock; only the policy differs."""
        policy = self.service.policy
        if remaining is None or remaining * 1000 >= policy.request_deadline_ms:
            return self.service
        return self.service.with_policy(
            dataclasses.replace(policy, request_deadline_ms=max(1, int(remaining * 1000)))
        )

    @staticmethod
    def _request_id(context: grpc.ServicerContext) -> str:
        """The client's x-request-id when it is a valid one, else one of ours."""
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and isinstance(value, str):
                if REQUEST_ID_PATTERN.fullmatch(value):
                    return value
                break
        return os.urandom(16).hex()

    @staticmethod
    def _record(
        route: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        context: grpc.ServicerContext,
    ) -> None:
        """The request metrics and the access line, as timeline.ops writes them for HTTP;
        `status` is the HTTP code the HTTP twin answers with, grpc_code what was sent."""
        duration = time.perf_counter() - started
        metrics.observe_request(route, METHOD_LABEL, status, duration)
        if access_log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "method": METHOD_LABEL,
                "path": path,
                "route": route,
                "status": status,
                "grpc_code": grpc_code(status).name,
                "duration_ms": round(duration * 1000, 3),
                "remote": remote_address(context.peer()),
            }
            access_log.info(
                "%s %s %s",
                METHOD_LABEL,
                path,
                status,
                extra={"fields": fields, "request_id": request_id},
            )
