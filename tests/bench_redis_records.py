"""Redis memory per idempotent send, by hand: `.venv/bin/python tests/bench_redis_records.py
[N]` sends N idempotent one-to-one messages (default 10,000) through the service in process
(a redis-server of the suite's kind, SQLite in a temporary directory) and prints what Redis's
`used_memory` and key count grew by: the README's "Memory" figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import RedisServer
from timeline.allocator import Allocator
from timeline.allocator.standalone import StandaloneRedis, connect_redis
from timeline.model import Message
from timeline.service import Policy, TimelineService
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore

PAIRS = 200  # conversations the sends go round: their counters exist before the count


def message(i: int) -> Message:
    return Message({"t": i}, json.dumps({"t": i}))


def main() -> None:
    sends = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    tmp = Path(tempfile.mkdtemp())
    server = RedisServer(tmp / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        allocator = Allocator(StandaloneRedis(connect_redis(server.url, Settings())), "tl:")
        svc = TimelineService(allocator, SQLiteStore(tmp / "t.db"), Policy())
        for i in range(PAIRS):
            svc.send(f"u{i}", f"v{i}", [message(i)])
        memory, keys = client.info("memory")["used_memory"], client.dbsize()
        for i in range(sends):
            svc.send(f"u{i % PAIRS}", f"v{i % PAIRS}", [message(i)], f"c{i}")
        grown = client.info("memory")["used_memory"] - memory
        print(
            f"{sends:,} idempotent sends: +{grown:,} bytes of used_memory, "
            f"+{client.dbsize() - keys:,} keys, {grown / sends:.0f} bytes each"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
