"""Deployment files, checked as far as a machine without a Docker engine can: they parse,
name images new enough, and agree with the service's own settings. The scripts the compose
file runs in MongoDB's shell (the replica set's initiation, the members' health check) run
here under node with mongosh's globals stubbed, when node is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from support import free_port
from timeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
#: The replica set's members, and the one-shot steps that prepare it.
MEMBERS = ["mongo", "mongo2", "mongo3"]
ONE_SHOTS = {"mongo-keyfile", "mongo-init"}
RELEASE_CHECKS = ROOT / "scripts" / "mongo-release-checks.sh"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def version(image: str) -> tuple[int, ...]:
    tag = image.rpartition(":")[2]
    match = re.match(r"(\d+)(?:\.(\d+))?", tag)
    assert match, f"{image} has no version tag"
    return tuple(int(part or 0) for part in match.groups())


def option(command: list[str], name: str) -> str:
    """The value of `--name value` in a command."""
    assert command.count(name) == 1, (name, command)
    return command[command.index(name) + 1]


def test_compose_has_the_services_with_health_checks() -> None:
    assert set(SERVICES) == {"proxy", "timeline", "redis", *MEMBERS, *ONE_SHOTS}
    for name, service in SERVICES.items():
        if name in ONE_SHOTS:
            # Run to the end at each `up`; never restarted, so no health to check.
            assert service["restart"] == "no", name
            assert "healthcheck" not in service, name
            continue
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name


def test_one_shot_steps_are_waited_for_until_they_complete() -> None:
    # Whoever needs a one-shot step waits for it to exit 0, and `docker compose up --wait`
    # (make up) then waits for it to complete instead of failing when it exits.
    waits = {
        (name, dependency): spec["condition"]
        for name, service in SERVICES.items()
        for dependency, spec in service.get("depends_on", {}).items()
        if dependency in ONE_SHOTS
    }
    assert waits == {
        **{(member, "mongo-keyfile"): "service_completed_successfully" for member in MEMBERS},
        ("timeline", "mongo-init"): "service_completed_successfully",
    }


def test_images_meet_the_minimum_versions() -> None:
    mongo_images = {SERVICES[name]["image"] for name in [*MEMBERS, *ONE_SHOTS]}
    assert len(mongo_images) == 1  # every member, and the shell of the steps, one version
    [image] = mongo_images
    assert image.startswith("mongo:")
    assert version(image) >= (5, 0)
    assert version(SERVICES["redis"]["image"]) >= (6, 2)


def test_timeline_is_built_here_and_waits_for_healthy_dependencies() -> None:
    timeline = SERVICES["timeline"]
    assert timeline["build"] == "."
    assert timeline["ports"] == ["9322:9000"]  # gRPC only: HTTP goes through the proxy
    assert SERVICES["proxy"]["ports"] == ["9321:8000"]  # as the seed maps it
    # The set initiated with a primary, every member in it, and Redis.
    assert timeline["depends_on"] == {
        "mongo-init": {"condition": "service_completed_successfully"},
        **{member: {"condition": "service_healthy"} for member in MEMBERS},
        "redis": {"condition": "service_healthy"},
    }


def test_the_service_environment_names_real_settings() -> None:
    environment = SERVICES["timeline"]["environment"]
    known = {f"TIMELINE_{f.name.upper()}" for f in fields(Settings)}
    names = {name for name in environment if name.startswith("TIMELINE_")}
    assert names <= known
    assert {"TIMELINE_MONGO_URI", "TIMELINE_REDIS_URL"} <= names
    assert environment["TIMELINE_REDIS_URL"].startswith("redis://:")
    assert "@redis:6379/" in environment["TIMELINE_REDIS_URL"]


def test_the_mongo_uri_names_every_member_and_the_replica_set() -> None:
    raw = SERVICES["timeline"]["environment"]["TIMELINE_MONGO_URI"]
    # compose's ${NAME:?message} by NAME, so that their "?" is not read as the query's.
    uri = urlsplit(re.sub(r"\$\{(\w+):\?[^}]*\}", r"\1", raw))
    assert uri.scheme == "mongodb"
    credentials, _, hosts = uri.netloc.rpartition("@")
    assert credentials == "MONGO_ROOT_USERNAME:MONGO_ROOT_PASSWORD"
    assert hosts.split(",") == [f"{member}:27017" for member in MEMBERS]
    query = parse_qs(uri.query)
    set_name = option(SERVICES["mongo"]["command"], "--replSet")
    assert query == {"replicaSet": [set_name], "authSource": ["admin"]}
    # Nothing the service overrides (it warns): reads on the primary, journaled majority.
    assert not {"readPreference", "w", "journal"} & set(query)


def test_credentials_come_from_env_and_the_example_defines_them_all() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"MONGO_ROOT_USERNAME", "MONGO_ROOT_PASSWORD", "REDIS_PASSWORD"} <= required
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example)
    assert set(re.findall(r"\$\{(\w+)", text)) <= set(example)
    assert not re.search(r"PASSWORD[=:]\s*[\"']?\w", text)  # no literal password in compose


def test_data_lives_in_named_volumes() -> None:
    mounts = {
        member: dict(v.split(":")[1::-1] for v in SERVICES[member]["volumes"]) for member in MEMBERS
    }
    # Each member its own data and config volumes (mongo keeps the standalone's names).
    data = [mounts[member]["/data/db"] for member in MEMBERS]
    config = [mounts[member]["/data/configdb"] for member in MEMBERS]
    assert data == ["mongo_data", "mongo2_data", "mongo3_data"]
    assert config == ["mongo_config", "mongo2_config", "mongo3_config"]
    assert set(COMPOSE["volumes"]) >= {*data, *config, "mongo_keyfile", "redis_data"}
    assert "redis_data:/data" in SERVICES["redis"]["volumes"]


def test_redis_is_persistent_passworded_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert "--requirepass" in command
    config_mount = next(v for v in redis["volumes"] if v.startswith("./configs/"))
    source, target = config_mount.split(":")[:2]
    assert target in command
    config = dict(
        line.split(None, 1)
        for line in (ROOT / source).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["dir"] == "/data"


def test_mongo_has_root_credentials_on_the_initiating_member_alone() -> None:
    environment = SERVICES["mongo"]["environment"]
    assert {"MONGO_INITDB_ROOT_USERNAME", "MONGO_INITDB_ROOT_PASSWORD"} <= set(environment)
    # The others start empty: a set is initiated only with members holding no data, and
    # they receive the user by initial sync.
    for member in MEMBERS[1:]:
        assert "environment" not in SERVICES[member], member


def test_the_members_form_one_replica_set_authenticated_by_a_key_file() -> None:
    commands = [SERVICES[member]["command"] for member in MEMBERS]
    assert commands[0] == commands[1] == commands[2]
    command = commands[0]
    assert command[0] == "mongod"
    assert option(command, "--replSet") == "rs0"
    assert "--bind_ip_all" in command
    key = option(command, "--keyFile")
    key_dir = key.rpartition("/")[0]
    for member in MEMBERS:
        # The key comes from the volume mongo-keyfile writes, read-only; nothing from here.
        assert f"mongo_keyfile:{key_dir}:ro" in SERVICES[member]["volumes"], member
        assert not [v for v in SERVICES[member]["volumes"] if v.startswith((".", "/"))]


def test_the_key_file_is_made_at_run_time_and_never_committed() -> None:
    keyfile = SERVICES["mongo-keyfile"]
    [script] = keyfile["command"]
    [mount] = keyfile["volumes"]
    volume, directory = mount.split(":")
    assert volume == "mongo_keyfile"
    key_name = option(SERVICES["mongo"]["command"], "--keyFile").rpartition("/")[2]
    assert f"cd {directory}" in script
    # Made once (the members share it for the life of the volume), from the kernel's
    # random source, then owned by the image's mongodb user (uid 999), readable by it alone.
    assert f"if [ ! -s {key_name} ]; then" in script
    assert "/dev/urandom" in script
    assert f"chown 999:999 {key_name}" in script
    assert f"chmod 400 {key_name}" in script
    assert "$" not in script  # compose would read it as a variable
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not [
        path
        for path in tracked
        if re.search(r"(^|/)[^/]*key(file)?$|\.key$|\.pem$", path, re.IGNORECASE)
    ]


def test_the_init_step_initiates_the_members_once() -> None:
    init = SERVICES["mongo-init"]
    assert init["image"] == SERVICES["mongo"]["image"]
    assert init["depends_on"] == {m: {"condition": "service_started"} for m in MEMBERS}
    [script] = init["command"]
    assert "$" not in script  # compose would read it as a variable
    # Run on the member holding the root user, with its credentials from the environment.
    assert "mongodb://mongo:27017/" in script
    assert set(init["environment"]) == {"MONGO_USER", "MONGO_PASSWORD"}
    assert "process.env.MONGO_PASSWORD" in script
    # The guard: replSetGetStatus first, replSetInitiate only on NotYetInitialized (94).
    assert script.index("replSetGetStatus") < script.index("found.code === 94")
    assert script.index("found.code === 94") < script.index("replSetInitiate")
    # The members it initiates are the URI's hosts, in the set the members are started in.
    hosts = re.findall(r'host: "([\w-]+:\d+)"', script)
    assert hosts == [f"{member}:27017" for member in MEMBERS]
    assert f'_id: "{option(SERVICES["mongo"]["command"], "--replSet")}"' in script


def run_node(script: str, prelude: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The script under node, after a prelude that stands in for mongosh's globals."""
    path = tmp_path / "script.js"
    path.write_text(prelude + "\n" + script)
    assert NODE is not None
    return subprocess.run(
        [NODE, str(path)], capture_output=True, text=True, timeout=30, check=False
    )


