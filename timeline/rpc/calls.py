"""What every timeline.v1.Timeline call gets, as ops.py and api.py give every HTTP request: a
request id, the bearer token check, the deadline, errors as go-kratos's status, one access
line and the request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc

from timeline import logs, metrics
from timeline.errors import TimelineError, Unavailable
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

#: A call's context: grpc.aio's (its objects belong to the server's event loop).
Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Reply = TypeVar("Reply")
T = TypeVar("T")
#: A method's own work: the request, the call's context, and the service to run it with. A
#: plain function runs on a thread of the server's pool and must not touch the context
#: (grpc's asyncio objects belong to the loop); a coroutine function runs on the loop, and
#: runs its blocking work through Calls.run.
Handler = Callable[[Request, Context, TimelineService], Any]
#: A server-streaming method's own work: the replies, one at a time, on the loop.
StreamHandler = Callable[[Request, Context, TimelineService], AsyncIterator[Reply]]
Method = Callable[[Request, Context], Coroutine[Any, Any, Reply]]
StreamMethod = Callable[[Request, Context], AsyncIterator[Reply]]


def remote_address(peer: str) -> str:
    """The client's address from grpc's peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...),
    without the port, as the HTTP access line has it."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in {"ipv4", "ipv6"}:
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return kind or peer


#: The call's deadline (time.monotonic; None: it has none), set as it begins, in the context
#: of the task grpc runs it in: every work item of the call carries it to its thread.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "timeline_grpc_deadline", default=None
)


