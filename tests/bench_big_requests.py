"""Figures for the largest requests the limits allow, on SQLite (not collected by pytest).

    .venv/bin/python tests/bench_big_requests.py [--members 10000] [--messages 20]
        [--message-bytes N] [--only replay|contention] [--direct] [--store-file before.py]

1. replay: a sendGroup with a client_msg_id, then the same request again, three times (a
   client's retry after a lost reply), through TimelineService; each attempt's time, the
   store calls it made, and (the last, traced) the SQL statements they ran.
2. contention: a fan-out of the same size (through the service, or with --direct as one
   store.write() of all its copies) while another thread, through a service on a second
   SQLiteStore of the same file, sends one-to-one messages one after another: how many it
   sent, how many got a 503 and how many store writes ran out of the busy timeout (the
   service retries those), the sends' latencies (a 503's included), and how long each of
   the fan-out's transactions held the write lock.

--store-file measures a version of the SQLite store from before it became a package
(timeline/store/sqlite/), one file: `git show c019b7a:timeline/store/sqlite.py >
/tmp/sqlite_before.py`. The service's request deadline is set far away: the figures are the
work's cost, not where a deadline cut it.

A redis-server of its own is started on a free port.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import RedisServer
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.errors import Unavailable
from timeline.model import Copies, Message
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore

PADDING = ""  # --message-bytes: each message's text is padded to about this size
DIRECT = False  # --direct: the contention's fan-out is one store.write() of all its copies


def message(n: int) -> Message:
    document = {"n": n, "text": PADDING} if PADDING else {"n": n}
    return Message(document, json.dumps(document, separators=(",", ":")))


class Counting:
    """A store that counts and times each call the service makes."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner, self.backend = inner, inner.backend
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.calls[name] += 1
                self.seconds[name] += time.perf_counter() - start

        return call


def service(redis_url: str, store: Any, prefix: str = "bench:") -> TimelineService:
    """A service whose request deadline (where there is one) is far away: the figures are
    what the work costs, not where a deadline cut it short."""
    allocator = Allocator(StandaloneRedis(connect_redis(redis_url, Settings())), prefix)
    fields = {f.name for f in dataclasses.fields(Policy)}
    policy = Policy(**({"request_deadline_ms": 600_000} if "request_deadline_ms" in fields else {}))
    return TimelineService(allocator, store, policy)


def connection(store: Any) -> Any:
    """This thread's connection of the store: of the package, or of a --store-file."""
    if hasattr(store, "_connections"):
        return store._connections.connection()
    return store._connection()


def replay(redis_url: str, path: Path, members: list[str], count: int) -> None:
    store = SQLiteStore(path)
    counting = Counting(store)
    svc = service(redis_url, counting)
    batch = [message(n) for n in range(count)]
    # Warm up: the members' counters exist (seeding them is a first-message cost only).
    svc.send_group("warm", members, [message(-1)])
    statements = Counter[str]()

    def trace(sql: str) -> None:
        statements[sql.split(None, 1)[0].upper()] += 1

    # The last replay is traced (every statement counted), the others timed untraced.
    for attempt in ("first", "replay 1", "replay 2", "traced"):
        counting.calls.clear()
        counting.seconds.clear()
        statements.clear()
        if attempt == "traced":
            connection(store).set_trace_callback(trace)
        start = time.perf_counter()
        failed = svc.send_group("g", members, batch, client_msg_id="bench-1")
        took = time.perf_counter() - start
        connection(store).set_trace_callback(None)
        assert not failed, failed
        calls = ", ".join(
            f"{name} x{n} {counting.seconds[name] * 1000:.0f} ms"
            for name, n in sorted(counting.calls.items())
        )
        print(
            f"  {attempt:9s} {took * 1000:8.0f} ms   store: {calls}   "
            f"SQL statements: {sum(statements.values())} ({dict(statements)})"
        )
    store.close()


