"""timeline-grpc beside gunicorn's workers: gunicorn.conf.py's master starts its processes
once it listens, starts each again whenever it dies, and stops them all on exit, before the
embedded redis-server.

As many processes serve as the settings say (grpc_processes; by default one per HTTP
worker), all on one port, as gRPC Python's multiprocessing example serves: each server
sets SO_REUSEPORT and the kernel spreads the connections over them, while the master holds
the port (PortLease), bound with SO_REUSEPORT and never listening. Before that, the master
makes sure nothing else listens there: grpc sets SO_REUSEPORT by default, so another gRPC
server on the port would otherwise share its traffic in silence.

Each is a process of its own (fork and exec: grpc does not survive a fork, and gunicorn's
workers are forks of the master), in a session of its own, so that a Ctrl-C meant for
gunicorn reaches it only through the master, after the workers. Each watches its parent
too: should the master be killed outright, it stops by itself. This module imports nothing
of grpc: the master forks the workers after it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from functools import partial

log = logging.getLogger("timeline.rpc")

#: How long a start may take (imports, settings, the store) before it counts as failed.
START_TIMEOUT_S = 60.0
#: Pauses between restarts of a server that keeps dying: from the first to the longest.
RESTART_PAUSE_S = (1.0, 30.0)
#: A server that ran this long before it died is restarted after the shortest pause again.
STABLE_S = 60.0


class StartFailed(RuntimeError):
    """timeline-grpc exited, or said nothing, before it served; or its port is taken."""


class PortLease:
    """The address the serving processes share, held from start to stop.

    First a plain bind (no SO_REUSEPORT) checks that no other process listens there; then
    a socket bound with SO_REUSEPORT, never listening, keeps the port for this deployment's
    servers (all of them set SO_REUSEPORT: the kernel lets them bind beside it and hands it
    no connection). Port 0 becomes the port the system picked, which every server then
    binds. A unix:/path is served by one process and needs neither.
    """

    def __init__(self, bind: str) -> None:
        self.bind = bind
        #: Whether the servers share the port (SO_REUSEPORT): not on a unix socket.
        self.shared = not bind.startswith("unix:")
        self._sockets: list[socket.socket] = []
        if not self.shared:
            return
        host, _, port_text = bind.rpartition(":")
        port = int(port_text)
        try:
            found = socket.getaddrinfo(
                host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise StartFailed(f"TIMELINE_GRPC_BIND: cannot listen on {bind}: {exc}") from None
        problem = None
        for family, kind, protocol, _, address in found:
            address = (address[0], port, *address[2:])
            try:
                self._check(family, kind, protocol, address)
                held = self._hold(family, kind, protocol, address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    self.release()
                    raise StartFailed(
                        f"TIMELINE_GRPC_BIND: cannot listen on {bind}: another process "
                        "listens there"
                    ) from None
                problem = exc  # an address of the name this machine lacks (IPv6, say)
                continue
            self._sockets.append(held)
            port = held.getsockname()[1]  # port 0: every address, and server, gets the same
        if not self._sockets:
            raise StartFailed(f"TIMELINE_GRPC_BIND: cannot listen on {bind}: {problem}")
        self.bind = f"{host}:{port}"
        # gunicorn's workers are forks of the master: they must not keep the port too.
        os.register_at_fork(after_in_child=partial(_forget_in_child, weakref.ref(self)))

    @staticmethod
    def _check(family: int, kind: int, protocol: int, address: tuple[object, ...]) -> None:
        """Raises EADDRINUSE when another process listens at the address (SO_REUSEADDR, as
        grpc sets it: connections of an earlier server waiting out TIME_WAIT do not count)."""
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)

    @staticmethod
    def _hold(family: int, kind: int, protocol: int, address: tuple[object, ...]) -> socket.socket:
        held = socket.socket(family, kind, protocol)
        try:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            held.bind(address)
        except OSError:
            held.close()
            raise
        return held

    def release(self) -> None:
        sockets, self._sockets = self._sockets, []
        for held in sockets:
            held.close()


def _forget_in_child(lease: weakref.ref[PortLease]) -> None:
    held = lease()
    if held is not None:
        held.release()


class GrpcChild:
    """One timeline-grpc process at a time, kept running until terminate()."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        self._command = list(command or [sys.executable, "-m", "timeline.rpc"])
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = -1  # the read end of the pipe a starting process says "ready" on
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def launch(self) -> None:
        """Start the process; wait_ready() then waits until it serves."""
        read, write = os.pipe()
        arguments = ["--ready-fd", str(write), "--parent-pid", str(os.getpid())]
        try:
            with self._lock:
                if not self._stopping.is_set():
                    self._process = subprocess.Popen(
                        [*self._command, *arguments],
                        pass_fds=(write,),
                        start_new_session=True,
                    )
                    self._ready, read = read, -1
        finally:
            os.close(write)
            if read != -1:
                os.close(read)

    def wait_ready(self, deadline: float) -> None:
        """Wait until the launched process serves; StartFailed if it exits first, or says
        nothing by `deadline` (then it is killed)."""
        read, self._ready = self._ready, -1
        process = self._process
        if read == -1 or process is None:
            return  # stopped before it was launched
        try:
            timeout = max(0.0, deadline - time.monotonic())
            ready = select.select([read], [], [], timeout)[0]
            said = os.read(read, 64) if ready else b""
        finally:
            os.close(read)
        if said.startswith(b"ready"):
            log.info("timeline-grpc (pid %d) serving", process.pid)
            return
        if not ready:
            process.kill()
        status = process.wait()
        raise StartFailed(f"timeline-grpc did not start (exit status {status}; see above)")

    def keep(self) -> None:
        """Start it again whenever it dies, from a daemon thread, until stop()."""
        self._thread = threading.Thread(target=self._keep, name="timeline-grpc-keeper", daemon=True)
        self._thread.start()

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: calls in flight get its grace), and never start it
        again."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def wait_stopped(self, deadline: float) -> None:
        """Wait for it to stop after terminate(); past `deadline`, kill it."""
        process = self._process
        if process is None:
            return
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("timeline-grpc (pid %d) did not stop in time: killed", process.pid)
            process.kill()
            process.wait()

    def _spawn(self) -> None:
        self.launch()
        self.wait_ready(time.monotonic() + START_TIMEOUT_S)

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


