"""The SQLite store: the embedded default, a real database behind the same contract as MongoDB.

store.py        SQLiteStore: the Store protocol's calls, each a query or transactions
writing.py      a write's part (one transaction's worth): its record, history and sync
                copies, refused together when a key is taken or a floor is in the way
group.py        group commit: the small writes of a process's threads in one transaction
connections.py  a connection per thread and process, the writer lock, the wait for
                SQLite's lock (the -wait file), reads that wait out a busy moment, the
                checkpointer
schema.py       the tables, the SQL text run on them, the migration of earlier files
"""

from timeline.store.sqlite.schema import IDEMPOTENCY
from timeline.store.sqlite.store import WRITE_CHUNK_BYTES, WRITE_CHUNK_ROWS, SQLiteStore

__all__ = ["IDEMPOTENCY", "WRITE_CHUNK_BYTES", "WRITE_CHUNK_ROWS", "SQLiteStore"]