class Failures:
    """A store that counts the writes that raised (each one a busy timeout run out)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.backend, self.failed = inner, inner.backend, 0

    def write(self, *args: Any) -> Any:
        try:
            return self.inner.write(*args)
        except Unavailable:
            self.failed += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def held(store: Any) -> list[float]:
    """Record how long each of the store's write transactions holds the lock (from the
    moment BEGIN IMMEDIATE succeeds to the end of COMMIT), where the store says."""
    holds: list[float] = []
    if hasattr(store, "_parts"):  # the package
        connections, parts = store._connections, store._parts
        begin, part = connections.begin, parts.write
    elif hasattr(store, "_write_part"):  # a --store-file of one module
        begin, part = store._begin, store._write_part
    else:
        return holds  # a store of before _write_part: one transaction per write
    started = [0.0]

    def timed_begin(*args: Any) -> None:
        begin(*args)
        started[0] = time.perf_counter()

    def timed_part(*args: Any) -> Any:
        result = part(*args)
        holds.append(time.perf_counter() - started[0])
        return result

    if hasattr(store, "_parts"):
        connections.begin, parts.write = timed_begin, timed_part
    else:
        store._begin, store._write_part = timed_begin, timed_part
    return holds


def contention(redis_url: str, path: Path, members: list[str], count: int) -> None:
    fan_store, one_store = SQLiteStore(path), Failures(SQLiteStore(path))
    fan, one = service(redis_url, fan_store), service(redis_url, one_store)
    fan.send_group("warm2", members, [message(-1)])
    one.send("x0", "y0", [message(0)])
    holds = held(fan_store)
    batch = [message(n) for n in range(count)]
    latencies: list[float] = []
    failures = 0
    running = threading.Event()
    done = threading.Event()

    def one_to_one() -> None:
        nonlocal failures
        i = 0
        running.set()
        while not done.is_set():
            start = time.perf_counter()
            try:
                one.send(f"x{i % 50}", f"y{i % 50}", [message(i)])
            except Unavailable:
                failures += 1
            latencies.append(time.perf_counter() - start)  # a 503's too
            i += 1

    thread = threading.Thread(target=one_to_one)
    thread.start()
    running.wait()
    time.sleep(0.05)
    start = time.perf_counter()
    if DIRECT:  # one store write of every copy, as the service made before it cut them
        copies = Copies(members, [2] * len(members), batch, 1, "direct")
        fan_store.write(Copies(["g2"], [1], batch, 1, "direct"), copies)
    else:
        fan.send_group("g2", members, batch)
    took = time.perf_counter() - start
    done.set()
    thread.join()
    latencies.sort()
    print(
        f"  fan-out {len(members)} x {count}: {took * 1000:.0f} ms; one-to-one sends meanwhile: "
        f"{len(latencies)}, 503 {failures}, store writes failed (busy timeout) "
        f"{one_store.failed}; send latency median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    if holds:
        holds.sort()
        print(
            f"  fan-out transactions: {len(holds)}, lock held median "
            f"{statistics.median(holds) * 1000:.1f} ms, p90 "
            f"{holds[int(len(holds) * 0.9)] * 1000:.1f} ms, max {holds[-1] * 1000:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--only", choices=["replay", "contention"])
    parser.add_argument("--message-bytes", type=int, default=0)
    parser.add_argument("--direct", action="store_true")
    parser.add_argument(
        "--store-file",
        help="take SQLiteStore from this file instead (e.g. `git show "
        "c019b7a:timeline/store/sqlite.py > /tmp/sqlite_before.py`), for the figures before",
    )
    args = parser.parse_args()
    global DIRECT, PADDING, SQLiteStore
    PADDING = "x" * max(0, args.message_bytes - 20)
    DIRECT = args.direct
    if args.store_file:
        spec = importlib.util.spec_from_file_location("sqlite_before", args.store_file)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        SQLiteStore = module.SQLiteStore
    members = [f"member-{i:05d}" for i in range(args.members)]
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory) / "redis").start()
        try:
            if args.only in (None, "replay"):
                print(f"replay: sendGroup {args.members} x {args.messages} with client_msg_id")
                replay(server.url, Path(directory) / "a.sqlite3", members, args.messages)
            if args.only in (None, "contention"):
                print("contention: one-to-one sends on a second store during the fan-out")
                contention(server.url, Path(directory) / "b.sqlite3", members, args.messages)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
