"""The MongoDB store's conversations, read positions and devices (issue 26): what its
documents hold, the order a write keeps, the indexes, and where each read goes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import mongomock
import pytest
from pymongo.errors import AutoReconnect

from timeline.errors import PartialWrite, Unavailable
from timeline.model import (
    HOLE_MID,
    About,
    Activity,
    Conversation,
    Copies,
    Entry,
    Kind,
    Message,
    conversation_id,
    peer_of,
)
from timeline.store import Cursor, Device, WriteResult
from timeline.store.mongo import (
    CONVERSATIONS,
    DEVICE_INDEX_NAME,
    DEVICES,
    HOLES_INDEX_NAME,
    INDEX_NAME,
    MEMBERSHIP_INDEX_NAME,
    MEMBERSHIPS,
    MongoStore,
)


def message(text: str) -> Message:
    return Message({"t": text}, f'{{"t":"{text}"}}')


class Chat:
    """Sends the way the service's _Plan builds its copies: history copies with their
    Activity, sync copies with their About; sequences counted here."""

    def __init__(self, store: MongoStore) -> None:
        self.store = store
        self.seqs: dict[str, int] = {}
        self.mids = 0

    def _range(self, timeline: str, count: int) -> int:
        first = self.seqs.get(timeline, 0) + 1
        self.seqs[timeline] = first + count - 1
        return first

    def send(
        self,
        kind: Conversation,
        conversation: str,
        recipients: Sequence[str],
        texts: Sequence[str],
        sender: str = "",
        created_at_ms: int = 1_000,
        mid: str = "",
    ) -> tuple[Copies, Copies]:
        self.mids += 1
        mid = mid or f"m{self.mids}"
        messages = [message(text) for text in texts]
        first = self._range(f"h:{conversation}", len(messages))
        firsts = [self._range(f"s:{member}", len(messages)) for member in recipients]
        peers = (
            [peer_of(conversation, member) for member in recipients]
            if kind is Conversation.SINGLE
            else None
        )
        members = list(recipients)
        if sender and sender not in members:
            members.append(sender)
        activity = Activity(
            kind=kind,
            conversation=conversation,
            members=members,
            peer=conversation,
            peers=[peer_of(conversation, m) for m in members] if peers is not None else None,
            sender=sender,
            first=first,
            last=first + len(messages) - 1,
            message=messages[-1].json,
            created_at_ms=created_at_ms,
        )
        history = Copies([conversation], [first], messages, created_at_ms, mid, activity=activity)
        about = About(kind, conversation, first, peers)
        sync = Copies(list(recipients), firsts, messages, created_at_ms, mid, about)
        assert self.store.write(history, sync) == WriteResult()
        return history, sync

    def single(self, sender: str, receiver: str, *texts: str, at: int = 1_000) -> None:
        conversation = conversation_id(sender, receiver)
        self.send(Conversation.SINGLE, conversation, [sender, receiver], texts, sender, at)

    def group(
        self, group: str, members: Sequence[str], *texts: str, sender: str = "", at: int = 1_000
    ) -> None:
        self.send(Conversation.GROUP, group, members, texts, sender, at)


@pytest.fixture
def chat(mongo_store: MongoStore) -> Chat:
    return Chat(mongo_store)


# --- sync documents say what they are about ---------------------------------------------


def test_sync_entries_carry_their_conversation_and_history_entries_do_not(chat: Chat) -> None:
    store = chat.store
    chat.single("a", "b", "one", "two")
    chat.group("g", ["a", "c"], "all", sender="c")
    entries = store.read(Kind.SYNC, "a", 0, 10)
    assert [(e.conv_kind, e.conv, e.conv_seq) for e in entries] == [
        ("single", "b", 1),
        ("single", "b", 2),
        ("group", "g", 1),
    ]
    assert [(e.conv_kind, e.conv, e.conv_seq) for e in store.read(Kind.SYNC, "b", 0, 10)] == [
        ("single", "a", 1),
        ("single", "a", 2),
    ]
    page = store.page(Kind.SYNC, "c", 0, 10, 0)
    assert page.lowest is not None
    assert page.lowest.conv == "g"
    assert [e.conv_seq for e in page.entries] == [1]
    assert store.read_backward(Kind.SYNC, "a", 0, 1, 0)[0].conv == "g"
    assert store.read(Kind.SYNC, "a", 0, 10, max_bytes=1)[0].conv == "b"
    for entry in store.read(Kind.HISTORY, "a:b", 0, 10):
        assert (entry.conv_kind, entry.conv, entry.conv_seq) == ("", "", 0)
    # Documents written without About (an earlier version, go-timeline) read as before.
    store.write(None, Copies(["a"], [9], [message("old")], 1, "x"))
    assert store.read(Kind.SYNC, "a", 8, 1)[0][4:] == ("", "", 0)


# --- the conversation list ----------------------------------------------------------------


def test_a_send_lists_the_conversation_for_both_and_the_sender_has_read_it(chat: Chat) -> None:
    store = chat.store
    chat.single("a", "b", "hi", "there", at=5_000)
    (mine,) = store.conversations("a", 10, None)
    (theirs,) = store.conversations("b", 10, None)
    last = Entry(2, '{"t":"there"}', 5_000, "m1")
    assert mine.kind is Conversation.SINGLE
    assert (mine.conversation, mine.peer, mine.latest, mine.read, mine.unread) == (
        "a:b",
        "b",
        2,
        2,
        0,
    )
    assert (theirs.peer, theirs.read, theirs.unread, theirs.last) == ("a", 0, 2, last)
    assert mine.last == last
    assert mine.activity_ms == theirs.activity_ms == 5_000


def test_the_list_is_ordered_by_activity_then_id_and_pages_by_cursor(chat: Chat) -> None:
    store = chat.store
    chat.single("a", "b", "1", at=3_000)
    chat.group("g2", ["a", "c"], "2", at=1_000)
    chat.group("g1", ["a", "c"], "3", at=1_000)  # same time: the higher id first
    chat.group("g3", ["c"], "not a's", at=9_000)
    chat.single("d", "a", "4", at=2_000)
    order = [c.conversation for c in store.conversations("a", 10, None)]
    assert order == ["a:b", "a:d", "g2", "g1"]
    first = store.conversations("a", 2, None)
    assert [c.conversation for c in first] == ["a:b", "a:d"]
    cursor = Cursor(first[-1].activity_ms, first[-1].conversation)
    rest = store.conversations("a", 2, cursor)
    assert [c.conversation for c in rest] == ["g2", "g1"]
    assert store.conversations("a", 2, Cursor(1_000, "g2"))[0].conversation == "g1"
    assert store.conversations("a", 2, Cursor(1_000, "g1")) == []
    assert store.conversations("a", 0, None) == []
    assert store.conversations("nobody", 5, None) == []
    assert len(store.conversations("a", 5, Cursor(10**18, ""))) == 4  # past any date


def test_a_later_message_moves_the_conversation_up_and_an_earlier_never_back(
    chat: Chat,
) -> None:
    store = chat.store
    chat.group("g", ["a", "b"], "one", sender="a", at=1_000)
    chat.group("g", ["a", "b"], "two", "three", sender="b", at=2_000)
    (state,) = store.conversations("a", 5, None)
    assert (state.latest, state.read, state.unread) == (3, 1, 2)
    assert state.last == Entry(3, '{"t":"three"}', 2_000, "m2")
    # A late write of an earlier sequence (a repair, a retry) changes nothing.
    late_activity = Activity(
        Conversation.GROUP, "g", ["a", "b"], "g", None, "", 2, 2, '{"t":"late"}', 9_000
    )
    late = Copies(["g"], [5], [message("late")], 9_000, "late", activity=late_activity)
    store.write(late, None)
    (state,) = store.conversations("a", 5, None)
    assert (state.latest, state.last, state.activity_ms) == (
        3,
        Entry(3, '{"t":"three"}', 2_000, "m2"),
        2_000,
    )


def test_placeholders_after_the_read_position_are_not_unread(chat: Chat) -> None:
    store = chat.store
    chat.group("g", ["a", "b"], "1", sender="a")
    store.seal(Kind.HISTORY, [("g", 2), ("g", 3)], 1_000)  # sealed holes
    chat.seqs["h:g"] = 3
    chat.group("g", ["a", "b"], "4", "5")
    (state,) = store.conversations("a", 5, None)
    assert (state.latest, state.read, state.unread) == (5, 1, 2)
    (state,) = store.conversations("b", 5, None)
    assert (state.latest, state.read, state.unread) == (5, 0, 3)
    assert store.mark_read("b", Conversation.GROUP, "g", "g", 2).unread == 2


def test_only_listed_members_see_the_conversation(chat: Chat) -> None:
    store = chat.store
    store.mark_read("z", Conversation.GROUP, "g", "g", 5)  # no conversation yet: nothing
    chat.group("g", ["a"], "1")
    assert store.conversations("z", 5, None) == []
    state = store.mark_read("z", Conversation.GROUP, "g", "g", 5)
    assert (state.read, state.latest, state.unread) == (1, 1, 0)
    assert store.conversations("z", 5, None) == []  # a read position alone is not listed
    chat.group("g", ["a", "z"], "2")  # now z is a member: listed, its position kept
    (state,) = store.conversations("z", 5, None)
    assert (state.read, state.latest, state.unread) == (1, 2, 1)
    # and marking read never unlists it.
    store.mark_read("z", Conversation.GROUP, "g", "g", 2)
    assert [c.unread for c in store.conversations("z", 5, None)] == [0]


# --- read positions -----------------------------------------------------------------------


def test_mark_read_is_clamped_to_the_latest_and_never_goes_back(chat: Chat) -> None:
    store = chat.store
    chat.single("a", "b", "1", "2", "3", at=7_000)
    state = store.mark_read("b", Conversation.SINGLE, "a:b", "a", 2)
    assert (state.kind, state.conversation, state.peer) == (Conversation.SINGLE, "a:b", "a")
    assert (state.latest, state.read, state.unread, state.activity_ms) == (3, 2, 1, 7_000)
    assert state.last == Entry(3, '{"t":"3"}', 7_000, "m1")
    assert store.mark_read("b", Conversation.SINGLE, "a:b", "a", 1).read == 2
    assert store.mark_read("b", Conversation.SINGLE, "a:b", "a", 99).read == 3
    chat.single("a", "b", "4")
    (state,) = store.conversations("b", 5, None)
    assert (state.read, state.unread) == (3, 1)  # 99 was clamped to 3, not kept
    empty = store.mark_read("b", Conversation.GROUP, "none", "none", 4)
    assert (empty.kind, empty.conversation, empty.peer) == (Conversation.GROUP, "none", "none")
    assert (empty.latest, empty.read, empty.unread, empty.last, empty.activity_ms) == (
        0,
        0,
        0,
        None,
        0,
    )
    assert store._memberships.count_documents({"conversation": "none"}) == 0


# --- what a write does, and in which order ------------------------------------------------


class Counting:
    """A collection whose calls are counted; those `fails` says yes to raise instead."""

    def __init__(self, inner: Any, fails: Any = None) -> None:
        self.inner, self.fails = inner, fails
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.fails is not None and self.fails(name, args):
                raise AutoReconnect(f"injected: {name}")
            return method(*args, **kwargs)

        return counted


def test_memberships_are_written_only_when_the_member_list_changes(chat: Chat) -> None:
    store = chat.store
    chat.group("g", ["a", "b", "c"], "1", sender="a")
    counting = Counting(store._memberships)
    store._memberships = counting  # type: ignore[assignment]
    chat.group("g", ["c", "b", "a"], "2", sender="b")  # the same members: no bulk write
    assert counting.calls.count("bulk_write") == 0
    assert counting.calls.count("update_one") == 1  # the sender's read position alone
    chat.group("g", ["a", "b", "c", "d"], "3")  # one more member: all upserted
    assert counting.calls.count("bulk_write") == 1
    store._memberships = counting.inner
    # d joined with message 3: what came before it is not unread to it.
    assert [c.unread for c in store.conversations("d", 5, None)] == [1]
    assert [c.read for c in store.conversations("b", 5, None)] == [2]
    document = store._conversations.find_one({"_id": "g"})
    assert document is not None
    assert document["members"] == hashlib.sha256(b"a\x00b\x00c\x00d").hexdigest()[:32]


def test_a_big_member_list_is_upserted_in_chunks(chat: Chat) -> None:
    store = chat.store
    store.membership_chunk = 3
    counting = Counting(store._memberships)
    store._memberships = counting  # type: ignore[assignment]
    members = [f"u{i}" for i in range(10)]
    chat.group("big", members, "hello", sender="u4")
    assert counting.calls.count("bulk_write") == 4
    store._memberships = counting.inner
    assert store._memberships.count_documents({"conversation": "big", "listed": True}) == 10
    assert [c.unread for c in store.conversations("u4", 5, None)] == [0]
    assert [c.unread for c in store.conversations("u9", 5, None)] == [1]


def test_a_sender_outside_the_members_gets_its_read_position(chat: Chat) -> None:
    chat.group("g", ["b", "c"], "1", "2", sender="a")
    (state,) = chat.store.conversations("a", 5, None)
    assert (state.peer, state.read, state.unread) == ("g", 2, 0)


def test_a_retry_whose_history_got_in_moves_the_conversation(chat: Chat) -> None:
    store = chat.store
    # The history copies went in, then the conversation's update failed:
    failing = Counting(
        store._conversations, lambda name, args: name == "update_one" and "latest" in args[0]
    )
    conversations = store._conversations
    store._conversations = failing  # type: ignore[assignment]
    with pytest.raises(Unavailable) as failed:
        chat.group("g", ["a", "b"], "1", sender="a")
    # not PartialWrite: the caller writes the history copies again,
    assert not isinstance(failed.value, PartialWrite)
    store._conversations = conversations
    assert store.conversations("b", 5, None) == []
    # and that retry finds them taken, by this message, and finishes.
    activity = Activity(
        Conversation.GROUP, "g", ["a", "b"], "g", None, "a", 1, 1, '{"t":"1"}', 1_000
    )
    again = Copies(["g"], [1], [message("1")], 1_000, "m1", activity=activity)
    assert store.write(again, None) == WriteResult(history_taken=True)
    (state,) = store.conversations("b", 5, None)
    assert (state.latest, state.unread, state.last) == (1, 1, Entry(1, '{"t":"1"}', 1_000, "m1"))
    # Another message's copy there moves nothing.
    other = Copies(["g"], [2], [message("x")], 1_000, "m9")
    store.write(other, None)
    moved = Activity(Conversation.GROUP, "g", ["a", "b"], "g", None, "", 2, 2, '{"t":"y"}', 2_000)
    assert store.write(
        Copies(["g"], [2], [message("y")], 2_000, "m2", activity=moved), None
    ) == WriteResult(history_taken=True)
    assert store.conversations("b", 5, None)[0].latest == 1


def test_nothing_is_listed_when_memberships_cannot_be_written(chat: Chat) -> None:
    store = chat.store
    memberships = store._memberships
    failing = Counting(memberships, lambda name, args: name == "bulk_write")
    store._memberships = failing  # type: ignore[assignment]
    with pytest.raises(Unavailable) as failed:
        chat.group("g", ["a", "b"], "1")
    assert not isinstance(failed.value, PartialWrite)
    assert store.read(Kind.HISTORY, "g", 0, 5) == []  # before the history copies
    store._memberships = memberships


# --- devices ------------------------------------------------------------------------------


def test_devices_hold_the_lowest_position_among_those_seen_lately(mongo_store: MongoStore) -> None:
    store = mongo_store
    store.device_seen("a", "phone", 1_000)
    store.device_seen("a", "phone", 500)  # earlier: last_seen stays
    assert store.devices("a") == [Device("phone", 0, 1_000)]
    assert store.device_ack("a", "phone", 7, 2_000, 10_000) == 7
    store.device_seen("a", "laptop", 3_000)  # new: holds everything from 0
    assert store.device_ack("a", "phone", 9, 4_000, 10_000) == 0
    assert store.device_ack("a", "laptop", 5, 5_000, 10_000) == 5
    assert store.device_ack("a", "phone", 3, 6_000, 10_000) == 5  # never back: phone at 9
    # laptop last seen at 5,000: idle by 16,000 with 10 s of idleness, phone alone counts.
    assert store.device_ack("a", "phone", 10, 16_000, 10_000) == 10
    assert store.device_ack("a", "tablet", 2, 16_000, 10_000) == 2  # a new one, by its ack
    assert store.devices("a") == [
        Device("laptop", 5, 5_000),
        Device("phone", 10, 16_000),
        Device("tablet", 2, 16_000),
    ]
    assert store.devices("b") == []


# --- indexes --------------------------------------------------------------------------------


def test_prepare_builds_the_new_indexes_and_again_harmlessly(database: Any) -> None:
    store = MongoStore(database)
    with pytest.raises(Unavailable, match="indexes building"):
        store.mark_read("a", Conversation.GROUP, "g", "g", 1)
    with pytest.raises(Unavailable, match="indexes building"):
        store.device_seen("a", "d", 1)
    with pytest.raises(Unavailable, match="indexes building"):
        store.device_ack("a", "d", 1, 1, 1)
    assert store.conversations("a", 5, None) == []  # reads never wait
    assert store.devices("a") == []
    store.prepare()
    MongoStore(database).prepare()  # a second worker: the placeholders' index is not
    MongoStore(database).prepare()  # mistaken for a non-unique (id, seq) one
    memberships = database[MEMBERSHIPS].index_information()[MEMBERSHIP_INDEX_NAME]
    assert memberships["key"] == [("member", 1), ("conversation", 1)]
    assert memberships["unique"] is True
    devices = database[DEVICES].index_information()[DEVICE_INDEX_NAME]
    assert devices["key"] == [("member", 1), ("device", 1)]
    assert devices["unique"] is True
    history = database["chat_history"].index_information()
    assert history[HOLES_INDEX_NAME]["key"] == [("id", 1), ("seq", 1)]
    assert history[HOLES_INDEX_NAME]["partialFilterExpression"] == {"mid": HOLE_MID}
    assert not history[HOLES_INDEX_NAME].get("unique")
    assert history[INDEX_NAME]["unique"] is True
    assert HOLES_INDEX_NAME not in database["chat_sync"].index_information()
    assert store.readiness() == "ready"
    store.device_seen("a", "d", 1)


def test_read_positions_and_devices_wait_only_for_their_own_indexes(
    database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the (id, seq) index builds (hours, on a big collection), acks of devices and
    # read positions are served: their indexes were built first, at once.
    from timeline.store import mongo as mongo_module

    def stuck(collection: Any) -> None:
        raise AutoReconnect("injected: the build of (id, seq) failed")

    monkeypatch.setattr(mongo_module, "_ensure_unique", stuck)
    store = MongoStore(database)
    with pytest.raises(Unavailable):
        store.prepare()
    assert store.readiness() == "failed"
    store.device_seen("a", "d", 1)
    assert store.device_ack("a", "d", 3, 2, 10) == 3
    assert store.mark_read("a", Conversation.GROUP, "g", "g", 1).read == 0
    with pytest.raises(Unavailable, match="indexes failed"):
        store.write(None, Copies(["a"], [1], [message("x")], 1, "m"))


def test_duplicate_memberships_block_their_index_named_in_one_line(database: Any) -> None:
    database[MEMBERSHIPS].insert_many(
        [{"member": "a", "conversation": "g"}, {"member": "a", "conversation": "g"}]
    )
    store = MongoStore(database)
    with pytest.raises(Unavailable, match="blocked"):
        store.prepare()
    assert store.readiness() == "blocked"
    problem = store.problem()
    assert "\n" not in problem
    assert MEMBERSHIPS in problem
    assert "(member, conversation)" in problem


# --- where reads go ---------------------------------------------------------------------


def test_a_client_is_shown_majority_reads_and_device_acks_read_local(
    chat: Chat, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = chat.store
    chat.single("a", "b", "1")
    store.seal(Kind.HISTORY, [("a:b", 2)], 1)
    chat.seqs["h:a:b"] = 2
    chat.single("a", "b", "3")
    store.device_seen("b", "d", 1)
    levels: list[tuple[str, str, str | None]] = []
    collection = mongomock.collection.Collection
    for name in ("find", "find_one", "aggregate", "count_documents"):
        original = getattr(collection, name)

        def recorded(
            self: Any, *args: Any, _name: str = name, _o: Any = original, **kw: Any
        ) -> Any:
            levels.append((self.name, _name, self.read_concern.level))
            return _o(self, *args, **kw)

        monkeypatch.setattr(collection, name, recorded)
    store.conversations("b", 5, None)
    store.devices("b")
    shown = {(name, level) for name, _, level in levels}
    assert shown == {
        (MEMBERSHIPS, "majority"),
        (CONVERSATIONS, "majority"),
        ("chat_history", "majority"),
        (DEVICES, "majority"),
    }
    levels.clear()
    store.mark_read("b", Conversation.SINGLE, "a:b", "a", 1)
    # (mongomock's find_one_and_update finds the membership it updates on its own handle)
    assert {(name, level) for name, _, level in levels} == {
        (CONVERSATIONS, "majority"),
        ("chat_history", "majority"),
        (MEMBERSHIPS, "local"),
    }
    levels.clear()
    store.device_ack("b", "d", 1, 2, 10)
    assert (DEVICES, "aggregate", "local") in levels
    assert {(name, level) for name, _, level in levels} == {(DEVICES, "local")}
    # Every new collection is written with a journaled majority.
    for handle in (store._memberships, store._conversations, store._devices):
        assert handle.write_concern.document == {"w": "majority", "j": True}


# --- speed ----------------------------------------------------------------------------------


def test_a_page_of_a_thousand_conversations_is_two_finds(chat: Chat) -> None:
    store = chat.store
    for i in range(1_000):
        chat.single("a", f"u{i:04d}", "hi", at=1_000 + i)
    memberships = Counting(store._visible_memberships)
    conversations = Counting(store._visible_conversations)
    store._visible_memberships = memberships  # type: ignore[assignment]
    store._visible_conversations = conversations  # type: ignore[assignment]
    started = time.perf_counter()
    page = store.conversations("a", 20, None)
    elapsed = time.perf_counter() - started
    assert [c.peer for c in page] == [f"u{i:04d}" for i in range(999, 979, -1)]
    assert all(c.unread == 0 and c.read == 1 for c in page)
    assert memberships.calls + conversations.calls == ["find", "find"]
    # mongomock is pure Python (a real server: a few ms); this only guards against a
    # query per conversation.
    assert elapsed < 5.0, elapsed


def test_a_member_in_more_conversations_than_one_find_names_gets_its_page(
    chat: Chat, monkeypatch: Any
) -> None:
    from timeline.store import mongo

    monkeypatch.setattr(mongo, "_IN_CHUNK", 3)  # 10 conversations: four finds, merged
    for n in range(10):
        chat.group(f"g{n}", ["m"], f"{n}", at=1_000 + n)
    page = chat.store.conversations("m", 4, None)
    assert [c.peer for c in page] == ["g9", "g8", "g7", "g6"]
    cursor = Cursor(page[-1].activity_ms, page[-1].conversation)
    assert [c.peer for c in chat.store.conversations("m", 4, cursor)] == ["g5", "g4", "g3", "g2"]
