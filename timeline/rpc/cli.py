"""timeline-grpc (also `python -m timeline.rpc`): the gRPC API on TIMELINE_GRPC_BIND.

Every other TIMELINE_* setting is read as the HTTP service reads it, so that with the same
Redis and store both serve the same data. A bad setting, or an address it cannot listen on,
stops it at start-up with one line on stderr and exit status 1, as gunicorn.conf.py does.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
from pathlib import Path

from timeline.logs import logging_config
from timeline.settings import SettingsError, load_settings


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="timeline-grpc",
        description="Serve timeline's gRPC API (go-timeline's timeline.v1.Timeline) on "
        "TIMELINE_GRPC_BIND (default 127.0.0.1:9000); every TIMELINE_* setting applies.",
    )
    # Both for gunicorn.conf.py, which runs this beside its workers (timeline.rpc.supervisor).
    parser.add_argument(
        "--ready-fd", type=int, help="write 'ready' to this file descriptor once serving"
    )
    parser.add_argument(
        "--parent-pid", type=int, default=0, help="stop when this process is no longer the parent"
    )
    parser.add_argument("--bind", help="listen here instead of TIMELINE_GRPC_BIND")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with the other processes the supervisor runs (SO_REUSEPORT)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"timeline: {exc}")
    bind = args.bind or settings.grpc_listen
    if bind is None:
        sys.exit("timeline: TIMELINE_GRPC_BIND is off: timeline-grpc has nothing to serve")
    # The metrics go where gunicorn's workers put theirs, so that /metrics adds the gRPC
    # calls in (gunicorn.conf.py sets this for the processes it starts). prometheus_client
    # reads it when it is imported: before anything that imports timeline.metrics.
    metrics_dir = Path(
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", str(Path(settings.data_dir).resolve() / "metrics")
        )
    )
    metrics_dir.mkdir(parents=True, exist_ok=True)
    # JSON lines on stderr, each call's id on the lines it causes, as under gunicorn.
    logging.config.dictConfig(logging_config(settings.log_level))

    from timeline.rpc.server import serve

    status = serve(
        settings, bind, ready_fd=args.ready_fd, parent=args.parent_pid, reuse_port=args.reuse_port
    )
    _forget_samples()
    sys.exit(status)


def _forget_samples() -> None:
    """What a gunicorn worker's exit does (child_exit): its live gauges leave the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
