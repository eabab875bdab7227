"""`make smoke`: an installed timeline, alone, serves the seed scenario over HTTP and gRPC.

Run by the Python of an environment that holds a wheel of timeline and nothing of the
checkout (the Makefile builds it, with requirements/lowest.txt by default: the lowest
versions pyproject.toml allows), from a directory outside the checkout. Standard library,
grpcio and the installed package only: no pytest, no test helpers.

1. The package imported is the installed one (not a checkout on sys.path).
2. `gunicorn -c python:timeline.gunicorn_conf 'timeline.factory:create_app()'` (the README's
   way to serve an installed package: our worker and settings, the embedded default, and
   timeline-grpc beside the workers) serves go-timeline's seed scenario over HTTP, then a
   send and a sync over gRPC.
3. `timeline-grpc` alone, on the same data, serves a send that follows on from them.

Exit status 0 when every step gave what it should; otherwise the step and what it got.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
START_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def expect(step: str, got: object, wanted: object) -> None:
    if got != wanted:
        sys.exit(f"smoke: {step}: got {got!r}, wanted {wanted!r}")
    print(f"smoke: {step}: ok")


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"smoke: gunicorn exited with status {process.returncode} before serving")
        try:
            if http(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"smoke: gunicorn did not serve /readyz within {START_S:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        sys.exit("smoke: a server did not stop within 30 s of SIGTERM")


def grpc_stub(port: int) -> Any:
    import grpc

    from timeline.rpc.v1 import timeline_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=START_S)
    return timeline_pb2_grpc.TimelineStub(channel)


def texts(entries: list[dict[str, Any]]) -> list[str]:
    return [json.loads(entry["message"])["text"] for entry in entries]


def seed_over_http(port: int) -> None:
    """go-timeline's seed scenario, as the README runs it."""
    hello = json.dumps({"text": "吃了吗？"})
    expect(
        "send a->b",
        http(port, "/timeline/send", {"from": "a", "to": "b", "message": hello}),
        (200, {"sequence": "1"}),
    )
    expect(
        "send b->a",
        http(port, "/timeline/send", {"from": "b", "to": "a", "message": {"text": "吃了"}}),
        (200, {"sequence": "2"}),
    )
    group = {"group_name": "group_a", "group_members": ["a", "c", "d"]}
    expect(
        "sendGroup",
        http(port, "/timeline/sendGroup", {**group, "message": json.dumps({"text": "大家好"})}),
        (200, {"failedMembers": []}),
    )
    status, sync = http(port, "/timeline/sync?member=a&last_read=0&count=10")
    expect("sync a", (status, sync["latestSeq"], texts(sync["entrySet"])), (200, "3", [
        "吃了吗？", "吃了", "大家好"]))  # fmt: skip
    status, single = http(port, "/timeline/history/single/b/a?last_read=0&count=10")
    expect("history b/a", (status, texts(single["entrySet"])), (200, ["吃了吗？", "吃了"]))
    status, history = http(port, "/timeline/history/group/group_a")
    expect("history group_a", (status, texts(history["entrySet"])), (200, ["大家好"]))


def send_over_grpc(port: int, text: str, sequence: int) -> None:
    from timeline.rpc.v1 import timeline_pb2

    stub = grpc_stub(port)
    message = json.dumps({"text": text})
    reply = stub.Send(timeline_pb2.SendMessageRequest(to="c", message=message, **{"from": "a"}))
    expect(f"gRPC Send a->c ({text})", reply.sequence, sequence)
    sync = stub.GetSyncMessage(timeline_pb2.SyncMessageRequest(member="c", last_read=0))
    expect(
        f"gRPC GetSyncMessage c ({text})",
        [json.loads(entry.message)["text"] for entry in sync.entry_set][-1],
        text,
    )


def main() -> None:
    import timeline

    where = Path(timeline.__file__).resolve()
    if not where.is_relative_to(Path(sys.prefix).resolve()):
        sys.exit(f"smoke: timeline was imported from {where}, not from the environment")
    print(f"smoke: timeline from {where.parent}")
    names = ("gunicorn", "flask", "redis", "pymongo", "grpcio", "protobuf", "orjson")
    print("smoke: " + ", ".join(f"{name} {metadata.version(name)}" for name in names))

    work = Path(tempfile.mkdtemp(prefix="timeline-smoke-"))
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(http_port),
        "TIMELINE_GRPC_BIND": f"127.0.0.1:{grpc_port}",
        "TIMELINE_DATA_DIR": str(work / "var"),
    }
    env.pop("TIMELINE_REDIS_URL", None)
    command = [str(BIN / "gunicorn"), "-c", "python:timeline.gunicorn_conf"]
    gunicorn = subprocess.Popen([*command, "timeline.factory:create_app()"], cwd=work, env=env)
    try:
        wait_ready(http_port, gunicorn)
        seed_over_http(http_port)
        send_over_grpc(grpc_port, "grpc under gunicorn", 2)
    finally:
        stop(gunicorn)

    grpc_alone = subprocess.Popen([str(BIN / "timeline-grpc")], cwd=work, env=env)
    try:
        send_over_grpc(grpc_port, "timeline-grpc alone", 3)
    finally:
        stop(grpc_alone)
    print("smoke: passed")


if __name__ == "__main__":
    main()
