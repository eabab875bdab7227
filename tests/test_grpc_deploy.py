"""gRPC beside HTTP, as `make run` and the image serve them: gunicorn's master runs
timeline-grpc's processes when TIMELINE_GRPC_BIND is set (as many as its workers, sharing the
port), starts each again when it dies and stops them on exit; and the deployment files
publish both."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import free_port, sample
from test_e2e import ROOT, Service, clean_env
from timeline.rpc.supervisor import PortLease, StartFailed
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.rpc.v1 import timeline_pb2_grpc
from timeline.settings import GRPC_PROCESSES_MAX, Settings, SettingsError, load_settings

SERVING = health_pb2.HealthCheckResponse.SERVING


def grpc_children(service: Service) -> list[psutil.Process]:
    """The master's timeline-grpc processes (one that just died may not be reaped yet)."""
    assert service.process is not None
    found = []
    for child in psutil.Process(service.process.pid).children():
        try:
            if "timeline.rpc" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def stub(port: int) -> tuple[grpc.Channel, timeline_pb2_grpc.TimelineStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, timeline_pb2_grpc.TimelineStub(channel)


def served_by(service: Service, port: int, connections: int = 16) -> set[int]:
    """Which timeline-grpc processes answer: on each of `connections` new connections,
    health (liveness and readiness) and a call (each must succeed), then the processes
    holding their other ends."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own each
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(connections)
    ]
    try:
        for channel in channels:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "timeline.v1.Timeline"):
                check = health_pb2.HealthCheckRequest(service=name)
                # wait_for_ready: a connection the kernel gave a process that had just died
                # is reset, and a client connects again (as a real one does).
                reply = health.Check(check, timeout=10, wait_for_ready=True)
                assert reply.status == SERVING, name
            request = pb.SyncMessageRequest(member="nobody")
            timeline_pb2_grpc.TimelineStub(channel).GetSyncMessage(
                request, timeout=10, wait_for_ready=True
            )
        ours = {
            c.laddr.port
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        }
        serving = set()
        for child in grpc_children(service):
            with_peers = {c.raddr.port for c in child.net_connections("tcp") if c.raddr}
            if with_peers & ours:
                serving.add(child.pid)
        return serving
    finally:
        for channel in channels:
            channel.close()


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.e2e
@pytest.mark.slow
def test_gunicorn_serves_grpc_beside_http_on_the_embedded_default(tmp_path: Path) -> None:
    # Given make run's configuration: nothing but where gRPC listens
    data = tmp_path / "var"
    port = free_port()
    env = clean_env(
        TIMELINE_DATA_DIR=str(data),
        TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"),
        TIMELINE_GRPC_BIND=f"127.0.0.1:{port}",
    )
    service = Service(env, tmp_path / "gunicorn.log").start()
    channel, timeline = stub(port)
    started = grpc_children(service)
    try:
        # gunicorn answers only once timeline-grpc serves: as many processes as its 2 workers,
        # all on the one port, and each of them answers calls
        assert len(started) == 2
        assert service.workers() == 4
        pids = ", ".join(str(child.pid) for child in started)
        assert f"timeline-grpc: 2 processes serving 127.0.0.1:{port} (pids {pids})" in (
            service.log.read_text()
        )
        assert served_by(service, port) == {child.pid for child in started}

        # The same data both ways: sent over gRPC, read over HTTP, and back
        request = pb.SendMessageRequest(**{"from": "a", "to": "b"}, message='{"text":"grpc"}')
        assert timeline.Send(request, timeout=10).sequence == 1
        _, sync = service.request("GET", "/timeline/sync?member=b")
        assert [e["message"] for e in sync["entrySet"]] == ['{"text":"grpc"}']
        body = {"from": "b", "to": "a", "message": {"text": "http"}}
        assert service.request("POST", "/timeline/send", body) == (200, {"sequence": "2"})
        reply = timeline.GetSyncMessage(pb.SyncMessageRequest(member="a"), timeout=10)
        assert [(e.sequence, e.message) for e in reply.entry_set] == [
            (1, '{"text":"grpc"}'),
            (2, '{"text":"http"}'),
        ]
        # Its calls are in the metrics gunicorn's workers serve
        text = service.text("/metrics")
        route = {"route": "grpc:/timeline.v1.Timeline/Send", "method": "GRPC", "status": "200"}
        assert sample(text, "timeline_http_request_duration_seconds_count", **route) == 1
        assert sample(text, "timeline_messages_written_total", kind="history") == 2

        # When one dies, the other serves every call meanwhile, and the master starts it again
        killed, kept = started
        killed.kill()
        eventually(lambda: not running(killed), "the killed process is still there")
        assert killed.pid not in served_by(service, port)
        eventually(lambda: len(grpc_children(service)) == 2, "timeline-grpc was not started again")
        [restarted] = [c for c in grpc_children(service) if c.pid != kept.pid]
        eventually(
            lambda: served_by(service, port) == {kept.pid, restarted.pid},
            "the restarted process does not serve",
        )
        reply = timeline.GetSyncMessage(pb.SyncMessageRequest(member="a"), timeout=10)
        assert [e.sequence for e in reply.entry_set] == [1, 2]
        assert f"timeline-grpc (pid {killed.pid}) exited" in service.log.read_text()

        # A reload (SIGHUP) replaces the HTTP workers and leaves the gRPC processes serving
        serving = {kept.pid, restarted.pid}
        workers = {c.pid for c in psutil.Process(service.process.pid).children()} - serving
        service.process.send_signal(signal.SIGHUP)
        eventually(
            lambda: not workers & {c.pid for c in psutil.Process(service.process.pid).children()},
            "the HTTP workers were not replaced",
        )
        assert {c.pid for c in grpc_children(service)} == serving
        assert served_by(service, port) == serving
    finally:
        channel.close()
        service.stop()
    # gunicorn's exit stopped them all, and then the embedded redis-server they were using
    assert not any(running(child) for child in (kept, restarted))
    assert not (data / "redis.sock").exists()
    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line[:1] == "{"]
    assert [line["msg"] for line in lines].count("timeline-grpc stopped") == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_gunicorn_serves_http_alone_without_grpc_bind(tmp_path: Path) -> None:
    data = tmp_path / "var"
    for bind in ({}, {"TIMELINE_GRPC_BIND": "off"}):
        env = clean_env(TIMELINE_DATA_DIR=str(data), TIMELINE_SQLITE_PATH=str(data / "t.db"))
        service = Service(env | bind, tmp_path / "gunicorn.log").start()
        try:
            assert grpc_children(service) == []
            assert service.workers() == 2
        finally:
            service.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_gunicorn_exits_when_grpc_cannot_start(tmp_path: Path, reuse_port: bool) -> None:
    # Given another process listening on the port: plainly, or as a gRPC server with grpc's
    # defaults does (SO_REUSEPORT, which would let ours bind beside it and share its calls)
    data = tmp_path / "var"
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            TIMELINE_DATA_DIR=str(data),
            TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"),
            TIMELINE_GRPC_BIND=f"127.0.0.1:{port}",
            PORT=str(free_port()),
            HOST="127.0.0.1",
        )
        done = gunicorn_to_the_end(env, timeout=60)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1
    assert lines[-1] == (
        f"timeline: TIMELINE_GRPC_BIND: cannot listen on 127.0.0.1:{port}: another process "
        "listens there; TIMELINE_GRPC_BIND=off serves HTTP alone"
    )
    assert not (data / "redis.sock").exists()  # the embedded redis-server was stopped too


def gunicorn_to_the_end(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """gunicorn serving app:app in this environment, run until it exits by itself."""
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "app:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.e2e
def test_gunicorn_exits_when_a_grpc_process_cannot_start(tmp_path: Path) -> None:
    # Given a store no timeline-grpc process can open (its directory is a file)
    data = tmp_path / "var"
    (tmp_path / "file").write_text("")
    env = clean_env(
        TIMELINE_DATA_DIR=str(data),
        TIMELINE_SQLITE_PATH=str(tmp_path / "file" / "t.sqlite3"),
        TIMELINE_GRPC_BIND=f"127.0.0.1:{free_port()}",
        TIMELINE_GRPC_PROCESSES="2",
        PORT=str(free_port()),
        HOST="127.0.0.1",
    )
    done = gunicorn_to_the_end(env, timeout=90)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1
    assert lines[-1] == (
        "timeline: timeline-grpc did not start (exit status 1; see above); "
        "TIMELINE_GRPC_BIND=off serves HTTP alone"
    )
    assert not (data / "redis.sock").exists()


# --- how many, and where ---------------------------------------------------------------------


def test_as_many_grpc_processes_as_http_workers_unless_set() -> None:
    assert Settings().grpc_process_count(http_workers=2) == 2
    assert Settings().grpc_process_count(http_workers=5) == 5
    assert Settings(grpc_processes=3).grpc_process_count(http_workers=2) == 3
    # a unix socket cannot be shared: one process serves it
    assert Settings(grpc_bind="unix:/tmp/t.sock").grpc_process_count(http_workers=4) == 1
    env = {"TIMELINE_GRPC_PROCESSES": "4", "TIMELINE_GRPC_BIND": "127.0.0.1:9000"}
    assert load_settings(env, config_path=ROOT / "configs" / "timeline.yaml").grpc_processes == 4


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"TIMELINE_GRPC_PROCESSES": "-1"}, "grpc_processes must be between 0"),
        (
            {"TIMELINE_GRPC_PROCESSES": str(GRPC_PROCESSES_MAX + 1)},
            f"grpc_processes must be between 0 .* and {GRPC_PROCESSES_MAX}",
        ),
        (
            {"TIMELINE_GRPC_PROCESSES": "2", "TIMELINE_GRPC_BIND": "unix:/tmp/t.sock"},
            "TIMELINE_GRPC_BIND, TIMELINE_GRPC_PROCESSES: grpc_processes must be 0 or 1",
        ),
    ],
)
def test_a_bad_grpc_processes_is_refused_at_start(env: dict[str, str], complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        load_settings(env, config_path=ROOT / "configs" / "timeline.yaml")


def test_the_port_lease_resolves_port_zero_and_lets_only_sharers_bind() -> None:
    lease = PortLease("127.0.0.1:0")
    try:
        host, _, port = lease.bind.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
        assert lease.shared
        # A server of the deployment (SO_REUSEPORT, as grpc.so_reuseport=1) binds beside it
        with socket.socket() as sharer:
            sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharer.bind(("127.0.0.1", int(port)))
            sharer.listen()
            # ... and then another deployment's lease is refused, whatever its options
            with pytest.raises(StartFailed, match="another process listens there"):
                PortLease(lease.bind)
        # A plain bind is refused while the lease is held
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", int(port)))
    finally:
        lease.release()
    # Released, the port is free again
    with socket.socket() as other:
        other.bind(("127.0.0.1", int(port)))


def test_a_unix_socket_is_not_leased() -> None:
    lease = PortLease("unix:/tmp/timeline-test.sock")
    assert (lease.bind, lease.shared) == ("unix:/tmp/timeline-test.sock", False)
    lease.release()


# --- the deployment files -------------------------------------------------------------------


def test_make_run_serves_grpc_unless_told_otherwise() -> None:
    makefile = (ROOT / "Makefile").read_text()
    [recipe] = re.findall(r"^run: .*\n\t(.*)$", makefile, re.MULTILINE)
    assert recipe == (
        'TIMELINE_GRPC_BIND="$${TIMELINE_GRPC_BIND-127.0.0.1:9000}" $(BIN)/gunicorn app:app'
    )
    # An install follows a changed .proto, as it follows pyproject.toml
    assert "timeline/rpc/v1/timeline.proto" in re.findall(r"^HASH := (.*)$", makefile, re.M)[0]


def test_the_image_and_the_stack_publish_both_as_go_timeline_does() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert "EXPOSE 8000" in dockerfile
    assert "EXPOSE 9000" in dockerfile
    assert any("TIMELINE_GRPC_BIND=0.0.0.0:9000" in line for line in dockerfile)
    # The gRPC code is generated in the image, after the source is copied, never copied in
    copied = next(i for i, line in enumerate(dockerfile) if line.startswith("COPY timeline/"))
    generated = next(i for i, line in enumerate(dockerfile) if "timeline.rpc.codegen" in line)
    assert copied < generated
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "timeline/rpc/v1/timeline_pb2*" in ignored
    health = next(i for i, line in enumerate(dockerfile) if line.startswith("HEALTHCHECK"))
    assert "timeline.rpc.probe" in " ".join(dockerfile[health : health + 4])

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["proxy"]["ports"] == ["9321:8000"]
    assert services["timeline"]["ports"] == ["9322:9000"]
    check = " ".join(services["timeline"]["healthcheck"]["test"])
    assert "/readyz" in check
    assert "timeline.rpc.probe --service timeline.v1.Timeline" in check


def test_the_generated_code_is_never_committed() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "timeline/rpc/v1/timeline_pb2.py"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert ignored.returncode == 0
    for name in ("timeline_pb2_grpc.py", "timeline_pb2.pyi", "timeline_proto.sha256"):
        path = f"timeline/rpc/v1/{name}"
        done = subprocess.run(["git", "check-ignore", "--no-index", path], cwd=ROOT, check=False)
        assert done.returncode == 0, path


def test_a_missing_or_stale_generation_is_refused_at_import(tmp_path: Path) -> None:
    # A copy of the package whose .proto changed after its code was generated
    copy = tmp_path / "timeline"
    subprocess.run(["cp", "-r", str(ROOT / "timeline"), str(copy)], check=True)
    proto = copy / "rpc" / "v1" / "timeline.proto"
    proto.write_text(proto.read_text() + "\n// changed\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMELINE_")}
    env["PYTHONPATH"] = str(tmp_path)
    code = "import timeline.rpc.v1"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert done.returncode == 1
    assert "was generated from another timeline.proto" in done.stderr.decode()
    for generated in (copy / "rpc" / "v1").glob("timeline_pb2*"):
        generated.unlink()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert "the gRPC code is not generated" in done.stderr.decode()
    # Generation puts it right
    subprocess.run(
        [sys.executable, "-m", "timeline.rpc.codegen"], cwd=tmp_path, env=env, check=True
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
