"""`make bench`: the standard scenarios, the fan-out against its floor, and throughput against
the least Flask app, all in one run on this machine; written to docs/benchmarks.md.

    python -m timeline.bench.suite [--out docs/benchmarks.md] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import gunicorn

from timeline import __version__
from timeline.bench.cli import plot
from timeline.bench.floor import Floor
from timeline.bench.grpc_load import run_sends
from timeline.bench.harness import Client, Result, Scenario, run, verify
from timeline.embedded import redis_server_binary

ROOT = Path(__file__).resolve().parent.parent.parent
FAN_OUT = 10_000
BUDGET_MS = 100.0
FLOOR_RATIO = 1.3
#: The gRPC send load: processes x channels (connections) x calls in flight on each.
GRPC_LOAD = (2, 8, 2)


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A gunicorn serving either timeline (its own gunicorn.conf.py) or the baseline."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], cwd: Path, logs: Path
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        environment = os.environ | env | {"PORT": str(self.port), "HOST": "127.0.0.1"}
        environment["PYTHONPATH"] = env.get("PYTHONPATH", str(ROOT))
        args = [arg.replace("{port}", str(self.port)) for arg in args]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", *args],
                cwd=cwd,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = self.url + "/timeline/sync?member=probe"
                with urllib.request.urlopen(probe, timeout=2):  # noqa: S310 - our own http URL
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)

    def children(self) -> tuple[list[int], list[int]]:
        """The master's HTTP workers and its timeline-grpc processes (pids)."""
        workers: list[int] = []
        grpc: list[int] = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != self.process.pid:
                    continue
                command = (stat.parent / "cmdline").read_bytes()
                (grpc if b"timeline.rpc" in command else workers).append(int(stat.parent.name))
        return workers, grpc


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) these processes have used so far (Linux's /proc)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    redis_version = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()[2:3]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis": (redis_version[0].removeprefix("v=") if redis_version else "unknown"),
        "sqlite": sqlite3.sqlite_version,
        "gunicorn": f"{gunicorn.__version__}, 2 workers of timeline.worker.TimelineWorker",
        "grpcio": metadata.version("grpcio"),
        "timeline": __version__,
    }


def scenario_run(
    url: str, name: str, seconds: float, concurrency: int, group_size: int = 10
) -> tuple[Result, Scenario]:
    scenario = Scenario(name, group_size)
    result = run(url, scenario, concurrency, duration=seconds)
    return result, scenario


def fan_out(url: str, floor: Floor, samples: int) -> dict[str, Any]:
    """Ours over HTTP and the floor, interleaved so that both see the same machine."""
    client = Client(url)
    members = [f"fan-m{i}" for i in range(FAN_OUT)]
    body = {"group_name": "fan-group", "group_members": members, "message": {"id": "x"}}
    for _ in range(3):  # warm both: counters exist, pages cached
        client.request("POST", "/timeline/sendGroup", body)
        floor.once()
    ours, raw = [], []
    for _ in range(samples):
        started = time.perf_counter()
        status, _ = client.request("POST", "/timeline/sendGroup", body)
        if status != 200:
            raise RuntimeError(f"fan-out request failed: {status}")
        ours.append((time.perf_counter() - started) * 1000)
        raw.append(floor.once())
    client.close()
    return {
        "ours": statistics.median(ours),
        "ours_p95": sorted(ours)[int(0.95 * (len(ours) - 1))],
        "floor": statistics.median(raw),
        "samples": samples,
    }


WRK_SCRIPTS = Path(__file__).resolve().parent / "wrk"


