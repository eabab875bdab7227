"""The wrk scripts `make bench` measures with: each request a new message, never a retry.

A client_msg_id repeated across wrk's threads or runs would be answered from its record (a
replay), and the figure would measure replays, not sends. Needs the wrk binary (`apt-get
install wrk`, as .ci/run does); without it these tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess

import orjson
import pytest

from support import serving
from timeline.bench.harness import Client
from timeline.bench.suite import WRK_SCRIPTS, wrk_latency_ms
from timeline.settings import Settings

WRK = shutil.which("wrk")
pytestmark = pytest.mark.skipif(WRK is None, reason="wrk is not installed (apt-get install wrk)")


def wrk(url: str, script: str, seconds: int = 1) -> int:
    """Run wrk with 2 threads and 4 connections; the number of requests it completed."""
    assert WRK is not None
    done = subprocess.run(
        [WRK, "-t2", "-c4", f"-d{seconds}s", "-s", str(WRK_SCRIPTS / script), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Non-2xx" not in done.stdout, done.stdout
    found = re.search(r"(\d+) requests in", done.stdout)
    assert found is not None, done.stdout
    return int(found.group(1))


@pytest.mark.parametrize(
    ("script", "table"), [("send.lua", "chat_history"), ("sendGroup.lua", "chat_history")]
)
def test_every_request_of_every_run_is_a_new_message(
    settings: Settings, script: str, table: str
) -> None:
    with serving(settings) as url:
        requests = wrk(url, script) + wrk(url, script)  # two runs: ids unique across both
    with sqlite3.connect(settings.sqlite_path) as db:
        messages = [
            orjson.loads(text)["id"] for (text,) in db.execute("SELECT message FROM chat_history")
        ]
        records = db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
    assert requests > 10
    # Each completed request stored one message of its own (a request still in flight when
    # wrk stopped may have been stored without being counted).
    assert len(set(messages)) == len(messages) >= requests
    # Each stored message has its record; a request that wrk left in flight when it stopped
    # (at most one per connection and run: 2 x 4) may have stored its record and not yet its
    # copies when the server stopped: its retry would write them at the recorded sequences.
    assert len(messages) <= records <= len(messages) + 8


@pytest.mark.slow
def test_the_fan_out_script_reports_a_median(settings: Settings) -> None:
    with serving(settings) as url:
        # Its 10,000 members' first message seeds their counters: done before wrk times it.
        client = Client(url)
        members = [f"fan-m{i}" for i in range(10_000)]
        body = {"group_name": "fan-group", "group_members": members, "message": {"id": "x"}}
        assert client.request("POST", "/timeline/sendGroup", body) == (200, {"failedMembers": []})
        client.close()
        median = wrk_latency_ms(url, "fanout", 3)
    assert median > 0
