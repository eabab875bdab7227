"""The gRPC API against go-timeline's contract: the .proto is wire-compatible with go-timeline's
(tests/data/go_timeline.proto), and a client generated from go-timeline's alone drives
`timeline-grpc`, the console script, running as a process of its own, beside the HTTP API
on the same Redis and store."""

from __future__ import annotations

import importlib.resources
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from support import free_port, sample
from timeline.factory import create_app
from timeline.rpc.v1 import timeline_pb2
from timeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
OURS = ROOT / "timeline" / "rpc" / "v1" / "timeline.proto"
THEIRS = DATA / "go_timeline.proto"
SCRIPTS = Path(sys.executable).parent
SEED_TEXTS = ["吃了吗？", "吃了", "大家好", "报三围", "初次见面，多多指教"]


# --- the contract: same packages, names, numbers, types ------------------------------------


def compiled(proto: Path, directory: Path) -> descriptor_pb2.FileDescriptorProto:
    """`proto` as protoc reads it (grpcio-tools' own protoc)."""
    out = directory / f"{proto.stem}.descriptors"
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"--proto_path={proto.parent}",
            f"--proto_path={well_known}",
            f"--descriptor_set_out={out}",
            str(proto),
        ]
    )
    assert status == 0, f"protoc failed on {proto}"
    found = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [file] = [f for f in found.file if f.name == proto.name]
    return file


FIELD_PARTS = ("name", "number", "type", "type_name", "label", "json_name", "proto3_optional")


def incompatibilities(
    theirs: descriptor_pb2.FileDescriptorProto, ours: descriptor_pb2.FileDescriptorProto
) -> list[str]:
    """Every part of go-timeline's interface that ours lacks or holds differently: the
    package, each message's fields (name, number, type, label), each enum's values, each
    service's methods (request, reply, streaming). Additions are allowed, in new numbers."""
    problems: list[str] = []
    if theirs.package != ours.package:
        problems.append(f"package {ours.package!r}, not {theirs.package!r}")
    messages = {m.name: m for m in ours.message_type}
    for message in theirs.message_type:
        mine = messages.get(message.name)
        if mine is None:
            problems.append(f"message {message.name} missing")
            continue
        by_number = {f.number: f for f in mine.field}
        by_name = {f.name: f for f in mine.field}
        for field in message.field:
            other = by_number.get(field.number) or by_name.get(field.name)
            if other is None:
                problems.append(f"{message.name}.{field.name} = {field.number} missing")
                continue
            for part in FIELD_PARTS:
                if getattr(field, part) != getattr(other, part):
                    problems.append(
                        f"{message.name}.{field.name}: {part} {getattr(other, part)!r}, not "
                        f"{getattr(field, part)!r}"
                    )
        taken = {f.number for f in message.field}
        for reserved in message.reserved_range:
            taken.update(range(reserved.start, reserved.end))
        for field in mine.field:
            if field.number not in {f.number for f in message.field} and field.number in taken:
                problems.append(f"{message.name}.{field.name} reuses number {field.number}")
    enums = {e.name: e for e in ours.enum_type}
    for enum in theirs.enum_type:
        mine_enum = enums.get(enum.name)
        if mine_enum is None:
            problems.append(f"enum {enum.name} missing")
            continue
        values = {v.name: v.number for v in mine_enum.value}
        for value in enum.value:
            if values.get(value.name) != value.number:
                problems.append(f"{enum.name}.{value.name} = {value.number} missing")
    services = {s.name: s for s in ours.service}
    for service in theirs.service:
        mine_service = services.get(service.name)
        if mine_service is None:
            problems.append(f"service {service.name} missing")
            continue
        methods = {m.name: m for m in mine_service.method}
        for method in service.method:
            other_method = methods.get(method.name)
            if other_method is None:
                problems.append(f"{service.name}.{method.name} missing")
                continue
            for part in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(method, part) != getattr(other_method, part):
                    problems.append(f"{service.name}.{method.name}: {part} differs")
    return problems


