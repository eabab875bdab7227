"""A 10,000-member sendGroup on a 3-master Redis Cluster against one Redis, in one run (not
collected by pytest); writes its section of docs/benchmarks.md.

    .venv/bin/python tests/bench_cluster.py [--members 10000] [--samples 21] [--no-write]

Starts its own servers on free loopback ports (tests/topologies.py): one redis-server, and a
cluster of 3 masters each with a replica. Samples alternate between the two, so that the
machine's drift hits both alike. Measured:

1. the allocation alone (Allocator.allocate of the history timeline and 10,000 members),
   without and with an idempotency record: one EVALSHA on one Redis; on the cluster one call
   per bucket touched (64), one pipeline per master, all masters at once;
2. the whole sendGroup through TimelineService (allocation, the store's record of the
   idempotent message, one bulk write of 10,001 documents), on SQLite.

The section sits between the markers below in docs/benchmarks.md; `make bench` keeps it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import RedisServer
from timeline.allocator import Allocator, Record
from timeline.allocator.cluster import ClusterRedis
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.bench.suite import write_section
from timeline.model import Kind, Message, Timeline
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore
from topologies import ClusterServers

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- cluster:start -->", "<!-- cluster:end -->"
ONE, REPLICATED, BARE = "one Redis", "cluster, with replicas", "cluster, no replicas"


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=21)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()

    members = [f"member-{i}" for i in range(args.members)]
    timelines = [Timeline(Kind.HISTORY, "big"), *(Timeline(Kind.SYNC, m) for m in members)]
    message = Message({"text": "hi"}, '{"text":"hi"}')
    patient = Settings(redis_socket_timeout_ms=30_000)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        single = RedisServer(directory / "single").start()
        clusters = {
            REPLICATED: ClusterServers(directory / "replicated", replicas=1).start(),
            BARE: ClusterServers(directory / "bare", replicas=0).start(),
        }
        try:
            modes: dict[str, Allocator] = {
                ONE: Allocator(StandaloneRedis(connect_redis(single.url, patient)), "b:"),
                **{
                    name: Allocator(
                        ClusterRedis(c.url, patient.replace(redis_mode="cluster", redis_url=c.url)),
                        "b:",
                    )
                    for name, c in clusters.items()
                },
            }
            services = {
                name: TimelineService(
                    allocator,
                    SQLiteStore(directory / f"{n}.sqlite3"),
                    Policy(request_deadline_ms=600_000),
                )
                for n, (name, allocator) in enumerate(modes.items())
            }
            for name, allocator in modes.items():  # warm: counters exist, connections open
                allocator.seed(dict.fromkeys(timelines, 0))
                allocator.allocate(timelines)
                services[name].send_group("warm", members, [message])
            results: dict[str, dict[str, list[float]]] = {
                name: {"allocate": [], "allocate, with a record": [], "sendGroup": []}
                for name in modes
            }
            for i in range(args.samples):
                for name, allocator in modes.items():
                    record = Record("big", f"r{i}", "fp", ttl_ms=60_000)
                    row = results[name]
                    row["allocate"].append(timed(lambda a=allocator: a.allocate(timelines)))
                    row["allocate, with a record"].append(
                        timed(lambda a=allocator, r=record: a.allocate(timelines, 1, r, 1))
                    )
                    svc = services[name]
                    row["sendGroup"].append(
                        timed(
                            lambda s=svc, n=i: s.send_group(
                                "big", members, [message], client_msg_id=f"m{n}"
                            )
                        )
                    )
            described = modes[REPLICATED].describe()
        finally:
            for allocator in modes.values():
                allocator.close()
            for cluster in clusters.values():
                cluster.stop()
            single.stop()

    rows = []
    for what in ("allocate", "allocate, with a record", "sendGroup"):
        one = summary(results[ONE][what])
        cells = [f"{one[0]:.1f} ({one[1]:.1f})"]
        for name in (REPLICATED, BARE):
            many = summary(results[name][what])
            cells.append(f"{many[0]:.1f} ({many[1]:.1f}) | {many[0] / one[0]:.2f}x")
        rows.append(f"| {what} | {' | '.join(cells)} |")
    section = "\n".join(
        [
            START,
            f"## Redis Cluster: a sendGroup to {args.members:,} members",
            "",
            "Made by `tests/bench_cluster.py` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):",
            "one redis-server against two clusters of 3 masters (one with a replica per master,",
            "one without) on loopback, the same 2-core machine, samples alternating between the",
            "three; median (p95) of",
            f"{args.samples} samples each, in ms. `allocate` is the Allocator alone (the history",
            f"timeline and {args.members:,} members; on the cluster one script call per bucket",
            "touched, one pipeline per master, all masters at once); `sendGroup` is the whole",
            "request through TimelineService with a client_msg_id (allocation, the store's",
            "record of the message, one bulk write of the copies) on SQLite.",
            "",
            f"| | {ONE} | {REPLICATED} | ratio | {BARE} | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"The first cluster: {described}. Budget: the cluster at most 2x one Redis. The",
            "replicas run on the same 2 cores here, applying every increment again (scripts",
            "replicate their effects); in a deployment they run on machines of their own.",
            END,
        ]
    )
    print(section)
    print(json.dumps({k: {w: summary(v) for w, v in r.items()} for k, r in results.items()}))
    if not args.no_write:
        write(section)


def write(section: str) -> None:
    write_section(PAGE, START, END, section)


if __name__ == "__main__":
    main()