class GrpcServers:
    """`count` timeline-grpc processes serving one address, each kept running (started
    again when it dies, on its own) until stop()."""

    def __init__(
        self, bind: str, count: int, grace_s: float, command: Sequence[str] | None = None
    ) -> None:
        self._bind = bind
        self._count = count
        self._grace_s = grace_s
        self._command = list(command or [sys.executable, "-m", "timeline.rpc"])
        self._lease: PortLease | None = None
        self.children: list[GrpcChild] = []

    @property
    def pids(self) -> list[int]:
        return [pid for child in self.children if (pid := child.pid) is not None]

    @property
    def bind(self) -> str:
        """Where they serve (port 0 resolved once started)."""
        return self._lease.bind if self._lease is not None else self._bind

    def start(self) -> None:
        """Start them all at once and wait until each serves; StartFailed (and none left
        running) if the port is taken or any of them does not start."""
        self._lease = lease = PortLease(self._bind)
        command = [*self._command, "--bind", lease.bind]
        if lease.shared:
            command.append("--reuse-port")
        count = self._count if lease.shared else 1
        self.children = [GrpcChild(command) for _ in range(count)]
        try:
            for child in self.children:
                child.launch()
            deadline = time.monotonic() + START_TIMEOUT_S
            failed: StartFailed | None = None
            for child in self.children:  # each one's outcome, so that none is left starting
                try:
                    child.wait_ready(deadline)
                except StartFailed as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        except BaseException:
            self.stop()
            raise
        for child in self.children:
            child.keep()
        log.info(
            "timeline-grpc: %d process%s serving %s (pids %s)",
            count,
            "" if count == 1 else "es",
            lease.bind,
            ", ".join(map(str, self.pids)),
        )

    def stop(self) -> None:
        """Stop them all gracefully, at once (each call in flight gets the grace), then
        give the port up."""
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + self._grace_s + 5
        for child in self.children:
            child.wait_stopped(deadline)
        if self._lease is not None:
            self._lease.release()