def wrk_rate(url: str, name: str, seconds: float, connections: int, close: bool = False) -> float:
    """Requests/s that wrk (C, 2 threads) measures for the scenario's script; keep-alive
    connections, or with `close` one connection per request."""
    exe = shutil.which("wrk")
    assert exe is not None
    command = [exe, "-t2", f"-c{connections}", f"-d{max(1, int(seconds))}s"]
    if close:
        command += ["-H", "Connection: close"]
    command += ["-s", str(WRK_SCRIPTS / f"{name}.lua"), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if bad:
        raise RuntimeError(f"wrk {name} at {url}: {bad.group(1)} replies were not 2xx")
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"wrk {name} at {url} printed no rate:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


#: The group of the sendGroup scenario, in timeline-bench and in wrk/sendGroup.lua alike.
GROUP_SIZE = 50


def wrk_latency_ms(url: str, name: str, seconds: float) -> float:
    """The median latency (ms) wrk measures for the scenario's script on one connection."""
    exe = shutil.which("wrk")
    assert exe is not None
    command = [exe, "-t1", "-c1", f"-d{max(1, int(seconds))}s", "--latency"]
    command += ["-s", str(WRK_SCRIPTS / f"{name}.lua"), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True)
    completed = re.search(r"(\d+) requests in", done.stdout)
    if completed is None or int(completed.group(1)) == 0:
        raise RuntimeError(f"wrk {name} at {url}: no request completed\n{done.stdout}")
    found = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", done.stdout, re.M)
    if found is None:
        raise RuntimeError(f"wrk {name} at {url} printed no median:\n{done.stdout}{done.stderr}")
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def throughput(
    ours: Server, baseline: Server, name: str, seconds: float, rounds: int, concurrency: int
) -> list[dict[str, float]]:
    """A B A B: each round runs timeline, then the baseline (the next round the other way
    round), the same scenario and load; with timeline-bench, and with wrk too where it is
    installed."""
    pairs = []
    for i in range(rounds):
        pair = {}
        for server in (ours, baseline) if i % 2 == 0 else (baseline, ours):
            result = run(server.url, Scenario(name, GROUP_SIZE), concurrency, duration=seconds)
            errors = sum(result.errors.values())
            if errors:
                raise RuntimeError(f"{server.name} {name}: {errors} errors")
            pair[server.name] = result.requests / result.duration
            if shutil.which("wrk"):
                pair[f"{server.name} wrk"] = wrk_rate(server.url, name, seconds, concurrency)
                pair[f"{server.name} wrk close"] = wrk_rate(
                    server.url, name, seconds / 2, concurrency, close=True
                )
        pairs.append(pair)
        say(
            f"  {name}: timeline {pair['timeline']:.0f}/s, baseline {pair['baseline']:.0f}/s"
            + (
                f"; wrk: timeline {pair['timeline wrk']:.0f}/s, baseline "
                f"{pair['baseline wrk']:.0f}/s"
                if "timeline wrk" in pair
                else ""
            )
        )
    return pairs


def grpc_beside_http(
    ours: Server, target: str, seconds: float, rounds: int, concurrency: int
) -> list[dict[str, float]]:
    """Send over HTTP and over gRPC on the same deployment, alternating (H G, G H, ...):
    requests/s, and the CPU the processes serving each transport used per send. HTTP is
    driven by wrk where it is installed (else timeline-bench), gRPC by run_sends."""
    processes, channels, in_flight = GRPC_LOAD
    rounds_out = []
    for i in range(rounds):
        pair: dict[str, float] = {}
        for transport in ("http", "grpc") if i % 2 == 0 else ("grpc", "http"):
            workers, servers = ours.children()
            pids = servers if transport == "grpc" else workers
            if transport == "grpc":
                result = run_sends(
                    target,
                    seconds,
                    processes=processes,
                    channels=channels,
                    in_flight=in_flight,
                    meter=partial(cpu_seconds, servers),
                )
                if result.errors:
                    raise RuntimeError(f"gRPC send: {dict(result.errors)}")
                requests, rate, used, wall = (
                    result.requests,
                    result.rate,
                    result.metered,
                    result.duration,
                )
                pair["grpc client cores"] = result.client_cpu_s / result.duration
            else:
                cpu, started = cpu_seconds(workers), time.monotonic()
                if shutil.which("wrk"):
                    rate = wrk_rate(ours.url, "send", seconds, concurrency)
                    requests = round(rate * max(1, int(seconds)))
                else:
                    http = run(ours.url, Scenario("send", GROUP_SIZE), concurrency, seconds)
                    if sum(http.errors.values()):
                        raise RuntimeError(f"HTTP send: {sum(http.errors.values())} errors")
                    requests, rate = http.requests, http.requests / http.duration
                used, wall = cpu_seconds(workers) - cpu, time.monotonic() - started
            pair[transport] = rate
            pair[f"{transport} cpu ms"] = used * 1000 / requests
            pair[f"{transport} cores"] = used / wall
            pair[f"{transport} processes"] = len(pids)
        rounds_out.append(pair)
        say(
            f"  send: HTTP {pair['http']:.0f}/s ({pair['http cpu ms']:.2f} ms CPU each), "
            f"gRPC {pair['grpc']:.0f}/s ({pair['grpc cpu ms']:.2f} ms CPU each)"
        )
    return rounds_out


def _spread(values: list[float], fmt: str = ",.0f") -> str:
    """The median, and the range when there are several: `1,234 (1,200-1,300)`."""
    middle = format(statistics.median(values), fmt)
    if len(values) < 2:
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(
    info: dict[str, str],
    scenarios: list[dict[str, Any]],
    fan: dict[str, Any],
    ab: dict[str, list[dict[str, float]]],
    args: argparse.Namespace,
    with_wrk: bool,
    transports: list[dict[str, float]] | None = None,
) -> str:
    seconds, concurrency, ab_seconds = args.seconds, args.concurrency, args.ab_seconds
    rounds = len(next(iter(ab.values()))) if ab else 0
    bench = f"timeline-bench --url URL --concurrency {concurrency} --duration {ab_seconds:.0f}"
    wrk = f"wrk -t2 -c{concurrency} -d{ab_seconds:.0f}s -s timeline/bench/wrk/SCENARIO.lua URL"
    lines = [
        "# Benchmarks",
        "",
        "Made by `make bench` (`python -m timeline.bench.suite`, about 8 minutes), which starts",
        "the service on the embedded default (SQLite and a local redis-server over a unix",
        "socket) under gunicorn with 2 workers, and beside it the least Flask app that serves",
        "the same routes (`timeline/bench/baseline.py`: per send one EVALSHA and one SQLite",
        "transaction, per sync one SELECT and one GET; no validation, idempotency, metrics or",
        "logs), served the same way. Both are driven from the same 2-core machine, which also",
        "runs Redis and the load generator: figures vary by 10-20% from run to run, so compare",
        "within one run. Every request carries a `client_msg_id` of its own, as the README",
        "tells callers; replies are all checked to be 2xx.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in info.items()),
        "",
    ]
    if with_wrk:
        lines += [
            "## Throughput: requests/s, timeline against the least app",
            "",
            f"{rounds} rounds A B, B A, A B ..., {ab_seconds:.0f} s each, {concurrency} keep-alive "
            "connections; median (lowest-highest) over the rounds. wrk (C, 2 threads) is the "
            "measure; timeline-bench drives the same scenario right before it.",
            "",
            "| scenario | timeline, wrk | least app, wrk | ratio | timeline, timeline-bench "
            "| timeline-bench / wrk | timeline, new connection each | least app, new "
            "connection each |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, pairs in ab.items():
            label = f"{name} ({GROUP_SIZE} members)" if name == "sendGroup" else name
            if name == "sync":
                label = "sync (20 entries)"
            lines.append(
                f"| {label} | {_spread([p['timeline wrk'] for p in pairs])} "
                f"| {_spread([p['baseline wrk'] for p in pairs])} "
                f"| **{_spread([p['timeline wrk'] / p['baseline wrk'] for p in pairs], '.2f')}** "
                f"| {_spread([p['timeline'] for p in pairs])} "
                f"| {_spread([p['timeline'] / p['timeline wrk'] for p in pairs], '.2f')} "
                f"| {_spread([p['timeline wrk close'] for p in pairs])} "
                f"| {_spread([p['baseline wrk close'] for p in pairs])} |"
            )
        lines += [
            "",
            "Keep-alive connections are what a backend caller with a connection pool (or nginx",
            "with `keepalive` upstreams, as `configs/nginx.conf` sets) gets; one connection per",
            "request is a caller without a pool, or curl (`Connection: close`, half as long).",
            "",
        ]
    else:
        lines += [
            "## Throughput: requests/s, timeline against the least app",
            "",
            "(wrk is not installed here, so this run has timeline-bench's figures only: "
            "`apt-get install wrk` and run again for the C load generator's.)",
            "",
            "| scenario | timeline, timeline-bench | least app, timeline-bench | ratio |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, pairs in ab.items():
            lines.append(
                f"| {name} | {_spread([p['timeline'] for p in pairs])} "
                f"| {_spread([p['baseline'] for p in pairs])} "
                f"| **{_spread([p['timeline'] / p['baseline'] for p in pairs], '.2f')}** |"
            )
        lines.append("")
    lines += [
        "Each round, in order (timeline-bench's figure, then wrk's):",
        "",
        "| scenario | round | timeline, timeline-bench | least app, timeline-bench"
        + (" | timeline, wrk | least app, wrk | ratio (wrk) |" if with_wrk else " | ratio |"),
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if with_wrk else ""),
    ]
    for name, pairs in ab.items():
        for i, p in enumerate(pairs, 1):
            row = f"| {name} | {i} | {p['timeline']:,.0f} | {p['baseline']:,.0f} |"
            if with_wrk:
                row += (
                    f" {p['timeline wrk']:,.0f} | {p['baseline wrk']:,.0f} "
                    f"| {p['timeline wrk'] / p['baseline wrk']:.2f} |"
                )
            else:
                row += f" {p['timeline'] / p['baseline']:.2f} |"
            lines.append(row)
    if transports:
        lines += ["", *grpc_section(transports, ab_seconds, concurrency, with_wrk)]
    ratio = fan["ours"] / fan["floor"]
    lines += [
        "",
        "## Fan-out: a sendGroup to 10,000 members",
        "",
        "Median over HTTP of one request at a time, interleaved with the raw floor: one EVALSHA",
        "of the least script (INCR 10,001 counters) plus one SQLite transaction inserting",
        "10,001 rows, done directly with the drivers (`timeline/bench/floor.py`).",
        "",
        "| | median ms | budget | |",
        "| --- | ---: | --- | --- |",
        f"| timeline, over HTTP ({fan['samples']} requests) | {fan['ours']:.1f} "
        f"(p95 {fan['ours_p95']:.1f}) "
        f"| at most {BUDGET_MS:.0f} ms | {'met' if fan['ours'] <= BUDGET_MS else 'missed'} |",
        *(
            [f"| timeline, over HTTP, wrk on one connection | {fan['wrk']:.1f} | | |"]
            if "wrk" in fan
            else []
        ),
        f"| raw floor, in process | {fan['floor']:.1f} | | |",
        f"| ratio | {ratio:.2f}x | at most {FLOOR_RATIO}x "
        f"| {'met' if ratio <= FLOOR_RATIO else 'missed'} |",
        "",
    ]
    if fan["ours"] > BUDGET_MS:
        lines += [
            f"The {BUDGET_MS:.0f} ms budget is missed by {fan['ours'] - BUDGET_MS:.0f} ms "
            f"({fan['ours'] / BUDGET_MS - 1:.0%}). "
            + (
                f"The floor alone takes {fan['floor']:.0f} ms on this machine: the drivers' "
                "own work (10,001 INCRs in Redis, 10,001 rows through SQLite's B-trees) "
                "does not fit the budget here, and the service adds "
                f"{fan['ours'] - fan['floor']:+.0f} ms to it over HTTP."
                if fan["floor"] > 0.8 * BUDGET_MS
                else "The service adds what the floor lacks: HTTP, validation of 10,000 "
                "ids, and the bookkeeping that makes the write safe to retry."
            ),
            "",
        ]
    lines += [
        "## Scenarios, with --verify",
        "",
        f"timeline-bench alone, each {seconds:.0f} s, {concurrency} workers (one keep-alive "
        "connection each), `--verify` after: every acknowledged message read back, each "
        "timeline 1..N without a hole or a copy twice.",
        "",
        "| scenario | requests/s | messages/s (history + sync) | p50 ms | p95 ms | p99 ms "
        "| max ms | errors | verify | load generator CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for sc in scenarios:
        name = sc["scenario"] + (f" ({sc['group_size']} members)" if sc["group_size"] else "")
        verdict = sc["verify"]
        lines.append(
            f"| {name} | {sc['requests_per_second']:,.0f} | {sc['messages_per_second']:,.0f} "
            f"({sc['history_copies_per_second']:,.0f} + {sc['sync_copies_per_second']:,.0f}) "
            f"| {sc['p50']:.1f} | {sc['p95']:.1f} | {sc['p99']:.1f} | {sc['max']:.1f} "
            f"| {sc['errors']} | {'ok' if verdict['ok'] else 'FAILED'} "
            f"({verdict['timelines']} timelines) | {sc['client_cpu_cores']:.2f} cores |"
        )
    lines += ["", "![latency of the send scenario](benchmarks-send.png)", ""]
    lines += [
        "## Reproduce",
        "",
        "```sh",
        "make bench        # everything on this page, and its plot",
        "```",
        "",
        "Or one figure at a time, against any running service (URL, e.g. "
        "`http://127.0.0.1:8000` from `make run`; the least app: `TIMELINE_REDIS_URL=... "
        "gunicorn -w 2 -k timeline.worker.TimelineWorker --threads 4 "
        "timeline.bench.baseline:app`):",
        "",
        "| figure | command |",
        "| --- | --- |",
        f"| requests/s, wrk | `{wrk}` (SCENARIO: send, sendGroup, sync) |",
        "| one connection per request | the same, with `-H 'Connection: close'` |",
        f"| requests/s, timeline-bench | `{bench} --scenario send` (sendGroup: "
        f"`--group-size {GROUP_SIZE}`) |",
        f"| scenarios with verify | `timeline-bench --url URL --scenario sendGroup "
        f"--group-size 50 --concurrency {concurrency} --duration {seconds:.0f} --verify "
        "--json out.json` |",
        "| fan-out, wrk | `wrk -t1 -c1 -d5s --latency -s timeline/bench/wrk/fanout.lua URL` |",
        f"| gRPC send | `python -m timeline.bench.grpc_load --target 127.0.0.1:9000 "
        f"--seconds {ab_seconds:.0f}` (beside `make run`) |",
        "| fan-out against the floor | `make bench` (the floor runs in process) |",
        "",
    ]
    return "\n".join(lines)


def grpc_section(
    transports: list[dict[str, float]], seconds: float, concurrency: int, with_wrk: bool
) -> list[str]:
    """The page's gRPC part: send over gRPC beside send over HTTP, on the same deployment."""
    processes, channels, in_flight = GRPC_LOAD
    servers = int(transports[0]["grpc processes"])
    http = f"`wrk -t2 -c{concurrency}`" if with_wrk else f"timeline-bench, {concurrency} workers"
    lines = [
        "## gRPC beside HTTP: send",
        "",
        f"The same deployment serves both: {int(transports[0]['http processes'])} HTTP workers "
        f"and {servers} timeline-grpc processes sharing one port (`TIMELINE_GRPC_PROCESSES` "
        f"unset: as many as the workers). {len(transports)} rounds, HTTP then gRPC, then the "
        f"other way round, {seconds:.0f} s each: HTTP driven by {http} (keep-alive "
        f"connections), gRPC by `timeline/bench/grpc_load.py` ({processes} processes x "
        f"{channels} channels x {in_flight} calls in flight, unary `Send`), the same messages "
        "(random pairs among 30 users, a `client_msg_id` each). CPU is what the processes "
        "serving that transport used (user + system, from /proc), per send; Redis's is apart.",
        "",
        "| send | requests/s | CPU per send, ms | serving processes' cores |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, key in ((f"HTTP ({http})", "http"), ("gRPC", "grpc")):
        lines.append(
            f"| {name} | {_spread([t[key] for t in transports])} "
            f"| {_spread([t[key + ' cpu ms'] for t in transports], '.2f')} "
            f"| {_spread([t[key + ' cores'] for t in transports], '.2f')} |"
        )
    lines += [
        f"| gRPC / HTTP | {_spread([t['grpc'] / t['http'] for t in transports], '.2f')} "
        f"| **{_spread([t['grpc cpu ms'] / t['http cpu ms'] for t in transports], '.2f')}** | |",
        "",
        "The gRPC load generator is Python and costs the machine more than wrk does "
        f"({_spread([t['grpc client cores'] for t in transports], '.2f')} cores): compare "
        "CPU per send before requests/s.",
    ]
    return lines


#: Sections other scripts write into the page (tests/bench_profile.py, tests/bench_cluster.py):
#: kept as they are.
KEPT = (
    ("<!-- profile:start -->", "<!-- profile:end -->"),
    ("<!-- cluster:start -->", "<!-- cluster:end -->"),
)


def write_section(page: Path, start: str, end: str, section: str) -> None:
    """Put a section (from `start` to `end`, both included) in the page: in place of the last
    one, or before `## Reproduce`. What tests/bench_*.py write; keep_sections keeps it."""
    text = page.read_text()
    if start in text:
        before, _, rest = text.partition(start)
        _, _, after = rest.partition(end)
        text = before + section + after
    else:
        before, marker, after = text.partition("## Reproduce")
        text = before + section + "\n\n" + marker + after
    page.write_text(text)


def keep_sections(text: str, page: Path) -> str:
    """The new page, with the kept sections of the old one put back before its last part."""
    old = page.read_text() if page.exists() else ""
    for start, end in KEPT:
        if start in old and start not in text:
            section = start + old.split(start, 1)[1].split(end, 1)[0] + end
            before, marker, after = text.partition("## Reproduce")
            text = before + section + "\n\n" + marker + after if marker else text + section
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeline.bench.suite")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ab-seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fan-out-samples", type=int, default=25)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="timeline-bench-"))
    say(f"benchmarking in {work}")
    servers: list[Server] = []
    grpc_target = f"127.0.0.1:{free_port()}"
    try:
        ours = Server(
            "timeline",
            ["-c", str(ROOT / "gunicorn.conf.py"), "app:app"],
            {
                "WEB_CONCURRENCY": "2",
                "TIMELINE_DATA_DIR": str(work / "ours"),
                "TIMELINE_SQLITE_PATH": str(work / "ours" / "timeline.sqlite3"),
                "TIMELINE_LOG_LEVEL": os.environ.get("TIMELINE_LOG_LEVEL", "info"),
                # gRPC beside HTTP, as make run serves it
                "TIMELINE_GRPC_BIND": grpc_target,
            },
            ROOT,
            work,
        )
        servers.append(ours)
        redis_url = f"unix://{work / 'ours' / 'redis.sock'}"
        baseline = Server(
            "baseline",
            [
                "--workers", "2",
                # Served as timeline is (its worker class and threads): the comparison is
                # of the apps, not of two ways of serving them.
                "--worker-class", "timeline.worker.TimelineWorker",
                "--threads", "4",
                "--bind", "127.0.0.1:{port}",
                "--control-socket", str(work / "baseline.ctl"),
                "timeline.bench.baseline:app",
            ],
            {"TIMELINE_REDIS_URL": redis_url, "BASELINE_SQLITE": str(work / "baseline.sqlite3")},
            work,
            work,
        )  # fmt: skip
        servers.append(baseline)

        scenarios = []
        docs = args.out.parent
        for name, group_size in (("send", 0), ("sendGroup", 50), ("sync", 0), ("mixed", 10)):
            say(f"scenario {name}")
            result, scenario = scenario_run(
                ours.url, name, args.seconds, args.concurrency, group_size or 10
            )
            result.verify = verify(ours.url, scenario)
            scenarios.append(result.summary())
            if name == "send":
                plot(result, docs / "benchmarks-send.png")

        say(f"fan-out to {FAN_OUT:,} members, against the floor")
        floor = Floor(redis_url, work / "floor.sqlite3", FAN_OUT)
        fan = fan_out(ours.url, floor, args.fan_out_samples)
        floor.close()
        if shutil.which("wrk"):
            fan["wrk"] = wrk_latency_ms(ours.url, "fanout", min(args.seconds, 5))
        say(
            f"  timeline {fan['ours']:.1f} ms, floor {fan['floor']:.1f} ms"
            + (f", wrk median {fan['wrk']:.1f} ms" if "wrk" in fan else "")
        )

        say("throughput against the least Flask app (A B A B)")
        ab = {
            name: throughput(ours, baseline, name, args.ab_seconds, args.rounds, args.concurrency)
            for name in ("send", "sendGroup", "sync")
        }
        say("send over gRPC beside send over HTTP (H G, G H, ...)")
        transports = grpc_beside_http(
            ours, grpc_target, args.ab_seconds, args.rounds, args.concurrency
        )
        with_wrk = shutil.which("wrk") is not None
        text = keep_sections(
            report(machine(), scenarios, fan, ab, args, with_wrk, transports), args.out
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        say(f"wrote {args.out}")
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