INIT_PRELUDE = """
const scenario = JSON.parse(process.env.SCENARIO);
const calls = [];
globalThis.print = (...args) => console.log(...args);
globalThis.sleep = () => {};
let connects = 0;
globalThis.connect = (uri) => {
    calls.push(["connect", uri]);
    if (connects++ < scenario.unreachable) throw new Error("connection refused");
    return {
        auth: (user, password) => calls.push(["auth", user, password]),
        getSiblingDB: (name) => ({
            runCommand: (command) => {
                const verb = Object.keys(command)[0];
                calls.push([verb, name, command[verb]]);
                const answer = (scenario[verb] || []).shift() || scenario[verb + "Default"];
                if (answer.throw) throw Object.assign(new Error(answer.throw.errmsg), answer.throw);
                return answer;
            },
        }),
    };
};
process.on("exit", () => console.log("CALLS " + JSON.stringify(calls)));
"""
PRIMARY = {"ok": 1, "members": [{"stateStr": "PRIMARY"}, {"stateStr": "SECONDARY"}]}
NOT_YET = {"throw": {"code": 94, "errmsg": "no replset config has been received"}}


def run_init(tmp_path: Path, **scenario: Any) -> tuple[int, list[list[Any]], str]:
    [script] = SERVICES["mongo-init"]["command"]
    scenario = {"unreachable": 0, "replSetGetStatusDefault": PRIMARY} | scenario
    env = {
        **os.environ,
        "SCENARIO": json.dumps(scenario),
        "MONGO_USER": "root",
        "MONGO_PASSWORD": "pw",
    }
    path = tmp_path / "init.js"
    path.write_text(INIT_PRELUDE + "\n" + script)
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(path)], capture_output=True, text=True, timeout=30, check=False, env=env
    )
    [line] = [x for x in done.stdout.splitlines() if x.startswith("CALLS ")]
    calls = json.loads(line.removeprefix("CALLS "))
    return done.returncode, calls, done.stdout + done.stderr


