"""What the store's record of an idempotent message costs (not collected by pytest).

    .venv/bin/python tests/bench_claims.py [--sends 2000] [--rounds 3] [--members 50]

One-to-one sends and sendGroups with a client_msg_id through TimelineService on SQLite (a
redis-server of its own on a free port), with the store's record (claim(): one more
transaction before the copies are written) and without it (claim() answering at once, as
before the record existed). Rounds alternate A B A B; each prints the median and p95 per
request in ms. MongoDB's cost (one more insert_one, majority-acknowledged: a round trip to
the primary and the replication to a majority) can only be measured against a real server,
which these machines do not have.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import RedisServer
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.model import Message
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store import Claim
from timeline.store.sqlite import SQLiteStore


class WithoutRecord:
    """The store, its claim() answering at once: the cost of everything but the record."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def claim(self, claim: Claim, now_ms: int) -> Claim:
        return claim


def run(svc: TimelineService, label: str, sends: int, members: list[str], round_: int) -> None:
    message = [Message({"text": "hi"}, '{"text":"hi"}')]
    for what in ("send", "sendGroup"):
        times = []
        for n in range(sends if what == "send" else sends // 4):
            key = f"{label}-{round_}-{n}"
            start = time.perf_counter()
            if what == "send":
                svc.send(f"s{n % 50}", f"r{n % 97}", message, client_msg_id=key)
            else:
                svc.send_group(f"g{n % 5}", members, message, client_msg_id=key)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        p95 = times[int(len(times) * 0.95)]
        print(
            f"  round {round_} {label:15s} {what:9s} median {statistics.median(times):6.3f} ms"
            f"   p95 {p95:6.3f} ms   ({len(times)} requests)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=50)
    args = parser.parse_args()
    members = [f"m{i}" for i in range(args.members)]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            allocator = Allocator(StandaloneRedis(connect_redis(server.url, Settings())), "b:")
            store = SQLiteStore(Path(tmp) / "store.sqlite3")
            services = {
                "with record": TimelineService(allocator, store, Policy()),
                "without record": TimelineService(allocator, WithoutRecord(store), Policy()),
            }
            for label, svc in services.items():  # warm: counters and tables exist
                run(svc, label, 50, members, 0)
            print("measured:")
            for round_ in range(1, args.rounds + 1):
                for label, svc in services.items():
                    run(svc, label, args.sends, members, round_)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
