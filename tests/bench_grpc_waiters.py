"""gRPC calls held waiting for messages, against one timeline-grpc process (not collected by
pytest).

    .venv/bin/python tests/bench_grpc_waiters.py [--streams 10000] [--settle 8]

It starts `timeline-grpc` (the embedded default, a data directory of its own, a free port),
opens `--streams` Subscribe streams over 8 channels, each for a member of its own, waits
`--settle` seconds for them to park, and prints the process's resident memory and thread
count before and after (from psutil), then how long a send takes to reach its stream.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import free_port  # noqa: E402
from timeline.rpc.v1 import timeline_pb2 as pb  # noqa: E402
from timeline.rpc.v1 import timeline_pb2_grpc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--settle", type=float, default=8.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIMELINE_")}
        env |= {"TIMELINE_DATA_DIR": data, "TIMELINE_SQLITE_PATH": f"{data}/t.sqlite3"}
        with open(f"{data}/log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "timeline.rpc", "--bind", f"127.0.0.1:{port}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
            stubs = [timeline_pb2_grpc.TimelineStub(channel) for channel in channels]
            grpc.channel_ready_future(channels[0]).result(timeout=30)
            stubs[0].GetSyncMessage(pb.SyncMessageRequest(member="warm-up"), timeout=10)
            process = psutil.Process(server.pid)
            rss, threads = process.memory_info().rss, process.num_threads()
            streams = [
                stubs[i % 8].Subscribe(pb.SubscribeRequest(member=f"m{i}"))
                for i in range(options.streams)
            ]
            time.sleep(options.settle)
            held_rss, held_threads = process.memory_info().rss, process.num_threads()
            each = (held_rss - rss) / options.streams / 1024
            print(
                f"{options.streams:,} streams held: resident {rss / 1e6:.0f} -> "
                f"{held_rss / 1e6:.0f} MB ({each:.1f} KiB each); threads {threads} -> "
                f"{held_threads}"
            )
            started = time.perf_counter()
            stubs[1].Send(pb.SendMessageRequest(**{"from": "x", "to": "m7"}, message="{}"))
            page = next(streams[7])
            took = (time.perf_counter() - started) * 1000
            print(f"a send reached its stream in {took:.1f} ms (seq {page.entry_set[0].sequence})")
            for stream in streams:
                stream.cancel()
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