def test_the_proto_holds_go_timelines_interface_unchanged(tmp_path: Path) -> None:
    theirs, ours = compiled(THEIRS, tmp_path), compiled(OURS, tmp_path)
    assert incompatibilities(theirs, ours) == []
    # Not a vacuous check: the contract is all there, and our extensions are beyond it
    assert [m.name for m in theirs.service[0].method] == [
        "Send",
        "SendGroup",
        "GetSyncMessage",
        "GetSingleHistoryMessage",
        "GetGroupHistoryMessage",
    ]
    assert len(theirs.message_type) == 11
    added = {m.name: [f.name for f in m.field] for m in ours.message_type}
    assert added["SyncMessageReply"] == ["latest_seq", "entry_set_last_seq", "entry_set", "min_seq"]
    assert added["TimelineEntry"] == [
        "sequence",
        "message",
        "timestamp",
        "type",
        "conversation",
        "conversation_seq",
    ]
    assert added["SyncMessageRequest"] == ["member", "last_read", "count", "wait_ms", "device"]
    assert added["SubscribeRequest"] == ["member", "last_read", "device"]
    [subscribe] = [m for m in ours.service[0].method if m.name == "Subscribe"]
    assert (subscribe.output_type, subscribe.server_streaming) == (
        ".timeline.v1.SyncMessageReply",
        True,
    )


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda f: setattr(f, "package", "timeline.v2"), "package"),
        (lambda f: setattr(f.message_type[0].field[0], "number", 9), "SendMessageRequest.from"),
        (lambda f: setattr(f.message_type[1].field[0], "type", 5), "sequence: type"),  # int32
        (lambda f: setattr(f.message_type[3].field[0], "label", 1), "failed_members: label"),
        (lambda f: setattr(f.message_type[0].field[2], "name", "msg"), "message"),
        (lambda f: f.service[0].method.pop(4), "GetGroupHistoryMessage missing"),
        (lambda f: setattr(f.service[0].method[0], "output_type", ".x.Y"), "output_type"),
        (lambda f: setattr(f.enum_type[-1].value[2], "number", 7), "TIMELINE_INVALID_PARAM"),
    ],
)
def test_the_check_finds_a_change_to_the_contract(
    tmp_path: Path, change: Any, complaint: str
) -> None:
    theirs, ours = compiled(THEIRS, tmp_path), compiled(OURS, tmp_path)
    by_name = {m.name: i for i, m in enumerate(ours.message_type)}
    # Index ours the way the changes do: go-timeline's order of messages
    ordered = descriptor_pb2.FileDescriptorProto()
    ordered.CopyFrom(ours)
    del ordered.message_type[:]
    for message in theirs.message_type:
        ordered.message_type.add().CopyFrom(ours.message_type[by_name[message.name]])
    enums = [e for e in ours.enum_type if e.name == "ErrorReason"]
    del ordered.enum_type[:]
    ordered.enum_type.extend(enums)
    change(ordered)
    problems = incompatibilities(theirs, ordered)
    assert any(complaint in problem for problem in problems), problems


def test_the_generated_code_is_the_proto_as_it_is(tmp_path: Path) -> None:
    # The modules the install generated describe the .proto of the working tree
    loaded = descriptor_pb2.FileDescriptorProto.FromString(timeline_pb2.DESCRIPTOR.serialized_pb)
    current = compiled(OURS, tmp_path)
    current.name = loaded.name  # protoc names it by its path from the include root
    for file in (loaded, current):  # json_name is derived from name, and embedded or not
        for message in file.message_type:
            for field in message.field:
                field.ClearField("json_name")
    assert loaded == current


# --- timeline-grpc, a process of its own, and a go-timeline client -------------------------


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMELINE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env | values