@needs_node
def test_the_init_step_initiates_a_new_set_and_waits_for_a_primary(tmp_path: Path) -> None:
    code, calls, output = run_init(
        tmp_path,
        unreachable=2,  # mongo still creating its root user
        replSetGetStatus=[NOT_YET, {"ok": 1, "members": [{"stateStr": "STARTUP2"}]}],
        replSetInitiate=[{"ok": 1}],
    )
    assert code == 0, output
    verbs = [call[0] for call in calls]
    assert verbs == [
        *["connect"] * 3,
        "auth",
        "replSetGetStatus",
        "replSetInitiate",
        "replSetGetStatus",  # no primary yet
        "replSetGetStatus",
    ]
    assert calls[3] == ["auth", "root", "pw"]
    [initiate] = [call for call in calls if call[0] == "replSetInitiate"]
    assert initiate[1] == "admin"
    assert [m["host"] for m in initiate[2]["members"]] == [f"{m}:27017" for m in MEMBERS]
    assert "rs0 has a primary" in output


@needs_node
def test_the_init_step_changes_nothing_in_a_set_already_initiated(tmp_path: Path) -> None:
    code, calls, output = run_init(tmp_path)
    assert code == 0, output
    assert "replSetInitiate" not in [call[0] for call in calls]
    assert "already initiated" in output


