"""gRPC load for `make bench`: unary Send, the HTTP send scenario's messages (random pairs
among 30 users, each with a client_msg_id of its own), from several processes.

Each process holds `channels` channels of its own (each its own connection: the servers
share one port and the kernel spreads connections, not calls, over them) and keeps
`in_flight` calls outstanding on each. The processes are spawned, not forked (grpc does not
survive a fork), connect and warm up first, then all run for the same window.

    python -m timeline.bench.grpc_load [--target 127.0.0.1:9000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from timeline.bench.harness import SEND_USERS


@dataclass
class GrpcResult:
    """What one run did: calls that succeeded, failed (by status code), its window, the
    CPU its own processes used meanwhile, and what `meter` measured over the window."""

    requests: int
    duration: float
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    metered: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.duration if self.duration else 0.0


def _drive(
    target: str,
    channels: int,
    in_flight: int,
    seconds: float,
    token: str | None,
    start: Event,
    out: Connection,
) -> None:
    """One load process: connect, say so, wait for `start`, run the window, report."""
    import grpc

    from timeline.rpc.v1 import timeline_pb2 as pb
    from timeline.rpc.v1 import timeline_pb2_grpc

    rng = random.Random()  # noqa: S311 - load shapes, not secrets
    prefix = f"g{os.getpid()}-{rng.getrandbits(40):x}-"
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    # Each channel a connection of its own: grpc shares one per target among a process's
    # channels unless told otherwise.
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.insecure_channel(target, options=options) for _ in range(channels)]
    stubs = [timeline_pb2_grpc.TimelineStub(channel) for channel in opened]
    lock = threading.Lock()
    done = threading.Event()
    counter = 0
    completed = 0
    outstanding = 0
    errors: Counter[str] = Counter()
    deadline = 0.0

    def request() -> pb.SendMessageRequest:
        nonlocal counter
        counter += 1
        a = rng.randrange(SEND_USERS)
        b = rng.randrange(SEND_USERS - 1)
        b += b >= a
        mid = f"{prefix}{counter}"
        return pb.SendMessageRequest(
            **{"from": f"u{a}", "to": f"u{b}"}, message=f'{{"id":"{mid}"}}', client_msg_id=mid
        )

    def issue(stub: timeline_pb2_grpc.TimelineStub) -> None:
        nonlocal outstanding
        with lock:
            outstanding += 1
            call = stub.Send.future(request(), timeout=30, metadata=metadata)
        call.add_done_callback(lambda future: finished(stub, future))

    def finished(stub: timeline_pb2_grpc.TimelineStub, future: grpc.Future[Any]) -> None:
        nonlocal completed, outstanding
        failure = future.exception()
        with lock:
            outstanding -= 1
            if failure is None:
                completed += 1
            else:
                code = failure.code() if isinstance(failure, grpc.Call) else None
                errors[code.name if code is not None else type(failure).__name__] += 1
            again = time.monotonic() < deadline
            if not again and outstanding == 0:
                done.set()
        if again:
            issue(stub)

    for stub in stubs:  # connected, and the service's first call paid, before the window
        stub.Send(request(), timeout=30, metadata=metadata)
    out.send("ready")
    start.wait()
    began = time.monotonic()
    deadline = began + seconds
    cpu = time.process_time()
    for stub in stubs:
        for _ in range(in_flight):
            issue(stub)
    done.wait(seconds + 60)
    ended = time.monotonic()
    with lock:
        out.send((completed, ended - began, dict(errors), time.process_time() - cpu))
    for channel in opened:
        channel.close()


def run_sends(
    target: str,
    seconds: float,
    *,
    processes: int = 2,
    channels: int = 8,
    in_flight: int = 2,
    token: str | None = None,
    meter: Callable[[], float] | None = None,
) -> GrpcResult:
    """Unary Send at `target` (host:port) for `seconds`: `processes` x `channels` x
    `in_flight` calls outstanding at once. `meter` (the servers' CPU time, say) is read as
    the window opens and once every process has reported: the difference is `metered`."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    workers = [
        context.Process(
            target=_drive,
            args=(target, channels, in_flight, seconds, token, start, sender),
            daemon=True,
        )
        for _, sender in pipes
    ]
    for worker in workers:
        worker.start()
    try:
        for (receiver, _), worker in zip(pipes, workers, strict=True):
            if not receiver.poll(60) or receiver.recv() != "ready":
                raise RuntimeError(f"gRPC load process {worker.pid} did not connect to {target}")
        before = meter() if meter is not None else 0.0
        start.set()
        result = GrpcResult(0, 0.0)
        for receiver, _ in pipes:
            if not receiver.poll(seconds + 90):
                raise RuntimeError("a gRPC load process did not report")
            requests, duration, errors, cpu = receiver.recv()
            result.requests += requests
            result.duration = max(result.duration, duration)
            result.errors.update(errors)
            result.client_cpu_s += cpu
        result.metered = meter() - before if meter is not None else 0.0
        return result
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="timeline.bench.grpc_load", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:9000", help="host:port (make run's)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--channels", type=int, default=8, help="per process")
    parser.add_argument("--in-flight", type=int, default=2, help="calls per channel")
    parser.add_argument("--token", help="TIMELINE_API_TOKEN, when the service has one")
    args = parser.parse_args(argv)
    result = run_sends(
        args.target,
        args.seconds,
        processes=args.processes,
        channels=args.channels,
        in_flight=args.in_flight,
        token=args.token,
    )
    print(
        f"{result.requests} sends in {result.duration:.1f} s: {result.rate:,.0f}/s; "
        f"errors {dict(result.errors) or 0}; load generator {result.client_cpu_s:.1f} s of CPU"
    )


if __name__ == "__main__":
    main()
