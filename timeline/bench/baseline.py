"""The least Flask app that serves the same contract, for the throughput comparison.

No validation, no idempotency, no metrics, no logs: per send one EVALSHA (three counters)
and one SQLite transaction (one history row, two sync rows); per sync one SELECT and one GET.
It is what timeline is measured against, not something to deploy.

    TIMELINE_REDIS_URL=unix:///path/redis.sock BASELINE_SQLITE=/tmp/b.sqlite3 \\
        gunicorn -w 2 timeline.bench.baseline:app
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any

import redis
from flask import Flask, request

INCREMENT = "local r = {} for i = 1, #KEYS do r[i] = redis.call('INCR', KEYS[i]) end return r"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {table} (id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "message TEXT NOT NULL, UNIQUE (id, seq))"
)

app = Flask("baseline")
_redis = redis.Redis.from_url(os.environ.get("TIMELINE_REDIS_URL", "redis://127.0.0.1:6379/0"))
_increment = _redis.register_script(INCREMENT)
_path = os.environ.get("BASELINE_SQLITE", "var/baseline.sqlite3")
_local = threading.local()


def _db() -> sqlite3.Connection:
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(_path, isolation_level=None, timeout=5, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        for table in ("chat_sync", "chat_history"):
            conn.execute(SCHEMA.format(table=table))
        _local.conn = conn
    return conn


@app.post("/timeline/send")
def send() -> dict[str, Any]:
    body = json.loads(request.get_data())
    sender, receiver, message = body["from"], body["to"], body["message"]
    message = message if isinstance(message, str) else json.dumps(message)
    conversation = f"{min(sender, receiver)}:{max(sender, receiver)}"
    history, ours, theirs = _increment(
        keys=[f"base:h:{conversation}", f"base:s:{sender}", f"base:s:{receiver}"]
    )
    conn = _db()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO chat_history VALUES (?, ?, ?)", (conversation, history, message))
    conn.executemany(
        "INSERT INTO chat_sync VALUES (?, ?, ?)",
        [(sender, ours, message), (receiver, theirs, message)],
    )
    conn.execute("COMMIT")
    return {"sequence": str(theirs)}


@app.get("/timeline/sync")
def sync() -> dict[str, Any]:
    member = request.args["member"]
    last_read = int(request.args.get("last_read", 0))
    count = int(request.args.get("count", 100))
    rows = (
        _db()
        .execute(
            "SELECT seq, message FROM chat_sync WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (member, last_read, count),
        )
        .fetchall()
    )
    latest = int(_redis.get(f"base:s:{member}") or 0)
    return {
        "latestSeq": str(latest),
        "entrySetLastSeq": str(rows[-1][0] if rows else 0),
        "entrySet": [{"sequence": str(seq), "message": message} for seq, message in rows],
    }


@app.post("/timeline/sendGroup")
def send_group() -> dict[str, Any]:
    """Only so that the harness can prepare the sync scenario."""
    body = json.loads(request.get_data())
    members, messages = body["group_members"], body.get("messages") or [body["message"]]
    conn = _db()
    for message in messages:
        text = message if isinstance(message, str) else json.dumps(message)
        seqs = _increment(keys=[f"base:s:{m}" for m in members])
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO chat_sync VALUES (?, ?, ?)",
            list(zip(members, seqs, [text] * len(members), strict=True)),
        )
        conn.execute("COMMIT")
    return {"failedMembers": []}