@needs_node
@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        # Not initiated, and initiating fails: an error, not a silent exit 0.
        (
            {"replSetGetStatus": [NOT_YET], "replSetInitiate": [{"ok": 0, "code": 93}]},
            "replSetInitiate",
        ),
        # Another error than "not yet initiated" (say, bad credentials): stops there.
        ({"replSetGetStatus": [{"throw": {"code": 13, "errmsg": "unauthorized"}}]}, "code"),
        # mongo never accepts connections.
        ({"unreachable": 1000}, "connection refused"),
    ],
)
def test_the_init_step_fails_loudly(
    tmp_path: Path, scenario: dict[str, Any], expected: str
) -> None:
    code, calls, output = run_init(tmp_path, **scenario)
    assert code != 0
    assert expected in output
    if "replSetInitiate" not in scenario:
        assert "replSetInitiate" not in [call[0] for call in calls]


@needs_node
@pytest.mark.parametrize(
    ("hello", "healthy"),
    [
        ({"isWritablePrimary": True, "secondary": False, "primary": "mongo:27017"}, True),
        ({"isWritablePrimary": False, "secondary": True, "primary": "mongo:27017"}, True),
        # In the set, but no primary elected (or known) yet.
        ({"isWritablePrimary": False, "secondary": True}, False),
        # Started, the set not initiated.
        ({"isWritablePrimary": False, "secondary": False, "isreplicaset": True}, False),
        # Rolling back, recovering, in initial sync: neither primary nor secondary.
        ({"isWritablePrimary": False, "secondary": False, "primary": "mongo2:27017"}, False),
    ],
)
def test_a_member_is_healthy_in_a_set_with_a_primary(
    tmp_path: Path, hello: dict[str, Any], healthy: bool
) -> None:
    test = SERVICES["mongo"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "mongosh"]
    script = option(test, "--eval")
    prelude = (
        f"globalThis.db = {{ hello: () => ({json.dumps(hello)}) }};\n"
        "globalThis.quit = (code) => process.exit(code);"
    )
    done = run_node(script, prelude, tmp_path)
    assert done.returncode == (0 if healthy else 1), done.stderr


