"""The gRPC server: the service built as create_app builds it, timeline.v1.Timeline, health
(grpc.health.v1), server reflection, and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from timeline.allocator import open_allocator
from timeline.embedded import Lease
from timeline.errors import TimelineError
from timeline.rpc.calls import SERVICE_NAME, Calls
from timeline.rpc.servicer import TimelineServicer
from timeline.rpc.waiting import Holds
from timeline.service import Policy, TimelineService, _now_ms
from timeline.settings import Settings
from timeline.store import Preparer, Purger, Store, open_store, retention_ms
from timeline.validation import Limits
from timeline.wakes import CHANNEL, Wakes

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Calls run at once: the threads of the pool that runs the service (its clients are
#: thread-safe, as under gunicorn's threads); the calls themselves are coroutines.
THREADS = 16
#: Calls held open waiting for entries at once (Subscribe streams, and reads with wait_ms
#: while they wait): each is a coroutine parked on the loop, a few KB, no thread; beyond,
#: RESOURCE_EXHAUSTED (timeline.rpc.waiting). The HTTP worker's budget, per process.
HELD = 10_000
#: Work (a call's service work, a waiting call's read) running or queued for a thread at
#: once; beyond, UNAVAILABLE at once (retry shortly) rather than a queue that grows without
#: bound (calls.Calls). A queued call whose deadline passes meanwhile never starts. grpc
#: itself accepts at most this many calls beside the waiting ones (RESOURCE_EXHAUSTED).
MAX_CALLS = 256
#: The health service name of readiness for reads alone (see TimelineServer).
READS_SERVICE_NAME = f"{SERVICE_NAME}.reads"
#: How often readiness (Redis, the store, its indexes) is checked for the health service.
HEALTH_INTERVAL_S = 2.0


@dataclass
class Runtime:
    """What one process serves with: the service and its background work, as create_app
    wires them for a gunicorn worker (the embedded redis-server is held by a lease)."""

    settings: Settings
    service: TimelineService
    purger: Purger
    preparer: Preparer
    wakes: Wakes
    lease: Lease | None = None
    owns_store: bool = True  # False when the store was given: its owner closes it
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, store: Store | None = None) -> Runtime:
        """`store` replaces the one the settings name (tests use it for mongomock)."""
        lease = Lease(settings.data_dir) if settings.embedded_redis else None
        owns_store = store is None
        try:
            allocator = open_allocator(settings, lease.url if lease else settings.redis_url)
            store = store or open_store(settings)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        wakes = Wakes(allocator.redis, settings.redis_key_prefix + CHANNEL)
        wakes.start()
        policy = Policy.from_settings(settings)
        service = TimelineService(allocator, store, policy, notify=wakes.publish)
        purger = Purger(store, retention_ms(settings), settings.purge_interval_seconds, _now_ms)
        purger.start()
        preparer = Preparer(store)
        preparer.start()
        log.info(
            "timeline-grpc ready: store=%s redis=%s",
            store.backend,
            "embedded" if settings.embedded_redis else allocator.describe(),
        )
        return cls(settings, service, purger, preparer, wakes, lease, owns_store)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wakes.stop()
        self.purger.stop()
        self.preparer.stop()
        self.service.allocator.close()
        if self.owns_store:
            self.service.store.close()
        if self.lease is not None:
            self.lease.release()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for its gRPC servers, run by a daemon thread of its own
    (grpc.aio's objects belong to the loop they were made on: one loop for all of them)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="timeline-grpc-loop", daemon=True
            ).start()
            _LOOP = loop
        return _LOOP


class TimelineServer:
    """timeline.v1.Timeline, grpc.health.v1.Health and reflection on one grpc.aio server.

    The calls are coroutines on one event loop (the process's, run by a thread of its own);
    what blocks (the service's Redis and store calls) runs on a pool of `threads`, so a call
    that waits for messages holds no thread (timeline.rpc.waiting). grpc.aio, not grpcio's
    thread-per-call server, for that reason: it is grpcio's own asyncio stack, on the same
    core, and the service stays synchronous code run on threads.

    Health: the service "" is liveness (SERVING while the process serves, like /healthz);
    "timeline.v1.Timeline" is readiness for every call (SERVING while Redis and the store
    answer and what gates writes, MongoDB's unique indexes, is built, like /readyz), and
    "timeline.v1.Timeline.reads" readiness for reads (Redis and the store answer, like
    /readyz?for=reads); both checked every `health_interval_s`.
    """

    def __init__(
        self,
        runtime: Runtime,
        bind: str,
        *,
        threads: int = THREADS,
        held: int = HELD,
        health_interval_s: float = HEALTH_INTERVAL_S,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: share the port with the other serving processes of one deployment
        (SO_REUSEPORT: the kernel spreads connections over them); its supervisor has checked
        that nothing else listens there (timeline.rpc.supervisor.PortLease)."""
        settings = runtime.settings
        self.runtime = runtime
        self.bind = bind
        self._health_interval_s = health_interval_s
        self._stopping = threading.Event()
        self._loop = _loop()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="timeline-grpc")
        calls = Calls(runtime.service, settings.api_token, self._executor, MAX_CALLS)
        self.holds = Holds(runtime.wakes, held, settings.sync_wait_max_ms, calls.run)
        servicer = TimelineServicer(Limits.from_settings(settings), calls, self.holds)
        self.health = health.aio.HealthServicer()

        async def build() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(
                maximum_concurrent_rpcs=MAX_CALLS + held,
                options=[
                    # grpc sets SO_REUSEPORT by default: a second server on the same port
                    # would share its traffic in silence. One server per address, or a bind
                    # error, unless this is one of the processes a supervisor runs there.
                    ("grpc.so_reuseport", 1 if reuse_port else 0),
                    # The HTTP API's body limit; a larger request is RESOURCE_EXHAUSTED.
                    ("grpc.max_receive_message_length", settings.body_max_bytes),
                ],
            )
            servicer.add_to_server(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            return server, server.add_insecure_port(bind)

        try:
            self._server, self.port = self.on_loop(build())
        except RuntimeError:  # it cannot bind there
            self._executor.shutdown(wait=False)
            raise

    def on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def start(self) -> None:
        self._check_readiness()
        self._set_health("", health_pb2.HealthCheckResponse.SERVING)
        self.on_loop(self._server.start())
        threading.Thread(target=self._watch, name="timeline-grpc-health", daemon=True).start()

    def stop(self, grace_s: float) -> None:
        """Stop gracefully: health says NOT_SERVING, calls waiting for entries end now (a read
        answers its page, a Subscribe UNAVAILABLE: its client subscribes again elsewhere or
        later), new calls are refused, calls in flight get `grace_s` to finish (then they
        are cancelled)."""
        self._stopping.set()
        self.on_loop(self.health.enter_graceful_shutdown())
        self.holds.stop()
        self.on_loop(self._server.stop(grace_s))
        self._executor.shutdown(wait=False)

    def _set_health(self, service: str, status: Any) -> None:
        self.on_loop(self.health.set(service, status))

    def _watch(self) -> None:
        while not self._stopping.wait(self._health_interval_s):
            self._check_readiness()

    def _check_readiness(self) -> None:
        service = self.runtime.service
        readable = True
        for ping in (service.allocator.ping, service.store.ping):
            try:
                ping()
            except TimelineError:
                readable = False
        ready = readable and service.store.readiness() == "ready"
        if self._stopping.is_set():
            return  # enter_graceful_shutdown has said NOT_SERVING for good
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        self._set_health(SERVICE_NAME, serving if ready else not_serving)
        self._set_health(READS_SERVICE_NAME, serving if readable else not_serving)


def grace_s(settings: Settings) -> float:
    """How long calls in flight may take to finish at shutdown: the gap grace, which
    bounds any write (request_deadline_ms + the longest store operation + 1 s, at least)."""
    return settings.gap_grace_ms / 1000


def serve(
    settings: Settings,
    bind: str,
    *,
    ready_fd: int | None = None,
    parent: int = 0,
    reuse_port: bool = False,
) -> int:
    """Serve until SIGTERM or SIGINT (or until `parent`, when given, is no longer this
    process's parent), then stop gracefully. Returns the exit status."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("timeline-grpc: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    # Before anything starts: a stop asked for during start-up is honoured once serving.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime = Runtime.open(settings)
    try:
        try:
            server = TimelineServer(runtime, bind, reuse_port=reuse_port)
        except RuntimeError as exc:
            log.error("timeline-grpc cannot listen on %s: %s", bind, exc)
            print(
                f"timeline: TIMELINE_GRPC_BIND: cannot listen on {bind} (in use, or not an "
                "address of this machine)",
                file=sys.stderr,
            )
            return 1
        server.start()
        log.info("timeline-grpc serving %s on %s (port %d)", SERVICE_NAME, bind, server.port)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        while not stop.wait(1.0):
            if parent and os.getppid() != parent:
                log.warning("timeline-grpc: its parent process %d is gone, stopping", parent)
                break
        server.stop(grace_s(settings))
        log.info("timeline-grpc stopped")
        return 0
    finally:
        runtime.close()
