"""timeline-bench: drive a running timeline service over HTTP and report what it sustains.

    .venv/bin/timeline-bench --url http://127.0.0.1:8000 --scenario sendGroup --group-size 50 \\
                             --duration 3 --verify --json var/bench.json
    .venv/bin/timeline-bench --url http://127.0.0.1:8000 --scenario wait --waiters 1000

Exit status: 0 after a run, 1 when --verify finds a broken timeline, 2 when the run could not
be made (a bad argument, a service that does not answer or refuses to be prepared), 3 when
--plot is asked for and matplotlib cannot be imported (checked before the run: nothing runs).
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from timeline.bench import wait
from timeline.bench.harness import SCENARIOS, BenchError, Result, Scenario, run, verify

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SATURATED = 0.9  # of one core: a Python load generator is bound by its GIL beyond this

#: Exit statuses, as --help's epilog and the README list them.
EXIT_VERIFY_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_NO_MATPLOTLIB = 3
EXIT_STATUSES = """\
exit status:
  0  the run was made (and --verify, when given, found every timeline whole)
  1  --verify found a broken timeline
  2  the run could not be made: a bad argument, a service that does not answer at --url
     or refuses the run's first requests
  3  --plot was given and matplotlib cannot be imported: checked first, nothing was run
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="timeline-bench",
        description="Drive a timeline service over HTTP and measure it.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--scenario", required=True, choices=(*SCENARIOS, wait.NAME))
    parser.add_argument("--group-size", type=int, default=10, help="members per sendGroup")
    parser.add_argument("--concurrency", type=int, default=4, help="workers, one connection each")
    parser.add_argument(
        "--processes",
        type=int,
        help="processes the workers are spread over (default: one per 16 workers, at most "
        "one per core; a process spends about 0.1-0.2 ms of CPU per request)",
    )
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--duration", type=float, help="seconds to run (default 10; wait: 40, in --phases)"
    )
    limit.add_argument("--requests", type=int, help="requests to make in all")
    parser.add_argument("--verify", action="store_true", help="check every touched timeline")
    parser.add_argument(
        "--verify-wait",
        type=float,
        default=7.0,
        help="when some requests did not succeed, seconds to wait before --verify: readers "
        "step over the holes such a request may leave only after the service's gap grace "
        "(6 s by default)",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument(
        "--plot",
        type=Path,
        help="write latency plots as PNG here (needs matplotlib: the bench extra)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the table stays)")
    waiting = parser.add_argument_group(
        f"--scenario {wait.NAME}",
        f"N readers held on wait_ms={wait.WAIT_MS}, a sender waking one at a time, and the "
        "other traffic's latency in phases without and with them held (one process: "
        "--processes does not apply; --concurrency is the other traffic's connections)",
    )
    waiting.add_argument(
        "--waiters", type=int, default=1000, help="readers held, one connection each (1000)"
    )
    waiting.add_argument(
        "--phases",
        type=int,
        default=4,
        help="phases --duration is cut into, without and with the waiters held, alternating "
        "(an even number; 4)",
    )
    waiting.add_argument(
        "--ramp",
        type=float,
        default=wait.RAMP_S,
        help=f"seconds over which the waiters connect before each held phase "
        f"({wait.RAMP_S:g}: their waits then end evenly spread, N/{wait.RAMP_S:g} a second "
        "asking again, as in a steady state; 0: at once, and none times out in a short phase)",
    )
    waiting.add_argument(
        "--wake-every",
        type=float,
        default=wait.WAKE_EVERY,
        help=f"seconds between the sender's messages, at least ({wait.WAKE_EVERY:g}; each "
        "woken waiter's reply and its next ask are requests the held phases have and the "
        "others have not: a larger value measures the holding alone)",
    )
    waiting.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="the other traffic's requests/s, sends and syncs of other members (200; "
        "0: back to back on --concurrency connections)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("TIMELINE_API_TOKEN"), help="bearer token, if any"
    )
    args = parser.parse_args(argv)
    if args.scenario == wait.NAME:
        if args.requests is not None or args.plot is not None:
            parser.error(f"--scenario {wait.NAME} runs for --duration and draws no --plot")
        if (
            args.waiters < 1
            or args.phases < 2
            or args.phases % 2
            or min(args.rate, args.ramp) < 0
            or args.wake_every <= 0
        ):
            parser.error(
                "--waiters must be at least 1, --phases even, --rate and --ramp not negative, "
                "--wake-every positive"
            )
        if args.duration is None:
            args.duration = 40.0
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    if args.processes is None:
        args.processes = min(os.cpu_count() or 1, -(-args.concurrency // 16))
    if args.concurrency < 1 or args.group_size < 1 or args.processes < 1:
        parser.error("--concurrency, --group-size and --processes must be at least 1")
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        parser.error(f"--url must be http://host[:port] or https://..., got {args.url!r}")
    return args


def progress_bar(total: float | None, by_requests: bool) -> Any:
    """A one-line live bar on stderr."""

    def show(elapsed: float, done: int, errors: int) -> None:
        fraction = min(1.0, (done if by_requests else elapsed) / total) if total else 0.0
        filled = int(fraction * 30)
        rate = done / elapsed if elapsed else 0.0
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}  {done} requests  "
            f"{rate:,.0f}/s  {errors} errors "
        )
        sys.stderr.flush()

    return show