def test_timeline_s_health_is_readiness_for_reads() -> None:
    from timeline.rpc.server import READS_SERVICE_NAME

    test = SERVICES["timeline"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    [shell] = test[1:]
    http, _, grpc = shell.partition(" && ")
    assert "urlopen('http://127.0.0.1:8000/readyz?for=reads', timeout=2)" in http
    assert grpc == f"python -m timeline.rpc.probe --service {READS_SERVICE_NAME} --timeout 1"
    assert READS_SERVICE_NAME == "timeline.v1.Timeline.reads"


def test_the_release_checks_run_the_compose_file_with_test_commands(tmp_path: Path) -> None:
    text = RELEASE_CHECKS.read_text()
    assert os.access(RELEASE_CHECKS, os.X_OK)
    assert "\nset -euo pipefail\n" in text
    subprocess.run(["bash", "-n", str(RELEASE_CHECKS)], check=True)
    # Its own compose project (not the stack of make up), removed at the end.
    [project] = re.findall(r"^PROJECT=([\w-]+)$", text, re.MULTILINE)
    assert project != COMPOSE["name"]
    assert "trap cleanup EXIT" in text
    assert "down -v --remove-orphans" in text
    # The members as the compose file runs them, plus the test commands (fail points).
    [members] = re.findall(r"command: &mongod-test (\[.*\])$", text, re.MULTILINE)
    assert yaml.safe_load(members) == [
        *SERVICES["mongo"]["command"],
        "--setParameter",
        "enableTestCommands=1",
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^release-checks:\n\tbash scripts/mongo-release-checks.sh$", makefile, re.M)


@needs_node
def test_the_release_checks_mongosh_scripts_parse(tmp_path: Path) -> None:
    text = RELEASE_CHECKS.read_text()
    # Every `msh MEMBER '<JavaScript>'` of the script (none holds a single quote: bash's).
    scripts = re.findall(r"""\bmsh (?:"[^\n]*?"|\S+) '([^']*)'""", text)
    assert len(scripts) >= 15
    for i, script in enumerate(scripts):
        path = tmp_path / f"snippet{i}.js"
        path.write_text(script)
        assert NODE is not None
        done = subprocess.run([NODE, "--check", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)


def dockerfile() -> list[str]:
    return (ROOT / "Dockerfile").read_text().splitlines()


def test_the_image_runs_gunicorn_as_a_non_root_user_with_a_healthcheck() -> None:
    lines = dockerfile()
    [base] = [line for line in lines if line.startswith("FROM")]
    assert re.fullmatch(r"FROM python:3\.\d+-slim", base)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["gunicorn", "app:app"]'
    # The dependency layer comes before the source: code changes keep it cached.
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY timeline/"))
    assert install < source


def test_the_image_holds_everything_the_service_reads_at_run_time() -> None:
    copied = " ".join(line for line in dockerfile() if line.startswith("COPY"))
    for needed in ("app.py", "gunicorn.conf.py", "configs/", "lua/", "timeline/"):
        assert needed in copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert "var" in ignored


def load_gunicorn_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Any:
    """The gunicorn settings (timeline/gunicorn_conf.py, which gunicorn.conf.py re-exports) as
    gunicorn reads them at start, with the default environment and these variables: loaded
    afresh each time, as a new gunicorn master does."""
    for name in ("PORT", "HOST", "WEB_CONCURRENCY", "GUNICORN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIMELINE_DATA_DIR", str(tmp_path / "var"))
    # Set, not deleted: the file sets it when absent, and a setenv is undone after the test.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location(
        "gunicorn_conf", ROOT / "timeline" / "gunicorn_conf.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gunicorn_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conf = load_gunicorn_conf(
        monkeypatch, tmp_path, PORT="9000", HOST="0.0.0.0", WEB_CONCURRENCY="5"
    )
    assert conf.bind == "0.0.0.0:9000"
    assert conf.workers == 5
    assert conf.preload_app is False  # clients are created in each worker, after the fork
    # No request runs into the worker timeout: each stops starting work well before it.
    assert Settings().request_deadline_ms < conf.timeout * 1000
    assert conf.logconfig_dict["formatters"]["json"]
    defaults = load_gunicorn_conf(monkeypatch, tmp_path)
    assert defaults.bind == "127.0.0.1:8000"
    assert defaults.workers == 2


def test_gunicorn_serves_through_the_front_with_the_http_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gunicorn.config import Config
    from gunicorn.workers.gthread import ThreadWorker

    from timeline.worker import TimelineWorker

    conf = load_gunicorn_conf(monkeypatch, tmp_path)
    assert conf.worker_class == "timeline.worker.TimelineWorker"
    assert conf.threads == Settings().http_threads == 4
    # gunicorn's own keep-alive knob (whole seconds) never cuts the worker's timeout short.
    assert conf.keepalive * 1000 >= Settings().http_keepalive_ms
    # gunicorn loads the class named (threads > 1 would otherwise turn "sync" into gthread).
    cfg = Config()
    cfg.set("worker_class", conf.worker_class)
    cfg.set("threads", conf.threads)
    assert cfg.worker_class is TimelineWorker
    assert issubclass(TimelineWorker, ThreadWorker)

    tuned = load_gunicorn_conf(
        monkeypatch, tmp_path, TIMELINE_HTTP_THREADS="7", TIMELINE_HTTP_KEEPALIVE_MS="2500"
    )
    assert (tuned.threads, tuned.keepalive) == (7, 3)


def gunicorn(**settings: str) -> subprocess.CompletedProcess[str]:
    """`gunicorn app:app` as `make run` starts it, with these TIMELINE_* variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "app:app"],
        cwd=ROOT,
        env=env | settings | {"PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "TIMELINE_COUNT_DEFALT",
            "5",
            "timeline: TIMELINE_COUNT_DEFALT is not a timeline setting; "
            "did you mean TIMELINE_COUNT_DEFAULT?",
        ),
        (
            "TIMELINE_COUNT_MAX",
            "many",
            "timeline: TIMELINE_COUNT_MAX: count_max must be an integer, got 'many'",
        ),
        ("TIMELINE_COUNT_MAX", "0", "timeline: TIMELINE_COUNT_MAX: count_max must be positive"),
    ],
)
def test_gunicorn_refuses_a_bad_setting_in_one_line(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    # What `make run` shows: gunicorn's stderr is that one line, and it exits non-zero.
    data = tmp_path / "var"
    done = gunicorn(
        TIMELINE_DATA_DIR=str(data),
        TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"),
        **{variable: value},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [message]
    assert done.stdout == ""
    assert not data.exists()  # stopped before anything was started


def test_gunicorn_refuses_a_data_dir_too_deep_for_the_redis_socket(tmp_path: Path) -> None:
    deep = tmp_path.resolve() / ("d" * 120)
    done = gunicorn(TIMELINE_DATA_DIR=str(deep))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("timeline: TIMELINE_DATA_DIR: data_dir is too deep")
    assert str(deep / "redis.sock") in line


@pytest.mark.parametrize("version", ["24.1.1", "25.2.0", "28.0.0", "28.0.0.dev0", "30.1", "x"])
def test_gunicorn_outside_the_tested_range_stops_the_master_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: str
) -> None:
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: version if name == "gunicorn" else real(name)
    )
    with pytest.raises(SystemExit) as stopped:
        load_gunicorn_conf(monkeypatch, tmp_path)
    assert str(stopped.value) == (
        f"timeline: timeline's HTTP worker needs gunicorn >=25.3,<28 (it builds on "
        f"gthread's internals), but gunicorn {version} is installed"
    )


@pytest.mark.parametrize("version", ["25.3.0", "25.3", "26.1.0", "27.0.1", "27.9.9rc1"])
def test_gunicorn_within_the_range_is_served(version: str) -> None:
    from timeline.compat import check_gunicorn

    check_gunicorn(version)  # raises otherwise


def test_the_worker_s_gunicorn_range_is_pyproject_s() -> None:
    from packaging.requirements import Requirement

    from timeline.compat import GUNICORN_RANGE

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (gunicorn,) = [Requirement(d) for d in declared if Requirement(d).name == "gunicorn"]
    assert gunicorn.specifier == Requirement(f"gunicorn{GUNICORN_RANGE}").specifier
