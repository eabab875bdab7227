"""`python -m timeline.rpc.probe` with no settings: it checks where `make run` serves gRPC,
and never passes having checked nothing unless gRPC is turned off. (Against a running
server: tests/test_grpc_wire.py.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import timeline.settings
from support import free_port
from timeline.rpc import probe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TIMELINE_* variable and no configs/timeline.yaml: the probe as a newcomer runs it."""
    for name in list(os.environ):
        if name.startswith("TIMELINE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make_run_grpc_bind() -> str:
    """The TIMELINE_GRPC_BIND `make run` sets when the environment does not."""
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(r"TIMELINE_GRPC_BIND=\"\$\$\{TIMELINE_GRPC_BIND-([^}]+)\}\"", makefile)
    assert found, "make run no longer sets TIMELINE_GRPC_BIND as this test reads it"
    return found.group(1)


def test_without_settings_it_checks_where_make_run_serves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[str, str]] = []

    def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
        asked.append((address, service))
        return "SERVING"

    monkeypatch.setattr(probe, "check", check)
    probe.main([])
    probe.main(["--service", "timeline.v1.Timeline"])
    bind = make_run_grpc_bind()
    assert asked == [(bind, ""), (bind, "timeline.v1.Timeline")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"timeline-grpc at {bind} (grpc_bind unset")
    assert lines[0].endswith(": (liveness) is SERVING")
    assert lines[1].endswith(": timeline.v1.Timeline is SERVING")


def test_without_settings_and_no_grpc_served_it_fails_saying_what_it_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given nothing serving gRPC at the default address (a free port stands in for 9000,
    # which another process on this machine may hold)
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(timeline.settings, "GRPC_DEFAULT_BIND", address)
    # When the probe runs with no settings, then it fails with one line naming that address
    with pytest.raises(SystemExit) as stopped:
        probe.main(["--timeout", "0.5"])
    why = str(stopped.value.code)
    assert why.startswith(f"timeline-grpc at {address} (grpc_bind unset")
    assert "UNAVAILABLE" in why
    assert "TIMELINE_GRPC_BIND" in why


def test_off_checks_nothing_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIMELINE_GRPC_BIND", "off")
    monkeypatch.setattr(probe, "check", lambda *args: pytest.fail("checked with gRPC off"))
    probe.main([])  # exit status 0: the image's health check then stands on HTTP alone
    assert capsys.readouterr().out == "timeline-grpc: not checked: gRPC is off (grpc_bind is off)\n"
