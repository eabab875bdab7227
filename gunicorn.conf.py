"""gunicorn settings: `gunicorn app:app` reads this file from the working directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from timeline import embedded
from timeline.settings import load_settings

_settings = load_settings()

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn >= 25 opens a control socket under $HOME by default, shared by every instance
# of the user; keep each deployment's next to its data instead.
control_socket = str(Path(_settings.data_dir).resolve() / "gunicorn.ctl")

# The embedded redis-server is started here, in the master, before the workers fork, and
# stopped when the last master using it exits; workers find it running and only connect.
_lease: embedded.Lease | None = None


def on_starting(server: Any) -> None:
    global _lease
    if _settings.embedded_redis:
        _lease = embedded.Lease(_settings.data_dir)


def on_exit(server: Any) -> None:
    if _lease is not None:
        _lease.release()
