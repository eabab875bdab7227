"""The README's `$ curl` examples, run in order against a fresh service, print what it shows."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_e2e import Service, clean_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHOWN_ADDRESS = "localhost:8000"  # what the examples call: `make run`'s default port

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Example:
    """One `$ curl ...` command of the README and the output shown under it."""

    line: int  # the README line the command starts on, for the failure message
    command: str  # continuation lines joined
    output: str


def examples(text: str) -> list[Example]:
    """Every `$ ` command inside a fenced block, in order, with the lines up to the next one."""
    found: list[Example] = []
    lines = text.splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced and line.startswith("$ ")):
            continue
        start = i
        command = line[2:]
        while command.endswith("\\"):
            command = command[:-1] + " " + lines[i].strip()
            i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith(("$ ", "```")):
            output.append(lines[i])
            i += 1
        found.append(Example(start, command, "\n".join(output)))
    return found


# What legitimately differs from one run to the next: when an entry was stored (or a device
# seen), and a conversation list's cursor (it holds its last conversation's activity time).
# Nothing else is normalised (the port is the command's, not the output's), so a changed
# sequence, field, message or error text fails the comparison.
TIMESTAMP = re.compile(r'"(timestamp|lastSeen)":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
CURSOR = re.compile(r'"next":"[A-Za-z0-9_-]+"')


def normalise(output: str) -> str:
    """The output with each time of the run (and a cursor made of one) replaced."""
    timeless = TIMESTAMP.sub(r'"\1":"<at>"', output.rstrip("\n"))
    return CURSOR.sub('"next":"<cursor>"', timeless)


def run(example: Example, port: int) -> str:
    """Run the example's curl (no shell: its own quoting, read as a shell would) on `port`."""
    args = shlex.split(example.command)
    assert args[0] == "curl", f"README line {example.line}: not a curl command"
    address = f"localhost:{port}"
    args = [arg.replace(SHOWN_ADDRESS, address) for arg in args]
    done = subprocess.run(args, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, f"README line {example.line}: curl failed: {done.stderr!r}"
    return done.stdout.decode()


@pytest.fixture
def fresh_service(tmp_path: Path) -> Iterator[Service]:
    """`make run` on an empty store: the embedded redis-server and SQLite, in a new data dir."""
    data = tmp_path / "var"
    env = clean_env(TIMELINE_DATA_DIR=str(data), TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"))
    service = Service(env, tmp_path / "gunicorn.log").start()
    yield service
    service.stop()


def test_the_examples_are_found() -> None:
    text = README.read_text(encoding="utf-8")
    found = examples(text)
    # Every `$ curl` line of the README is an example, and each shows an output.
    assert len(found) == text.count("\n$ curl") >= 15
    for example in found:
        assert example.output.strip(), f"README line {example.line} shows no output"
        assert SHOWN_ADDRESS in example.command, f"README line {example.line}"


def test_the_normalisation_keeps_everything_but_the_time() -> None:
    shown = '{"entrySet":[{"sequence":"1","timestamp":"2026-11-27T00:59:08.341Z"}]}'
    assert normalise(shown) == normalise(shown.replace("08.341Z", "59.999Z"))
    assert normalise(shown) != normalise(shown.replace('"1"', '"2"'))
    assert normalise(shown) != normalise(shown.replace("08.341Z", "08Z"))
    seen = '{"devices":[{"device":"p","position":"3","lastSeen":"2026-11-27T00:59:08.341Z"}]}'
    assert normalise(seen) == normalise(seen.replace("08.341Z", "09.000Z"))
    assert normalise(seen) != normalise(seen.replace('"3"', '"4"'))
    listed = '{"conversations":[],"next":"MTc2NTA5OnRlYW0"}'
    assert normalise(listed) == normalise(listed.replace("MTc2", "OTk5"))
    assert normalise(listed) != normalise(listed.replace("MTc2NTA5OnRlYW0", ""))


def test_every_example_prints_what_the_readme_shows(fresh_service: Service) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's examples are curl commands")
    drifted = []
    for example in examples(README.read_text(encoding="utf-8")):
        got = run(example, fresh_service.port)
        if normalise(got) != normalise(example.output):
            drifted.append(
                f"README line {example.line}: $ {example.command}\n"
                f"  shows: {example.output}\n  gives: {got}"
            )
    assert not drifted, "\n".join(drifted)


def section(title: str) -> str:
    """The README's text under a `## ` heading, up to the next one."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_metric_is_listed() -> None:
    source = (ROOT / "timeline" / "metrics.py").read_text(encoding="utf-8")
    declared = set(re.findall(r"(?:Counter|Histogram|Gauge|Summary)\(\s*\"(\w+)\"", source))
    assert len(declared) >= 8
    listed = set(re.findall(r"^  - `(timeline_\w+)", section("Deploy"), re.MULTILINE))
    assert listed == declared


def test_the_layout_names_every_module() -> None:
    layout = section("Layout")
    modules = [
        path
        for path in (ROOT / "timeline").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
        and "_pb2" not in path.name  # generated from the .proto at install, git-ignored
    ]
    assert modules
    for path in modules:
        assert re.search(rf"\b{re.escape(path.name)}\b", layout), path.relative_to(ROOT)
