"""gunicorn settings: `gunicorn app:app` reads them in a checkout (gunicorn.conf.py imports
this module); an installed package is served with `gunicorn -c python:timeline.gunicorn_conf
'timeline.factory:create_app()'`.

Environment: PORT (8000), HOST (127.0.0.1; 0.0.0.0 in the container), WEB_CONCURRENCY
(workers, 2), GUNICORN_TIMEOUT (30 s), plus every TIMELINE_* setting. A bad or unknown setting
stops gunicorn here, before it binds or starts anything: one line on stderr, exit status 1.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

# None of these imports prometheus_client, which reads PROMETHEUS_MULTIPROC_DIR (set below),
# nor grpc, which does not survive the fork of the workers.
from timeline import embedded
from timeline.compat import Unsupported, check_gunicorn
from timeline.logs import logging_config
from timeline.rpc.supervisor import GrpcServers, StartFailed
from timeline.settings import SettingsError, load_settings

try:
    check_gunicorn()  # before the worker class is loaded: its imports need the range
    _settings = load_settings()
except (SettingsError, Unsupported) as exc:
    # gunicorn would print its own traceback and another line; the one line that matters is
    # what is wrong and where, so it is all that is printed (on stderr, exit status 1).
    sys.exit(f"timeline: {exc}")
_data_dir = Path(_settings.data_dir).resolve()

# Metrics from every worker add up: prometheus_client's multiprocess mode reads this variable
# at import, so it is set here, in the master, before any worker exists.
_metrics_dir = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_data_dir / "metrics")))

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# The master aborts (SIGABRT) a worker whose main loop has not checked in for this long: a
# hung worker. It does not bound a request (its thread does not check in): request_deadline_ms
# does. Requests in flight in an aborted worker are answered 503, Retry-After: 1.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
# The HTTP front (timeline/worker.py): gthread's threaded worker, with every socket read and
# write in its main loop, so that slow or silent clients hold no thread. http_threads requests
# run at once per worker; the worker reads its timeouts from the same settings after the fork.
worker_class = "timeline.worker.TimelineWorker"
threads = _settings.http_threads
# gunicorn's own keep-alive knob (whole seconds, and 0 would turn keep-alive off); the worker
# closes idle connections after http_keepalive_ms itself.
keepalive = max(1, -(-_settings.http_keepalive_ms // 1000))
# The app (and its Redis and MongoDB clients) is built in each worker after the fork:
# pymongo's client is not fork-safe.
preload_app = False
# The service writes one JSON access line per request itself (with its request id).
accesslog = None
logconfig_dict = logging_config(_settings.log_level)
# gunicorn >= 25 opens a control socket under $HOME by default, shared by every instance
# of the user; keep each deployment's next to its data instead.
control_socket = str(_data_dir / "gunicorn.ctl")

# The embedded redis-server is started here, in the master, before the workers fork, and
# stopped when the last master using it exits; workers find it running and only connect.
_lease: embedded.Lease | None = None


def on_starting(server: Any) -> None:
    global _lease
    shutil.rmtree(_metrics_dir, ignore_errors=True)  # samples of a previous run
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    if _settings.embedded_redis:
        _lease = embedded.Lease(_settings.data_dir)


# The gRPC API (timeline-grpc) beside the workers, when TIMELINE_GRPC_BIND is set (make run
# and the image set it): grpc_processes processes on one port (by default one per worker),
# started once gunicorn listens, before any worker, each started again if it dies, all
# stopped on exit before the embedded redis-server they may use. A reload (SIGHUP) replaces
# the workers only: they keep serving.
_grpc: GrpcServers | None = None


def when_ready(server: Any) -> None:
    global _grpc
    if _settings.grpc_bind is None or _settings.grpc_listen is None:
        return
    servers = GrpcServers(
        _settings.grpc_listen,
        _settings.grpc_process_count(server.cfg.workers),
        grace_s=_settings.gap_grace_ms / 1000,
    )
    try:
        servers.start()
    except StartFailed as exc:
        on_exit(server)
        sys.exit(f"timeline: {exc}; TIMELINE_GRPC_BIND=off serves HTTP alone")
    _grpc = servers


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def worker_exit(server: Any, worker: Any) -> None:
    from timeline.factory import close_app

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        close_app(app)


def on_exit(server: Any) -> None:
    if _grpc is not None:
        _grpc.stop()  # first: its calls in flight may still need the embedded redis-server
    if _lease is not None:
        _lease.release()
