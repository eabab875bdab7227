"""The raw floor of a fan-out: what the drivers alone take to do a 10,000-member sendGroup's
work, with none of the service around it.

One EVALSHA of the least script (INCR each of 10,001 counters) and one SQLite transaction
inserting 10,001 rows into a table of the service's schema, on the same redis-server and with
the same SQLite settings as the service.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from itertools import repeat
from pathlib import Path

import redis

INCREMENT = "local r = {} for i = 1, #KEYS do r[i] = redis.call('INCR', KEYS[i]) end return r"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS floor_sync (id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "message TEXT NOT NULL, created_at INTEGER NOT NULL, mid TEXT NOT NULL, UNIQUE (id, seq))"
)


class Floor:
    """Times the fan-out floor; `once()` is one sample in milliseconds."""

    def __init__(self, redis_url: str, sqlite_path: Path, members: int) -> None:
        self._redis = redis.Redis.from_url(redis_url)
        self._script = self._redis.register_script(INCREMENT)
        self._keys = ["floor:seq:history:group"] + [f"floor:seq:sync:m{i}" for i in range(members)]
        self._ids = ["group"] + [f"m{i}" for i in range(members)]
        self._db = sqlite3.connect(sqlite_path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def once(self) -> float:
        started = time.perf_counter()
        seqs = self._script(keys=self._keys)
        rows = zip(
            self._ids, seqs, repeat('{"id":"x"}'), repeat(int(time.time() * 1000)), repeat("m")
        )
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT INTO floor_sync VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")
        return (time.perf_counter() - started) * 1000

    def median(self, samples: int) -> float:
        return statistics.median(self.once() for _ in range(samples))

    def close(self) -> None:
        self._db.close()
        self._redis.close()
