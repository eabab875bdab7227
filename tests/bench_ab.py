"""Two services side by side under wrk, rounds alternating (not collected by pytest).

    .venv/bin/python tests/bench_ab.py --b-group-commit off       # SQLite's group commit
    .venv/bin/python tests/bench_ab.py --b-root ../other-checkout  # this checkout against another
        [--rounds 6] [--seconds 10] [--connections 8] [--scenarios send,sync,sendGroup]

A and B each run as `make bench` runs timeline (gunicorn.conf.py, 2 workers, the embedded
redis-server and SQLite in a directory of their own), at the same time, from the checkouts
given (A: this one unless --a-root; the timeline package is taken from the root given, with
this interpreter). Each round runs every scenario's wrk script (timeline/bench/wrk/*.lua, 2
threads, keep-alive connections) on both, A then B, the next round B then A, so that the
machine's noise (2 cores, shared) falls on both alike. Prints each round, then the median
(lowest-highest) of each and of B/A per round: requests/s, and the CPU time (user and
system) its gunicorn workers spent per request, which other work on the machine moves
less than it moves requests/s.

Served as `bench_ab:app`: this module, imported by gunicorn's workers, gives the app of
`app.py`; BENCH_AB_GROUP_COMMIT=off makes its SQLiteStore(group_commit=False).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

if "BENCH_AB_SERVING" in os.environ:  # in a gunicorn worker: give the app
    if os.environ.get("BENCH_AB_GROUP_COMMIT") == "off":
        import functools

        from timeline.store import sqlite

        sqlite.SQLiteStore = functools.partial(sqlite.SQLiteStore, group_commit=False)
    from app import app  # noqa: F401


class Server:
    """gunicorn serving the checkout at `root` with its gunicorn.conf.py."""

    def __init__(self, name: str, root: Path, env: dict[str, str], work: Path) -> None:
        from timeline.bench.suite import free_port

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = work / name
        environment = os.environ | env
        environment |= {
            "BENCH_AB_SERVING": "1",
            "PYTHONPATH": f"{root}{os.pathsep}{HERE}",  # its timeline, then this module
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "2",
            "TIMELINE_DATA_DIR": str(data),
            "TIMELINE_SQLITE_PATH": str(data / "timeline.sqlite3"),
        }
        environment.pop("TIMELINE_GRPC_BIND", None)
        self.log = work / f"{name}.log"
        with self.log.open("wb") as log:
            command = ["-m", "gunicorn", "-c", str(root / "gunicorn.conf.py"), "bench_ab:app"]
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=root,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/timeline/sync?member=probe", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def cpu_s(self) -> float:
        """CPU time (user and system) of its workers so far."""
        import psutil

        total = 0.0
        for worker in psutil.Process(self.process.pid).children():
            times = worker.cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    middle, low, high = statistics.median(values), min(values), max(values)
    return f"{middle:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from timeline.bench.suite import wrk_rate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-root", type=Path, default=ROOT)
    parser.add_argument("--b-root", type=Path, default=ROOT)
    parser.add_argument("--a-group-commit", choices=("on", "off"), default="on")
    parser.add_argument("--b-group-commit", choices=("on", "off"), default="on")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--scenarios", default="send,sync,sendGroup")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    scenarios = args.scenarios.split(",")
    work = Path(tempfile.mkdtemp(prefix="timeline-ab-"))
    servers: list[Server] = []
    rates: dict[str, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in scenarios}
    cpu_us: dict[str, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in scenarios}
    try:
        for name, root, group_commit in (
            ("A", args.a_root, args.a_group_commit),
            ("B", args.b_root, args.b_group_commit),
        ):
            env = {"BENCH_AB_GROUP_COMMIT": group_commit}
            servers.append(Server(name, root.resolve(), env, work))
            print(f"{name}: {root.resolve()}, group commit {group_commit}", flush=True)
        for server in servers:  # warm: tables, pages, the timelines sync reads
            for scenario in scenarios:
                wrk_rate(server.url, scenario, 3, args.connections)
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]
            for scenario in scenarios:
                for server in order:
                    cpu = server.cpu_s()
                    rate = wrk_rate(server.url, scenario, args.seconds, args.connections)
                    cpu = server.cpu_s() - cpu
                    rates[scenario][server.name].append(rate)
                    cpu_us[scenario][server.name].append(cpu / (rate * args.seconds) * 1e6)
                a, b = rates[scenario]["A"][-1], rates[scenario]["B"][-1]
                ca, cb = cpu_us[scenario]["A"][-1], cpu_us[scenario]["B"][-1]
                turn = "".join(s.name for s in order)
                print(
                    f"round {i + 1} ({turn}) {scenario}: A {a:,.0f}/s {ca:,.0f} us, "
                    f"B {b:,.0f}/s {cb:,.0f} us",
                    flush=True,
                )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for title, figures in (("requests/s", rates), ("worker CPU us per request", cpu_us)):
        print(f"\n| scenario | A, {title} | B, {title} | B/A per round |")
        print("| --- | ---: | ---: | ---: |")
        for scenario, found in figures.items():
            ratios = [b / a for a, b in zip(found["A"], found["B"], strict=True)]
            row = [scenario, spread(found["A"]), spread(found["B"]), spread(ratios, ".2f")]
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
