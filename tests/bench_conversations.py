"""What the conversation list costs (not collected by pytest): a member with N conversations,
its first page of 20, timed in-process through the whole WSGI app (validation, service,
store, JSON), on the embedded default's store (SQLite) and a redis-server of its own.

    .venv/bin/python tests/bench_conversations.py [--conversations 1000] [--pages 500]

Prints the median, p99 and max of one page's time, and of one POST /timeline/read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from support import RedisServer  # noqa: E402
from timeline.factory import close_app, create_app  # noqa: E402
from timeline.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    server = RedisServer(work / "redis").start()
    settings = Settings(
        redis_url=server.url,
        sqlite_path=str(work / "timeline.sqlite3"),
        data_dir=str(work / "var"),
    ).validate()
    app = create_app(settings)
    client = app.test_client()
    try:
        half = args.conversations // 2
        for n in range(half):  # one-to-one conversations, some unread
            body = {"from": f"friend{n}", "to": "m", "message": {"n": n}}
            assert client.post("/timeline/send", data=orjson.dumps(body)).status_code == 200
        for n in range(args.conversations - half):  # groups of 50
            members = ["m", *(f"g{n}-{k}" for k in range(49))]
            body = {"group_name": f"group{n}", "group_members": members, "message": {"n": n}}
            assert client.post("/timeline/sendGroup", data=orjson.dumps(body)).status_code == 200
        page = client.get("/timeline/conversations?member=m&count=20").get_json()
        assert len(page["conversations"]) == 20
        assert page["next"]
        times = []
        for _ in range(args.pages):
            started = time.perf_counter()
            reply = client.get("/timeline/conversations?member=m&count=20")
            times.append(time.perf_counter() - started)
            assert reply.status_code == 200
        reads = []
        for n in range(args.pages):
            body = {"member": "m", "type": "single", "conversation": f"friend{n % half}", "seq": 1}
            started = time.perf_counter()
            reply = client.post("/timeline/read", data=orjson.dumps(body))
            reads.append(time.perf_counter() - started)
            assert reply.status_code == 200
        for name, values in (("first page of 20", times), ("POST /timeline/read", reads)):
            values.sort()
            print(
                f"{name:22} {args.conversations} conversations: "
                f"median {statistics.median(values) * 1000:.2f} ms, "
                f"p99 {values[int(len(values) * 0.99) - 1] * 1000:.2f} ms, "
                f"max {values[-1] * 1000:.2f} ms ({len(values)} requests)"
            )
    finally:
        close_app(app)
        server.stop()


if __name__ == "__main__":
    main()
