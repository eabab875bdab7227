"""What SQLite's group commit saves per send (not collected by pytest).

    .venv/bin/python tests/bench_group_commit.py [--sends 2000] [--warm 20000]

Sends' copies (a history copy, two sync copies, the store's record of the message) are
written to a SQLite store already holding `--warm` sends, in groups of 1 to 4 through
`GroupCommit.write_batch` (timeline/store/sqlite/group.py), the code a worker's threads run
when their writes meet (`GroupCommit.write`). For each group size it prints the WAL pages
written per send (counted by `PRAGMA wal_checkpoint`, with the store's own checkpoints held
off) and the CPU time per send of this process (Python and SQLite). A group of 1 is a
transaction per write, as a write alone is stored. One process and thread: what it measures
is the commit's cost, not the contention that grouping also removes.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timeline.model import Copies, Message
from timeline.store import Claim
from timeline.store.sqlite import SQLiteStore
from timeline.store.sqlite.connections import Checkpointer
from timeline.store.sqlite.group import GroupCommit, Queued
from timeline.store.sqlite.writing import Part

USERS = 30


class Sends:
    """One-to-one sends among USERS users, each with the next sequences of its timelines."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.n = 0
        self.rng = random.Random(7)

    def _next(self, key: str) -> int:
        self.seqs[key] = self.seqs.get(key, 0) + 1
        return self.seqs[key]

    def job(self) -> Queued:
        self.n += 1
        a = self.rng.randrange(USERS)
        b = (a + 1 + self.rng.randrange(USERS - 1)) % USERS
        conversation = f"u{min(a, b)}:u{max(a, b)}"
        message = Message({"id": f"m{self.n}"}, orjson.dumps({"id": f"m{self.n}"}).decode())
        mid = hashlib.sha256(f"{conversation}/{self.n}".encode()).hexdigest()[:32]
        now = int(time.time() * 1000)
        history = Copies([conversation], [self._next(conversation)], [message], now, mid)
        ids = [f"u{a}", f"u{b}"]
        sync = Copies(ids, [self._next(i) for i in ids], [message], now, mid)
        lasts = (history.firsts[0], *sync.firsts)
        claim = Claim(mid, "f" * 16, lasts, now, now + 86_400_000)
        return Queued(Part(history, sync, claim, now))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=20_000)
    args = parser.parse_args()
    Checkpointer.start = lambda self: None  # type: ignore[method-assign]
    path = Path(tempfile.mkdtemp(prefix="group-commit-")) / "timeline.sqlite3"
    store = SQLiteStore(path)
    group = store._group
    assert isinstance(group, GroupCommit)
    sends = Sends()
    for _ in range(args.warm):
        group.write_batch([sends.job()])
    store._connections.connection().execute("PRAGMA wal_autocheckpoint = 0")
    wal = sqlite3.connect(path)
    print("| sends per transaction | WAL pages per send | CPU per send (us) |")
    print("| ---: | ---: | ---: |")
    for size in (1, 2, 3, 4, 1):
        wal.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        batches = [[sends.job() for _ in range(size)] for _ in range(args.sends // size)]
        started = time.process_time()
        for batch in batches:
            group.write_batch(batch)
            assert all(job.result is not None and not job.result.sync_taken for job in batch)
        cpu = time.process_time() - started
        frames = wal.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        sent = size * len(batches)
        print(f"| {size} | {frames / sent:.2f} | {cpu / sent * 1e6:.0f} |")
    wal.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