class GrpcProcess:
    """`timeline-grpc`, the console script, on a free port."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {"TIMELINE_GRPC_BIND": self.address} | env
        self.log = log
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GrpcProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(SCRIPTS / "timeline-grpc"), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while health(self.address) != health_pb2.HealthCheckResponse.SERVING:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"timeline-grpc did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> int:
        status = 0
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(20)
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait(10)
                self.process = None
        return status


def health(address: str, service: str = "") -> int | None:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            status: int = check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None
    return status


@pytest.fixture(scope="module")
def go_timeline_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """go-timeline's stubs, generated from its contract alone (protoc's Python plugins)."""
    directory = tmp_path_factory.mktemp("go_timeline_stubs")
    status = protoc.main(
        [
            "protoc",
            f"--proto_path={DATA}",
            f"--python_out={directory}",
            f"--grpc_python_out={directory}",
            str(THEIRS),
        ]
    )
    assert status == 0
    return directory


def go_timeline_client(stubs: Path, address: str, calls: list[dict[str, Any]]) -> list[Any]:
    """Run the calls with go-timeline's client, in a process that never imports ours."""
    done = subprocess.run(
        [sys.executable, str(DATA / "go_timeline_client.py"), str(stubs), address],
        input=json.dumps(calls).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    replies: list[Any] = json.loads(done.stdout)
    return replies


def call(method: str, **request: Any) -> dict[str, Any]:
    return {"method": method, "request": request}


def message(text: str) -> str:
    """A message as go-timeline's clients send it, and as it is read back: compact JSON."""
    return json.dumps({"text": text}, ensure_ascii=False, separators=(",", ":"))


@pytest.fixture
def grpc_process(tmp_path: Path, settings: Settings) -> Iterator[GrpcProcess]:
    env = clean_env(
        TIMELINE_REDIS_URL=str(settings.redis_url),
        TIMELINE_REDIS_KEY_PREFIX=settings.redis_key_prefix,
        TIMELINE_SQLITE_PATH=settings.sqlite_path,
        TIMELINE_DATA_DIR=settings.data_dir,
    )
    running = GrpcProcess(env, tmp_path / "timeline-grpc.log").start()
    yield running
    assert running.stop() == 0, running.log.read_text()


def test_a_go_timeline_client_runs_the_seed_against_timeline_grpc(
    grpc_process: GrpcProcess, go_timeline_stubs: Path, settings: Settings
) -> None:
    # Given the seed's conversation, sent by a client that knows only go-timeline's proto
    seed = [
        call("Send", **{"from": "a", "to": "b", "message": message(SEED_TEXTS[0])}),
        call("Send", **{"from": "b", "to": "a", "message": message(SEED_TEXTS[1])}),
        *(
            call(
                "SendGroup", group_name="group_a", group_members=["a", "c", "d"], message=message(t)
            )
            for t in SEED_TEXTS[2:]
        ),
        call("GetSyncMessage", member="a", last_read="0", count=10),
        call("GetSingleHistoryMessage", **{"from": "b", "to": "a"}),
        call("GetGroupHistoryMessage", group="group_a", last_read="0", count=10),
        call("Send", **{"from": "a"}),
    ]
    replies = go_timeline_client(go_timeline_stubs, grpc_process.address, seed)

    def entries(first: int, texts: list[str]) -> list[dict[str, str]]:
        return [
            {"sequence": str(seq), "message": message(text)}
            for seq, text in enumerate(texts, start=first)
        ]

    # Then it gets go-timeline's answers, field for field (ours are unknown to it, and dropped)
    assert replies == [
        {"reply": {"sequence": "1"}},
        {"reply": {"sequence": "2"}},
        {"reply": {"failed_members": []}},
        {"reply": {"failed_members": []}},
        {"reply": {"failed_members": []}},
        {
            "reply": {
                "latest_seq": "5",
                "entry_set_last_seq": "5",
                "entry_set": entries(1, SEED_TEXTS),
            }
        },
        {"reply": {"entry_set": entries(1, SEED_TEXTS[:2])}},
        {"reply": {"entry_set": entries(1, SEED_TEXTS[2:])}},
        {
            "error": {
                "code": "INVALID_ARGUMENT",
                "message": "to is required",
                "reason": "TIMELINE_INVALID_PARAM",
                "metadata": {"field": "to"},
            }
        },
    ]

    # And the HTTP API, on the same Redis and store, serves the same data
    http = create_app(settings).test_client()
    over_http = http.get("/timeline/sync?member=a&last_read=0&count=10").get_json()
    assert [
        {"sequence": e["sequence"], "message": e["message"]} for e in over_http["entrySet"]
    ] == entries(1, SEED_TEXTS)
    # And a message sent over HTTP is read over gRPC, its sequences following on
    reply = http.post("/timeline/send", json={"from": "a", "to": "b", "message": message("http")})
    assert reply.get_json() == {"sequence": "3"}
    replies = go_timeline_client(
        go_timeline_stubs,
        grpc_process.address,
        [
            call("GetSyncMessage", member="b", last_read="2"),
            call("GetSyncMessage", member="a", last_read="5"),
            call("GetSingleHistoryMessage", **{"from": "a", "to": "b"}, last_read="2"),
            call("Send", **{"from": "b", "to": "a", "message": message("grpc")}),
        ],
    )
    assert replies == [
        {
            "reply": {
                "latest_seq": "3",
                "entry_set_last_seq": "3",
                "entry_set": entries(3, ["http"]),
            }
        },
        {
            "reply": {
                "latest_seq": "6",
                "entry_set_last_seq": "6",
                "entry_set": entries(6, ["http"]),
            }
        },
        {"reply": {"entry_set": entries(3, ["http"])}},
        {"reply": {"sequence": "7"}},
    ]
    history = http.get("/timeline/history/single/a/b").get_json()["entrySet"]
    assert [json.loads(e["message"])["text"] for e in history] == [*SEED_TEXTS[:2], "http", "grpc"]

    # Its metrics are where a gunicorn on the same data directory reads its workers' from
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(Path(settings.data_dir) / "metrics"))
    text = generate_latest(registry).decode()
    send = {"route": "grpc:/timeline.v1.Timeline/Send", "method": "GRPC"}
    assert sample(text, "timeline_http_request_duration_seconds_count", **send, status="200") == 3
    assert sample(text, "timeline_http_request_duration_seconds_count", **send, status="400") == 1
    assert sample(text, "timeline_messages_written_total", kind="history") == 6


