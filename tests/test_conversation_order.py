"""One order per conversation on every topology: concurrent group messages may reach
members' sync timelines in different orders on a Redis Cluster (each member's counter is in
its own bucket, and buckets run their scripts independently), but every sync entry carries
its message's sequence in the conversation's history (conversationSeq): sorted by it, every
member's entries read as the history does."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from timeline.factory import close_app, create_app
from timeline.settings import Settings
from topologies import ClusterServers

MEMBERS = [f"member{i}" for i in range(100)]
PAIRS = 30


@pytest.fixture(params=["standalone", "cluster"])
def topology_settings(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str, redis_url: str
) -> Settings:
    common = {
        "redis_key_prefix": key_prefix,
        "sqlite_path": str(tmp_path / "timeline.sqlite3"),
        "data_dir": str(tmp_path / "var"),
    }
    if request.param == "cluster":
        cluster: ClusterServers = request.getfixturevalue("redis_cluster")
        return Settings(redis_mode="cluster", redis_url=cluster.url, **common).validate()
    return Settings(redis_url=redis_url, **common).validate()


def test_sorted_by_conversation_seq_every_member_reads_the_history_order(
    topology_settings: Settings,
) -> None:
    app = create_app(topology_settings)
    try:
        _send_pairs(app)
        client = app.test_client()
        history = client.get("/timeline/history/group/room?count=1000").get_json()["entrySet"]
        assert len(history) == 2 * PAIRS
        history_seq = {e["message"]: int(e["sequence"]) for e in history}
        in_history_order = [e["message"] for e in history]
        against = 0
        for member in MEMBERS:
            entries = client.get(f"/timeline/sync?member={member}&count=1000").get_json()[
                "entrySet"
            ]
            assert len(entries) == 2 * PAIRS
            for entry in entries:
                assert (entry["type"], entry["conversation"]) == ("group", "room")
                assert int(entry["conversationSeq"]) == history_seq[entry["message"]]
            by_conversation = sorted(entries, key=lambda e: int(e["conversationSeq"]))
            assert [e["message"] for e in by_conversation] == in_history_order
            against += sum(
                1
                for a, b in itertools.pairwise(entries)
                if history_seq[a["message"]] > history_seq[b["message"]]
            )
        # Informational: how often the delivery order itself differed (0 on one Redis).
        print(f"{topology_settings.redis_mode}: {against} adjacent pairs against the history")
        if topology_settings.redis_mode == "standalone":
            assert against == 0  # one Redis runs every allocation in one order
    finally:
        close_app(app)


def _send_pairs(app: Any) -> None:
    """PAIRS rounds of two group messages sent at the same moment from two threads."""
    barrier = threading.Barrier(2)
    errors: list[Any] = []

    def sender(side: str) -> None:
        client = app.test_client()
        for n in range(PAIRS):
            barrier.wait()
            body = {
                "group_name": "room",
                "group_members": MEMBERS,
                "message": {"pair": n, "side": side},
                "from": MEMBERS[0] if side == "a" else MEMBERS[1],
            }
            reply = client.post(
                "/timeline/sendGroup", data=orjson.dumps(body), content_type="application/json"
            )
            if reply.status_code != 200 or reply.get_json()["failedMembers"]:
                errors.append(reply.get_json())

    threads = [threading.Thread(target=sender, args=(side,)) for side in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
