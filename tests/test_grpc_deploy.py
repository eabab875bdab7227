"""gRPC beside HTTP, as `make run` and the image serve them: gunicorn's master runs
timeline-grpc when TIMELINE_GRPC_BIND is set, starts it again when it dies and stops it on
exit; and the deployment files publish both."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from support import free_port, sample
from test_e2e import ROOT, Service, clean_env
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.rpc.v1 import timeline_pb2_grpc


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
    try:
        # gunicorn answers only once timeline-grpc serves: it is there, beside 2 workers
        [child] = grpc_children(service)
        assert service.workers() == 3

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

        # When it dies, the master starts it again, on the same data
        child.kill()
        deadline = time.monotonic() + 20
        while True:
            restarted = [c for c in grpc_children(service) if c.pid != child.pid]
            if restarted:
                try:
                    reply = timeline.GetSyncMessage(pb.SyncMessageRequest(member="a"), timeout=2)
                    break
                except grpc.RpcError:
                    pass
            assert time.monotonic() < deadline, "timeline-grpc was not started again"
            time.sleep(0.1)
        assert [e.sequence for e in reply.entry_set] == [1, 2]
        assert "timeline-grpc (pid" in service.log.read_text()
    finally:
        channel.close()
        service.stop()
    # gunicorn's exit stopped it, and then the embedded redis-server it was using
    assert not psutil.pid_exists(restarted[0].pid) or restarted[0].status() == "zombie"
    assert not (data / "redis.sock").exists()
    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line[:1] == "{"]
    assert "timeline-grpc stopped" in [line["msg"] for line in lines]


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
def test_gunicorn_exits_when_grpc_cannot_start(tmp_path: Path) -> None:
    data = tmp_path / "var"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env(
            TIMELINE_DATA_DIR=str(data),
            TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"),
            TIMELINE_GRPC_BIND=f"127.0.0.1:{taken.getsockname()[1]}",
            PORT=str(free_port()),
            HOST="127.0.0.1",
        )
        done = subprocess.run(
            [sys.executable, "-m", "gunicorn", "app:app"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1
    assert lines[-1] == (
        "timeline: timeline-grpc did not start (exit status 1; see above); "
        "TIMELINE_GRPC_BIND=off serves HTTP alone"
    )
    assert any("TIMELINE_GRPC_BIND: cannot listen on" in line for line in lines)
    assert not (data / "redis.sock").exists()  # the embedded redis-server was stopped too


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
