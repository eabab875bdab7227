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
# stopped when the master exits; workers find it running and only connect.
_embedded_started = False


def on_starting(server: Any) -> None:
    global _embedded_started
    if _settings.embedded_redis:
        _, _embedded_started = embedded.ensure_redis(_settings.data_dir)


def on_exit(server: Any) -> None:
    if _embedded_started:
        embedded.stop_redis(_settings.data_dir)
