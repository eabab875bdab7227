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
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

if "BENCH_AB_SERVING" in os.environ:  # in a gunicorn worker: give the app
    if os.environ.get("BENCH_AB_GROUP_COMMIT") == "off":
        import functools

        from timeline.store import sqlite

        sqlite.SQLiteStore = functools.partial(sqlite.SQLiteStore, group_commit=False)
    from app import app  # noqa: F401


def serve(name: str, root: Path, work: Path, env: dict[str, str]) -> Any:
    """gunicorn serving the checkout at `root` with its gunicorn.conf.py (suite.Server: it
    starts it and waits until it answers), its timeline package first on the path."""
    from timeline.bench.suite import Server

    data = work / name
    env = env | {
        "BENCH_AB_SERVING": "1",
        "PYTHONPATH": f"{root}{os.pathsep}{HERE}",  # its timeline, then this module
        "WEB_CONCURRENCY": "2",
        "TIMELINE_DATA_DIR": str(data),
        "TIMELINE_SQLITE_PATH": str(data / "timeline.sqlite3"),
        "TIMELINE_GRPC_BIND": "off",
    }
    return Server(name, ["-c", str(root / "gunicorn.conf.py"), "bench_ab:app"], env, root, work)


def worker_cpu_s(server: Any) -> float:
    """CPU time (user and system) of the server's HTTP workers so far."""
    from timeline.bench.suite import cpu_seconds

    return float(cpu_seconds(server.children()[0]))


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
    servers: list[Any] = []
    rates: dict[str, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in scenarios}
    cpu_us: dict[str, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in scenarios}
    try:
        for name, root, group_commit in (
            ("A", args.a_root, args.a_group_commit),
            ("B", args.b_root, args.b_group_commit),
        ):
            env = {"BENCH_AB_GROUP_COMMIT": group_commit}
            servers.append(serve(name, root.resolve(), work, env))
            print(f"{name}: {root.resolve()}, group commit {group_commit}", flush=True)
        for server in servers:  # warm: tables, pages, the timelines sync reads
            for scenario in scenarios:
                wrk_rate(server.url, scenario, 3, args.connections)
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]
            for scenario in scenarios:
                for server in order:
                    cpu = worker_cpu_s(server)
                    rate = wrk_rate(server.url, scenario, args.seconds, args.connections)
                    cpu = worker_cpu_s(server) - cpu
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