def _in_time(work: Callable[..., T], *args: Any) -> T:
    """On a thread of the pool: `work(*args)`, unless the call's deadline passed while it
    waited for the thread (grpc cancels such a call, and with it the queued work, but a
    thread can take it first)."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the call's deadline passed before it started")
    return work(*args)


class Calls:
    """Wraps each method of the servicer; one per server.

    Every method is a coroutine on the server's event loop (grpc.aio): what blocks (the
    service: Redis, the store) runs on a thread of `executor`, whose size bounds the calls
    that run at once; a call waiting for messages (timeline.rpc.waiting) holds no thread."""

    def __init__(
        self,
        service: TimelineService,
        api_token: str | None,
        executor: Executor,
        queued_max: int = 256,
    ) -> None:
        """`queued_max`: the most work items running or queued for a thread at once; one
        more is refused (UNAVAILABLE, retry shortly), so that a flood of calls cannot grow
        the queue, and what its requests hold, without bound."""
        self.service = service
        self._token = api_token
        self._executor = executor
        self.queued_max = queued_max
        self.queued = 0  # on the loop's thread only

    async def run(self, work: Callable[..., T], *args: Any, admit: bool = True) -> T:
        """`work(*args)` on a thread of the pool, with the call's context (its request id on
        the log lines, its deadline); not started when the deadline has passed by the time a
        thread takes it. With `admit` (a call's first work), refused when queued_max are running
        or queued already; without (the read of a held call that a wake-up woke: a
        group message can wake thousands at once), it queues (the held calls are bounded).

        Cancelled (its client went away, its deadline passed) while it waits for a thread,
        it never starts; while a thread runs it, the thread finishes it (a write is bounded
        by the call's deadline already, timeline.service) and the cancellation waits for
        that, so that the call's access line and duration are the work's."""
        if admit and self.queued >= self.queued_max:
            raise Unavailable(
                f"this server runs or queues as many calls as it allows ({self.queued_max}); "
                "retry shortly",
            )
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, _in_time, work, *args)
        self.queued += 1
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancelled():  # it was running: wait for its end, whatever it is
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(future)
            raise
        finally:
            self.queued -= 1

    def method(
        self, name: str, handler: Handler[Request], *, writes: bool = False
    ) -> Method[Request, Any]:
        """The gRPC method `name` running `handler`. A method that `writes` is bounded by the
        call's deadline too: its service stops starting store writes when it passes."""
        path = f"/{SERVICE_NAME}/{name}"
        route = f"grpc:{path}"
        on_loop = inspect.iscoroutinefunction(handler)

        async def call(request: Request, context: Context) -> Any:
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
                    if on_loop:
                        reply = await handler(request, context, service)
                    else:
                        reply = await self.run(handler, request, context, service)
                except TimelineError as error:
                    failure = error
                    if error.code >= 500:
                        log.warning("%s: %s (%s)", path, error.reason, error.message)
                except asyncio.CancelledError:
                    status = self._gone(context)
                    raise
                except Exception:
                    log.exception("unhandled error on %s", path)
                    failure = TimelineError("internal error")
                else:
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    return reply
                status = failure.code
                # Before the abort, which sends the status: the line is written when the
                # client has its answer, as for a reply.
                self._record(route, path, status, started, request_id, context)
                status = 0
                await self._abort(context, failure, request_id)
                raise AssertionError("abort returned")  # pragma: no cover
            finally:
                if status:
                    self._record(route, path, status, started, request_id, context)
                logs.unbind_request_id(token)

        return call

    def stream(
        self, name: str, handler: StreamHandler[Request, Reply]
    ) -> StreamMethod[Request, Reply]:
        """The server-streaming method `name` running `handler`: the same request id, token
        check, errors and metrics, and one access line when the stream ends (its status:
        200 ended by the server, 499 the client cancelled, 504 its deadline passed)."""
        path = f"/{SERVICE_NAME}/{name}"
        route = f"grpc:{path}"

        async def call(request: Request, context: Context) -> AsyncIterator[Reply]:
            started = time.perf_counter()
            request_id = self._request_id(context)
            token = logs.bind_request_id(request_id)
            status: int | None = None
            try:
                try:
                    self._authorize(context)
                    self._remaining(context)
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    async for reply in handler(request, context, self.service):
                        yield reply
                    status = 200
                    return
                except TimelineError as error:
                    failure = error
                    if error.code >= 500:
                        log.warning("%s: %s (%s)", path, error.reason, error.message)
                except Exception:
                    log.exception("unhandled error on %s", path)
                    failure = TimelineError("internal error")
                status = failure.code
                self._record(route, path, status, started, request_id, context)
                status = 0  # written: the abort sends the status
                await self._abort(context, failure, request_id)
                raise AssertionError("abort returned")  # pragma: no cover
            finally:
                # Also when the client cancelled, or its deadline passed, mid-stream.
                if status is None:
                    status = self._gone(context)
                if status:
                    self._record(route, path, status, started, request_id, context)
                logs.unbind_request_id(token)

        return call

    @staticmethod
    async def _abort(context: Context, failure: TimelineError, request_id: str) -> None:
        """End the call with the error's status (raises grpc's AbortError)."""
        status = error_status(failure, trailing=((REQUEST_ID_KEY, request_id),))
        await context.abort(status.code, status.details, status.trailing_metadata)

    @staticmethod
    def _gone(context: Context) -> int:
        """How a call that its client did not wait for ended, as an HTTP status: 504 its
        deadline passed, 499 it cancelled."""
        remaining = context.time_remaining()
        return 504 if remaining is not None and remaining <= 0 else 499

    def _authorize(self, context: Context) -> None:
        """With an api_token set, the `authorization` metadata must be `Bearer <token>`."""
        given = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), ""
        )
        check_bearer(self._token, str(given))

    @staticmethod
    def _remaining(context: Context) -> float | None:
        """Seconds left before the call's deadline (None: it has none), which its work then
        carries (_DEADLINE). A call whose deadline passed, or whose client went away, before
        it began is not started."""
        if context.cancelled():
            raise Cancelled("the client cancelled the call")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it started")
        _DEADLINE.set(None if remaining is None else time.monotonic() + remaining)
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
    def _request_id(context: Context) -> str:
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
        context: Context,
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
