"""Deployment files, checked as far as a machine without a Docker engine can: they parse,
name images new enough, and agree with the service's own settings."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import free_port
from timeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def version(image: str) -> tuple[int, ...]:
    tag = image.rpartition(":")[2]
    match = re.match(r"(\d+)(?:\.(\d+))?", tag)
    assert match, f"{image} has no version tag"
    return tuple(int(part or 0) for part in match.groups())


def test_compose_has_the_services_with_health_checks() -> None:
    assert set(SERVICES) == {"proxy", "timeline", "mongo", "redis"}
    for name, service in SERVICES.items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name


def test_images_meet_the_minimum_versions() -> None:
    assert version(SERVICES["mongo"]["image"]) >= (5, 0)
    assert version(SERVICES["redis"]["image"]) >= (6, 2)


def test_timeline_is_built_here_and_waits_for_healthy_dependencies() -> None:
    timeline = SERVICES["timeline"]
    assert timeline["build"] == "."
    assert timeline["ports"] == ["9322:9000"]  # gRPC only: HTTP goes through the proxy
    assert SERVICES["proxy"]["ports"] == ["9321:8000"]  # as the seed maps it
    assert timeline["depends_on"] == {
        "mongo": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_the_service_environment_names_real_settings() -> None:
    environment = SERVICES["timeline"]["environment"]
    known = {f"TIMELINE_{f.name.upper()}" for f in fields(Settings)}
    names = {name for name in environment if name.startswith("TIMELINE_")}
    assert names <= known
    assert {"TIMELINE_MONGO_URI", "TIMELINE_REDIS_URL"} <= names
    assert environment["TIMELINE_MONGO_URI"].startswith("mongodb://")
    assert "@mongo:27017/" in environment["TIMELINE_MONGO_URI"]
    assert environment["TIMELINE_REDIS_URL"].startswith("redis://:")
    assert "@redis:6379/" in environment["TIMELINE_REDIS_URL"]


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
    assert set(COMPOSE["volumes"]) >= {"mongo_data", "redis_data"}
    assert "mongo_data:/data/db" in SERVICES["mongo"]["volumes"]
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


def test_mongo_has_root_credentials() -> None:
    environment = SERVICES["mongo"]["environment"]
    assert {"MONGO_INITDB_ROOT_USERNAME", "MONGO_INITDB_ROOT_PASSWORD"} <= set(environment)


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
