"""Idle connections against real clients (not collected by pytest).

    .venv/bin/python tests/bench_idle_flood.py [--url http://127.0.0.1:8000] [--idle 4000]
        [--seconds 20] [--slow-readers 0] [--page-bytes 65536]

Against a running service (`make run`, or `PORT=8123 make run` beside another), it holds
`--idle` TCP connections that send nothing, reopening each one as soon as the service closes
it, as one unauthenticated client can. Meanwhile a normal client sends one-to-one messages,
one at a time on a fresh connection each (what a client behind the flood meets: the accept
queue), and probes `/healthz` with a 2 s timeout. With `--slow-readers N`, N more clients each
ask for the largest sync page (filled first with 1,000 messages of `--page-bytes`, a JSON
object of `"`, which the reply's JSON escaping doubles) and never read the reply.

It prints the sends' latency percentiles, how many failed, the /healthz probes over 2 s, and
the service's workers' resident memory (from /proc, the processes listening on the port's
parent) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Flood:
    """`count` silent connections, each reopened as soon as it is closed."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.address = (host, port)
        self.count = count
        self.stopping = threading.Event()
        self.reopened = 0
        self.selector = selectors.DefaultSelector()

    def _open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        self.selector.register(sock, selectors.EVENT_READ)

    def run(self) -> None:
        for _ in range(self.count):
            self._open()
        while not self.stopping.is_set():
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the service: open another
                    self.selector.unregister(sock)
                    sock.close()
                    self.reopened += 1
                    self._open()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def slow_reader(host: str, port: int, member: str, held: list[socket.socket]) -> None:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        f"GET /timeline/sync?member={member}&count=1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    held.append(sock)  # never read


def rss_of_workers(port: int) -> list[int]:
    """Resident KiB of the processes holding a listening socket on the port."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            inodes.add(fields[9])
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            status = Path(f"/proc/{pid}/status").read_text()
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    found.append(int(line.split()[1]))
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--idle", type=int, default=4000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--slow-readers", type=int, default=0)
    parser.add_argument("--page-bytes", type=int, default=65536)
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    run = os.urandom(4).hex()

    held: list[socket.socket] = []
    if args.slow_readers:
        page_member = f"big{run}"
        # A JSON object of quotes: each is 2 bytes escaped in the message, 4 in the reply.
        message = json.dumps({"t": '"' * ((args.page_bytes - 9) // 2)})
        for i in range(1000):
            body = json.dumps({"from": f"s{run}", "to": page_member, "message": message}).encode()
            urllib.request.urlopen(f"{args.url}/timeline/send", body, timeout=30).read()
            if i % 200 == 0:
                print(f"filling the page: {i}/1000", file=sys.stderr)
        for _ in range(args.slow_readers):
            slow_reader(host, port, page_member, held)

    flood = Flood(host, port, args.idle)
    thread = threading.Thread(target=flood.run, daemon=True)
    thread.start()
    time.sleep(1.0)  # the flood is in place

    latencies: list[float] = []
    failed = 0
    slow_health = 0
    health_probes = 0
    deadline = time.monotonic() + args.seconds
    n = 0
    last_health = 0.0
    while time.monotonic() < deadline:
        n += 1
        body = json.dumps({"from": f"a{run}", "to": f"b{run}", "message": json.dumps({"n": n})})
        started = time.monotonic()
        try:
            urllib.request.urlopen(f"{args.url}/timeline/send", body.encode(), timeout=30).read()
            latencies.append(time.monotonic() - started)
        except (urllib.error.URLError, OSError):
            failed += 1
        if time.monotonic() - last_health >= 1.0:
            last_health = time.monotonic()
            health_probes += 1
            try:
                urllib.request.urlopen(f"{args.url}/healthz", timeout=2).read()
            except (urllib.error.URLError, OSError):
                slow_health += 1
    rss = rss_of_workers(port)
    flood.stopping.set()
    thread.join(5)
    for sock in held:
        sock.close()
    print(
        f"idle={args.idle} slow_readers={args.slow_readers}: sends={len(latencies)} "
        f"failed={failed} p50={percentile(latencies, 0.5) * 1000:.0f} ms "
        f"p99={percentile(latencies, 0.99) * 1000:.0f} ms "
        f"max={max(latencies, default=0) * 1000:.0f} ms "
        f"mean={statistics.fmean(latencies) * 1000 if latencies else float('nan'):.0f} ms; "
        f"/healthz over 2 s: {slow_health} of {health_probes}; "
        f"idle connections reopened: {flood.reopened}; "
        f"RSS of the listening processes (MiB): {[round(kib / 1024) for kib in rss]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