def test_the_probe_answers_for_the_running_server(grpc_process: GrpcProcess) -> None:
    env = grpc_process.env
    for args in ([], ["--service", "timeline.v1.Timeline"]):
        done = subprocess.run(
            [sys.executable, "-m", "timeline.rpc.probe", *args],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
    stopped = env | {"TIMELINE_GRPC_BIND": f"127.0.0.1:{free_port()}"}
    done = subprocess.run(
        [sys.executable, "-m", "timeline.rpc.probe", "--timeout", "0.5"],
        env=stopped,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.decode().startswith("timeline-grpc at 127.0.0.1:")
    off = env | {"TIMELINE_GRPC_BIND": "off"}
    done = subprocess.run(
        [sys.executable, "-m", "timeline.rpc.probe"], env=off, capture_output=True, check=False
    )
    assert done.returncode == 0  # nothing served, nothing to check


def test_sigterm_stops_it_gracefully_and_frees_the_port(tmp_path: Path, settings: Settings) -> None:
    env = clean_env(
        TIMELINE_REDIS_URL=str(settings.redis_url),
        TIMELINE_SQLITE_PATH=settings.sqlite_path,
        TIMELINE_DATA_DIR=settings.data_dir,
    )
    running = GrpcProcess(env, tmp_path / "log").start()
    assert running.stop() == 0
    lines = [json.loads(line) for line in running.log.read_text().splitlines()]
    assert [line["msg"] for line in lines][-2:] == [
        "timeline-grpc: SIGTERM received, stopping",
        "timeline-grpc stopped",
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", running.port))  # free again


def test_it_stops_when_its_parent_is_gone(tmp_path: Path, settings: Settings) -> None:
    # What gunicorn's master passes: its pid. A process that is not the parent is "gone".
    env = clean_env(
        TIMELINE_REDIS_URL=str(settings.redis_url),
        TIMELINE_SQLITE_PATH=settings.sqlite_path,
        TIMELINE_DATA_DIR=settings.data_dir,
    )
    running = GrpcProcess(env, tmp_path / "log", "--parent-pid", "1").start()
    assert running.process is not None
    assert running.process.wait(15) == 0
    assert "its parent process 1 is gone" in running.log.read_text()


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"TIMELINE_GRPC_BIND": "9000"},
            "timeline: TIMELINE_GRPC_BIND: grpc_bind must be host:port (127.0.0.1:9000, "
            "0.0.0.0:9000, [::]:9000), unix:/path or off, got '9000'",
        ),
        (
            {"TIMELINE_GRPC_BIND": "::1:9000"},
            "timeline: TIMELINE_GRPC_BIND: grpc_bind must be host:port (127.0.0.1:9000, "
            "0.0.0.0:9000, [::]:9000), unix:/path or off, got '::1:9000'",
        ),
        (
            {"TIMELINE_GRPC_BIND": "off"},
            "timeline: TIMELINE_GRPC_BIND is off: timeline-grpc has nothing to serve",
        ),
        (
            {"TIMELINE_GRPC_BND": "127.0.0.1:9000"},
            "timeline: TIMELINE_GRPC_BND is not a timeline setting; did you mean "
            "TIMELINE_GRPC_BIND?",
        ),
    ],
)
def test_a_bad_setting_stops_it_with_one_line(
    tmp_path: Path, variables: dict[str, str], line: str
) -> None:
    env = clean_env(TIMELINE_DATA_DIR=str(tmp_path / "var"), **variables)
    done = subprocess.run(
        [str(SCRIPTS / "timeline-grpc")], env=env, capture_output=True, timeout=30, check=False
    )
    assert (done.returncode, done.stderr.decode()) == (1, line + "\n")


def test_an_address_in_use_stops_it_with_one_line(tmp_path: Path, settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            TIMELINE_REDIS_URL=str(settings.redis_url),
            TIMELINE_SQLITE_PATH=settings.sqlite_path,
            TIMELINE_DATA_DIR=settings.data_dir,
            TIMELINE_GRPC_BIND=f"127.0.0.1:{port}",
        )
        done = subprocess.run(
            [str(SCRIPTS / "timeline-grpc")], env=env, capture_output=True, timeout=30, check=False
        )
    assert done.returncode == 1
    assert done.stderr.decode().splitlines()[-1] == (
        f"timeline: TIMELINE_GRPC_BIND: cannot listen on 127.0.0.1:{port} (in use, or not an "
        "address of this machine)"
    )