def table(report: dict[str, Any]) -> str:
    """The final table, for a terminal."""
    rows = [
        ("scenario", f"{report['scenario']}" + (f" (group of {report['group_size']})"
                                                 if report["group_size"] else "")),
        ("concurrency", f"{report['concurrency']} ({report['client_processes']} processes)"),
        ("duration", f"{report['duration']:.2f} s"),
        ("requests", f"{report['requests']:,}"),
        ("requests/s", f"{report['requests_per_second']:,.1f}"),
        ("messages written/s", f"{report['messages_per_second']:,.1f}"
         f"  (history {report['history_copies_per_second']:,.1f},"
         f" sync {report['sync_copies_per_second']:,.1f})"),
        ("latency p50", f"{report['p50']:.2f} ms"),
        ("latency p95", f"{report['p95']:.2f} ms"),
        ("latency p99", f"{report['p99']:.2f} ms"),
        ("latency max", f"{report['max']:.2f} ms"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in report["errors_by_status"].items()) or "0"),
        ("load generator CPU", f"{report['client_cpu_cores']:.2f} cores"),
    ]  # fmt: skip
    if report["verify"] is not None:
        verdict = report["verify"]
        rows.append(
            ("verify", f"{'ok' if verdict['ok'] else 'FAILED'} ({verdict['timelines']} timelines)")
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def figure_class() -> type[Figure]:
    """matplotlib's Figure (no pyplot: no global backend); ImportError without matplotlib."""
    from matplotlib.figure import Figure

    return Figure


def no_matplotlib(exc: ImportError) -> str:
    """Why --plot cannot be made, and how to install what it needs, wherever the CLI runs."""
    return (
        f"timeline-bench: --plot needs matplotlib, which {sys.executable} cannot import "
        f"({exc}); nothing was run. Install the bench extra: in a checkout of timeline, "
        "`make install` (or `.venv/bin/pip install -e '.[bench]'`); installed as a package, "
        "`pip install 'timeline[bench]'`."
    )


def latency_figure(result: Result) -> Figure:
    """Latency percentiles per second of the run, and the latency histogram up to p99.9."""
    buckets: dict[int, list[float]] = {}
    for sample in result.samples:
        buckets.setdefault(int(sample.started), []).append(sample.latency_ms)
    seconds = sorted(buckets)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    figure = figure_class()(figsize=(12, 4.5))
    over_time, histogram = figure.subplots(1, 2)
    for q, label in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        over_time.plot(seconds, [pct(buckets[s], q) for s in seconds], marker=".", label=label)
    over_time.set_xlabel("second of the run")
    over_time.set_ylabel("latency (ms)")
    over_time.set_title("latency percentiles over time")
    over_time.legend()
    over_time.grid(alpha=0.3)
    # Up to p99.9, not the maximum: one slow outlier (a disk stall, a GC) would otherwise
    # stretch the axis until 99% of the requests share one bar. What lies beyond is counted.
    latencies = sorted(s.latency_ms for s in result.samples)
    title, xlabel = "latency histogram", "latency (ms)"
    if latencies:
        low, cut = latencies[0], result.percentile(0.999)
        if cut > low:
            histogram.hist([v for v in latencies if v <= cut], bins=60, range=(low, cut))
            histogram.set_xlim(low, cut)
            beyond = len(latencies) - bisect.bisect_right(latencies, cut)
            title = f"latency histogram, up to p99.9 ({cut:.2f} ms)"
            # Below the axis, where no bar can hide it.
            xlabel += (
                f"\n{beyond:,} of {len(latencies):,} requests beyond p99.9, not shown "
                f"(max {latencies[-1]:.2f} ms)"
            )
        else:
            histogram.hist(latencies, bins=60)
    histogram.set_xlabel(xlabel)
    histogram.set_ylabel("requests")
    histogram.set_title(title)
    histogram.grid(alpha=0.3)
    figure.suptitle(f"timeline-bench: {result.scenario}, concurrency {result.concurrency}")
    figure.tight_layout()
    return figure


def plot(result: Result, path: Path) -> None:
    """Write the latency figure as PNG (needs matplotlib: the bench extra)."""
    try:
        figure = latency_figure(result)
    except ImportError as exc:
        raise SystemExit(no_matplotlib(exc)) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        # Before the run, not after it: a run of minutes is not thrown away for want of a plot.
        try:
            figure_class()
        except ImportError as exc:
            print(no_matplotlib(exc), file=sys.stderr)
            return EXIT_NO_MATPLOTLIB
    try:
        return bench(args)
    except BenchError as exc:
        # One line, not a traceback: most often nothing listens at --url, and that is all to say.
        print(f"timeline-bench: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN


def bench(args: argparse.Namespace) -> int:
    """The run the arguments ask for, its report, and the exit status."""
    if args.scenario == wait.NAME:
        return bench_wait(args)
    scenario = Scenario(args.scenario, args.group_size)
    show = not args.quiet and sys.stderr.isatty()
    bar = progress_bar(args.duration or args.requests, args.requests is not None) if show else None
    try:
        result = run(
            args.url,
            scenario,
            args.concurrency,
            duration=args.duration,
            requests=args.requests,
            token=args.token,
            progress=bar,
            processes=args.processes,
        )
        if show:
            sys.stderr.write("\n")
        if args.verify:
            if any(scenario.ledger.uncertain.values()) and args.verify_wait > 0:
                if not args.quiet:
                    print(
                        f"some requests failed: waiting {args.verify_wait:g} s before verifying "
                        "(the holes they left become readable after the gap grace)",
                        file=sys.stderr,
                    )
                time.sleep(args.verify_wait)
            result.verify = verify(args.url, scenario, args.token)
    except (OSError, http.client.HTTPException) as exc:
        # Preparing the run and verifying it are a client's plain requests: failing to make
        # one means the service is not there (the run's own requests count errors instead).
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach {args.url}: {reason}") from exc
    status = report(args, result.summary(), table, result.verify)
    if args.plot:
        plot(result, args.plot)
    return status


def report(
    args: argparse.Namespace,
    summary: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    verified: dict[str, Any] | None,
) -> int:
    """A run's report: the saturation warning, the table, the problems --verify found, the
    --json file; its exit status."""
    if summary["client_cpu_cores"] >= SATURATED:
        print(
            f"warning: the load generator used {summary['client_cpu_cores']:.2f} cores; it may "
            "be the bottleneck (run it on another machine, or with fewer workers)",
            file=sys.stderr,
        )
    print(render(summary))
    for problem in (verified or {}).get("problems", [])[:20]:
        print(f"  problem: {problem}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if verified is None or verified["ok"] else EXIT_VERIFY_FAILED


def bench_wait(args: argparse.Namespace) -> int:
    """--scenario wait: its run, report and exit status."""
    show = not args.quiet and sys.stderr.isatty()
    bar = progress_bar(args.duration, False) if show else None
    try:
        result, scenario = wait.run_wait(
            args.url,
            args.waiters,
            args.duration,
            args.phases,
            args.concurrency,
            args.rate,
            args.ramp,
            token=args.token,
            progress=bar,
            wake_every=args.wake_every,
        )
        if show:
            sys.stderr.write("\n")
        if args.verify:
            if any(scenario.ledger.uncertain.values()) and args.verify_wait > 0:
                time.sleep(args.verify_wait)
            result.verify = verify(args.url, scenario, args.token)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach {args.url}: {reason}") from exc
    return report(args, result.summary(), wait.table, result.verify)
