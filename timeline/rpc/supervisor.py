"""timeline-grpc beside gunicorn's workers: gunicorn.conf.py's master starts it once it listens,
starts it again whenever it dies, and stops it on exit, before the embedded redis-server.

It is a process of its own (fork and exec: grpc does not survive a fork, and gunicorn's
workers are forks of the master), in a session of its own, so that a Ctrl-C meant for
gunicorn reaches it only through the master, after the workers. It watches its parent too:
should the master be killed outright, it stops by itself. This module imports nothing of
grpc: the master forks the workers after it.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("timeline.rpc")

#: How long a start may take (imports, settings, the store) before it counts as failed.
START_TIMEOUT_S = 60.0
#: Pauses between restarts of a server that keeps dying: from the first to the longest.
RESTART_PAUSE_S = (1.0, 30.0)
#: A server that ran this long before it died is restarted after the shortest pause again.
STABLE_S = 60.0


class StartFailed(RuntimeError):
    """timeline-grpc exited, or said nothing, before it served."""


class GrpcChild:
    """One timeline-grpc process at a time, kept running until stop()."""

    def __init__(self, grace_s: float, command: Sequence[str] | None = None) -> None:
        self._grace_s = grace_s
        self._command = list(command or [sys.executable, "-m", "timeline.rpc"])
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        """Start it and wait until it serves (raises StartFailed: gunicorn then exits with
        its one line, as for a bad setting); then keep it running in a daemon thread."""
        self._spawn()
        self._thread = threading.Thread(target=self._keep, name="timeline-grpc-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop it gracefully (SIGTERM: calls in flight get its grace), then for good."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self._grace_s + 5)
        except subprocess.TimeoutExpired:
            log.error("timeline-grpc (pid %d) did not stop in time: killed", process.pid)
            process.kill()
            process.wait()

    def _spawn(self) -> None:
        read, write = os.pipe()
        try:
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = process = subprocess.Popen(
                    [*self._command, "--ready-fd", str(write), "--parent-pid", str(os.getpid())],
                    pass_fds=(write,),
                    start_new_session=True,
                )
            os.close(write)
            write = -1
            ready = select.select([read], [], [], START_TIMEOUT_S)[0]
            said = os.read(read, 64) if ready else b""
        finally:
            os.close(read)
            if write != -1:
                os.close(write)
        if said.startswith(b"ready"):
            log.info("timeline-grpc (pid %d) serving", process.pid)
            return
        if not ready:
            process.kill()
        status = process.wait()
        raise StartFailed(f"timeline-grpc did not start (exit status {status}; see above)")

    def _keep(self) -> None:
        """Start it again whenever it dies, pausing longer after each quick death."""
        pause = RESTART_PAUSE_S[0]
        while True:
            process = self._process
            if process is None:
                return
            started = time.monotonic()
            status = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_S:
                pause = RESTART_PAUSE_S[0]
            # gunicorn's master reaps every child it is signalled about: the status may be
            # lost to it (then 0), so it is only reported, never relied on.
            log.error(
                "timeline-grpc (pid %d) exited (status %s); starting it again in %.0f s",
                process.pid,
                status,
                pause,
            )
            while not self._stopping.wait(pause):
                try:
                    self._spawn()
                    break
                except StartFailed as exc:
                    pause = min(pause * 2, RESTART_PAUSE_S[1])
                    log.error("%s; trying again in %.0f s", exc, pause)
            else:
                return
            pause = min(pause * 2, RESTART_PAUSE_S[1])
