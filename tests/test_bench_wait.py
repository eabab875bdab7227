"""timeline-bench --scenario wait: held readers woken one at a time, against the service under
gunicorn. What is asserted is the report's shape and that every wake-up came, never a time:
those are the machine's."""

from __future__ import annotations

import json
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port
from test_e2e import Service, service_env
from timeline.bench.cli import main
from timeline.bench.harness import BenchError
from timeline.bench.wait import raise_fd_limit

LATENCIES = {"p50", "p95", "p99", "max"}


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    env = service_env(tmp_path, redis_url, f"test:{uuid.uuid4().hex[:12]}:")
    service = Service(env, tmp_path / "gunicorn.log").start()  # 2 workers, as make run
    yield service
    service.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_every_wake_up_is_received_and_reported(
    served: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 60 waiters, a phase without them and one with them held, 2 s each,
    out = tmp_path / "wait.json"
    status = main(
        [
            "--url", served.base, "--scenario", "wait", "--waiters", "60", "--duration", "4",
            "--phases", "2", "--rate", "50", "--ramp", "1", "--wake-every", "0.1",
            "--verify", "--quiet", "--json", str(out),
        ]
    )  # fmt: skip
    # when the run is over,
    assert status == 0
    report = json.loads(out.read_text())
    # then every message sent to a held waiter reached it, and nothing failed;
    wake = report["wake_ups"]
    assert set(wake) == {"sent", "received", "missed", "before_send_reply"} | LATENCIES
    assert 0 < wake["sent"] <= 2 / 0.1 + 1  # one at a time, at most every 0.1 s
    assert report["wake_every_seconds"] == 0.1
    assert wake["received"] == wake["sent"]
    assert wake["missed"] == 0
    assert report["errors"] == 0
    assert report["verify"]["ok"], report["verify"]["problems"]
    # the service held all of the waiters in the held phase, and none in the other;
    assert report["scenario"] == "wait"
    assert report["waiters"] == 60
    assert report["wait_ms"] == 30_000
    phases = report["phases"]
    assert [p["held"] for p in phases] == [False, True]
    assert [p["waiters_held"] for p in phases] == [0, 60]
    assert phases[1]["wake_ups"] == wake["received"]
    assert all(p["requests"] > 0 and p["errors"] == 0 for p in phases)
    # the other traffic is reported for both, with the ratio of their p99s;
    traffic = report["traffic"]
    for side in ("without_waiters", "with_waiters"):
        assert set(traffic[side]) == {"requests", "errors", "errors_by_status"} | LATENCIES
        assert traffic[side]["requests"] > 0
    assert traffic["p99_ratio"] > 0
    assert len(traffic["p99_ratio_by_round"]) == 1
    # and the table says the same.
    table = capsys.readouterr().out
    assert f"{wake['sent']} sent, {wake['received']} received, 0 missed" in table
    assert "at most every 100 ms" in table
    assert "verify              ok" in table


def test_the_wait_scenario_runs_for_a_duration_and_draws_no_plot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for more in (
        ["--requests", "5"],
        ["--plot", "x.png"],
        ["--phases", "3"],
        ["--waiters", "0"],
        ["--wake-every", "0"],
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["--url", url, "--scenario", "wait", *more])
        assert stopped.value.code == 2, more
    assert "--scenario wait" in capsys.readouterr().err


def test_nothing_listening_is_one_line_and_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", url, "--scenario", "wait", "--waiters", "5", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"timeline-bench: cannot reach {url}: Connection refused"]


def test_more_waiters_than_the_hard_limit_allows_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    with pytest.raises(BenchError, match="4,096"):
        raise_fd_limit(10_256)
