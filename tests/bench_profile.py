"""Where a send and a sync spend their CPU, in timeline and in the least Flask app, under
load (not collected by pytest); writes its section of docs/benchmarks.md.

    .venv/bin/python tests/bench_profile.py [--seconds 10] [--no-write]

Needs wrk and py-spy (`apt-get install wrk`, `.venv/bin/pip install py-spy`). Starts each
server as `make bench` does (gunicorn, 2 workers, timeline's worker class), drives it with
wrk (2 threads, 8 keep-alive connections, timeline/bench/wrk/*.lua), and meanwhile samples
both workers with `py-spy record --gil` (only the thread holding the GIL: Python's own CPU,
not time waiting on Redis or SQLite, which run without it). Each sample is put in the
category of the innermost frame that names one; the table gives microseconds of GIL time per
request (samples x sample period / requests). The least app's SQLite and Redis calls are
made from its handlers: their Python side counts under "handlers" there.

The section sits between the markers below in docs/benchmarks.md; `make bench` keeps it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timeline.bench.suite import ROOT as SUITE_ROOT  # noqa: E402
from timeline.bench.suite import Server, write_section, wrk_rate  # noqa: E402
from timeline.embedded import ensure_redis  # noqa: E402

PAGE = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- profile:start -->", "<!-- profile:end -->"
RATE = 200  # py-spy samples per second
CATEGORIES = (
    ("Redis client (the allocation's round trip)", ("redis/", "hiredis", "timeline/allocator/")),
    ("SQLite store", ("timeline/store/",)),
    ("access log line", ("timeline/logs.py", "logging/")),
    ("metrics", ("timeline/metrics.py", "prometheus_client")),
    ("validation, JSON", ("timeline/validation.py", "orjson", "json/")),
    ("Flask, werkzeug", ("flask/", "werkzeug/")),
    ("handlers, request ids, envelope", ("timeline/api.py", "timeline/ops.py", "baseline.py")),
    ("service: plans, idempotency, repairs", ("timeline/service/", "timeline/model.py")),
    (
        "HTTP front: worker, gunicorn's parser, threads",
        ("timeline/worker.py", "gunicorn/", "selectors", "concurrent/", "threading", "socket"),
    ),
)


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in CATEGORIES:
            if any(key in frame for key in keys):
                return name
    return "other"


def profile(server: Server, scenario: str, seconds: int, work: Path) -> tuple[Counter[str], float]:
    """Samples by category, and the requests/s wrk measured meanwhile."""
    children = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outputs = [work / f"{server.name}-{scenario}-{pid}.txt" for pid in children]
    record = [spy, "record", "-d", str(seconds - 2), "-r", str(RATE), "-f", "raw", "--gil"]
    spies = [
        subprocess.Popen(
            [*record, "--nonblocking", "-p", pid, "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, out in zip(children, outputs, strict=True)
    ]
    rate: list[float] = []
    driver = threading.Thread(
        target=lambda: rate.append(wrk_rate(server.url, scenario, seconds, 8))
    )
    driver.start()
    for process in spies:
        process.wait()
    driver.join()
    counts: Counter[str] = Counter()
    for out in outputs:
        for line in out.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            counts[category(stack.split(";"))] += int(samples)
    return counts, rate[0] * (seconds - 2)  # requests during the sampled seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="timeline-profile-"))
    results: dict[tuple[str, str], tuple[Counter[str], float]] = {}
    try:
        for name in ("timeline", "baseline"):
            if name == "timeline":
                env = {"WEB_CONCURRENCY": "2", "TIMELINE_DATA_DIR": str(work / "ours")}
                command = ["-c", str(SUITE_ROOT / "gunicorn.conf.py"), "app:app"]
                server = Server(name, command, env, SUITE_ROOT, work)
            else:
                url, _ = ensure_redis(str(work / "redis"))
                env = {"TIMELINE_REDIS_URL": url, "BASELINE_SQLITE": str(work / "b.sqlite3")}
                command = ["--workers", "2", "--worker-class", "timeline.worker.TimelineWorker"]
                command += ["--threads", "4", "--bind", "127.0.0.1:{port}"]
                command += ["--control-socket", str(work / "b.ctl"), "timeline.bench.baseline:app"]
                server = Server(name, command, env, work, work)
            try:
                for scenario in ("send", "sync"):
                    if scenario == "sync":
                        wrk_rate(server.url, "send", 2, 8)  # the timelines sync reads
                    results[(name, scenario)] = profile(server, scenario, args.seconds, work)
                    print(name, scenario, f"{results[(name, scenario)][1]:.0f} requests")
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(results, args.seconds)
    print(section)
    if not args.no_write:
        write(section)


def render(results: dict[tuple[str, str], tuple[Counter[str], float]], seconds: int) -> str:
    columns = [
        ("timeline", "send"),
        ("baseline", "send"),
        ("timeline", "sync"),
        ("baseline", "sync"),
    ]
    label = {"timeline": "timeline", "baseline": "least app"}

    def per_request(counts: Counter[str], requests: float, key: str | None) -> str:
        samples = sum(counts.values()) if key is None else counts[key]
        return f"{samples * 1_000_000 / RATE / requests:,.0f}"

    lines = [
        START,
        "## Where the CPU goes: send and sync, profiled",
        "",
        "`tests/bench_profile.py`: wrk (8 keep-alive connections) on each server while "
        f"`py-spy record --gil` samples both gunicorn workers for {seconds - 2} s; microseconds "
        "of Python (GIL-held) time per request, by the innermost frame's category. Time in "
        "Redis, in SQLite's C code and in system calls without the GIL is not in it.",
        "",
        "| where | " + " | ".join(f"{label[n]}, {s}" for n, s in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name in [n for n, _ in CATEGORIES] + ["other"]:
        cells = [per_request(*results[c], name) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [per_request(*results[c], None) for c in columns]
    lines.append("| **total** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    lines += ["", END]
    return "\n".join(lines)


def write(section: str) -> None:
    write_section(PAGE, START, END, section)


if __name__ == "__main__":
    main()
