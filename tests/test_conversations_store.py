"""The store's part of conversations, read positions and devices: one contract, every
backend (the `store` fixture runs each test on SQLite and MongoDB)."""

from __future__ import annotations

import orjson

from timeline.model import HOLE_MID, About, Activity, Conversation, Copies, Kind, Message
from timeline.store import ConversationState, Cursor, Device, Store


def message(**fields: object) -> Message:
    return Message(document=dict(fields), json=orjson.dumps(fields).decode())


def group_activity(
    group: str,
    members: list[str],
    last: int,
    text: str,
    sender: str = "",
    at: int = 1_000,
    first: int = 0,
) -> Activity:
    return Activity(
        kind=Conversation.GROUP,
        conversation=group,
        members=members,
        peer=group,
        peers=None,
        sender=sender,
        first=first or last,
        last=last,
        message=orjson.dumps({"t": text}).decode(),
        created_at_ms=at,
    )


def send_group(
    store: Store,
    group: str,
    members: list[str],
    history_seq: int,
    member_seqs: list[int],
    *texts: str,
    sender: str = "",
    at: int = 1_000,
    mid: str = "",
) -> None:
    """What the service stores for a group message (or a batch): history, activity, copies."""
    messages = [message(t=t) for t in texts]
    last = history_seq + len(messages) - 1
    mid = mid or f"{group}-{history_seq}"
    history = Copies(
        [group],
        [history_seq],
        messages,
        at,
        mid,
        activity=group_activity(group, members, last, texts[-1], sender, at, history_seq),
    )
    about = About(Conversation.GROUP, group, history_seq)
    sync = Copies(members, member_seqs, messages, at, mid, about)
    assert store.write(history, sync).sync_taken == []


def send_single(
    store: Store, a: str, b: str, seq: int, a_seq: int, b_seq: int, text: str, at: int
) -> None:
    """`a` sends `text` to `b`: the conversation `a:b` (a < b here), both sync timelines."""
    conversation = f"{a}:{b}"
    msg = message(t=text)
    history = Copies(
        [conversation],
        [seq],
        [msg],
        at,
        f"{conversation}-{seq}",
        activity=Activity(
            kind=Conversation.SINGLE,
            conversation=conversation,
            members=[a, b],
            peer=conversation,
            peers=[b, a],
            sender=a,
            first=seq,
            last=seq,
            message=msg.json,
            created_at_ms=at,
        ),
    )
    about = About(Conversation.SINGLE, conversation, seq, [b, a])
    store.write(history, Copies([a, b], [a_seq, b_seq], [msg], at, f"{conversation}-{seq}", about))


def listed(
    store: Store, member: str, limit: int = 50, before: Cursor | None = None
) -> list[tuple[str, int, int, int]]:
    return [
        (c.peer, c.latest, c.read, c.unread) for c in store.conversations(member, limit, before)
    ]


def test_sync_entries_carry_their_conversation_and_its_sequence(store: Store) -> None:
    send_group(store, "g", ["a", "b"], 7, [3, 1], "x", "y")
    entries = store.read(Kind.SYNC, "a", 0, 10)
    assert [(e.seq, e.conv_kind, e.conv, e.conv_seq) for e in entries] == [
        (3, "group", "g", 7),
        (4, "group", "g", 8),
    ]
    page = store.page(Kind.SYNC, "b", 0, 10, 0)
    assert page.lowest is not None
    assert page.lowest.conv_seq == 7
    assert [(e.conv, e.conv_seq) for e in page.entries] == [("g", 7), ("g", 8)]
    # History entries and copies without `about` say nothing of it.
    assert [(e.conv_kind, e.conv, e.conv_seq) for e in store.read(Kind.HISTORY, "g", 0, 10)] == [
        ("", "", 0),
        ("", "", 0),
    ]


def test_a_one_to_one_copy_names_the_other_user(store: Store) -> None:
    send_single(store, "a", "b", 1, 1, 1, "hi", 1_000)
    assert [(e.conv_kind, e.conv, e.conv_seq) for e in store.read(Kind.SYNC, "a", 0, 9)] == [
        ("single", "b", 1)
    ]
    assert [(e.conv_kind, e.conv) for e in store.read(Kind.SYNC, "b", 0, 9)] == [("single", "a")]
    assert listed(store, "a") == [("b", 1, 1, 0)]  # a sent it: read
    assert listed(store, "b") == [("a", 1, 0, 1)]


def test_the_list_is_most_recent_first_and_pages_by_cursor(store: Store) -> None:
    for n, group in enumerate(["g1", "g2", "g3", "g4", "g5"]):
        send_group(store, group, ["m", "z"], 1, [n + 1, n + 1], f"in {group}", at=1_000 + n)
    send_group(store, "g2", ["m", "z"], 2, [6, 6], "again", at=2_000)  # g2 is the latest now
    names = [c.peer for c in store.conversations("m", 10, None)]
    assert names == ["g2", "g5", "g4", "g3", "g1"]
    first = store.conversations("m", 2, None)
    assert [c.peer for c in first] == ["g2", "g5"]
    cursor = Cursor(first[-1].activity_ms, first[-1].conversation)
    assert [c.peer for c in store.conversations("m", 2, cursor)] == ["g4", "g3"]
    state = first[0]
    assert state.kind is Conversation.GROUP
    assert state.latest == 2
    assert state.last is not None
    assert (state.last.seq, orjson.loads(state.last.message), state.last.created_at_ms) == (
        2,
        {"t": "again"},
        2_000,
    )
    assert store.conversations("nobody", 10, None) == []


def test_conversations_with_the_same_activity_time_are_all_paged(store: Store) -> None:
    for group in ["a1", "a2", "a3", "a4"]:
        send_group(store, group, ["m"], 1, [int(group[1])], "x", at=5_000)
    seen: list[str] = []
    cursor = None
    while True:
        page = store.conversations("m", 1, cursor)
        if not page:
            break
        seen.append(page[0].peer)
        cursor = Cursor(page[0].activity_ms, page[0].conversation)
    assert seen == ["a4", "a3", "a2", "a1"]


def test_read_positions_never_move_back_nor_past_the_latest(store: Store) -> None:
    send_group(store, "g", ["a", "b"], 1, [1, 1], "one", "two", "three")
    state = store.mark_read("a", Conversation.GROUP, "g", "g", 2)
    assert (state.read, state.unread, state.latest) == (2, 1, 3)
    state = store.mark_read("a", Conversation.GROUP, "g", "g", 1)  # lower: nothing changes
    assert (state.read, state.unread) == (2, 1)
    state = store.mark_read("a", Conversation.GROUP, "g", "g", 99)  # past the latest: clamped
    assert (state.read, state.unread) == (3, 0)
    send_group(store, "g", ["a", "b"], 4, [4, 4], "four")
    assert listed(store, "a") == [("g", 4, 3, 1)]
    assert listed(store, "b") == [("g", 4, 0, 4)]


def test_a_senders_own_messages_are_read(store: Store) -> None:
    send_group(store, "g", ["a", "b", "c"], 1, [1, 1, 1], "from b", sender="b")
    send_group(store, "g", ["a", "b", "c"], 2, [2, 2, 2], "from a", "and more", sender="a")
    assert dict((m, listed(store, m)[0][3]) for m in "abc") == {"a": 0, "b": 2, "c": 3}
    # Without a sender a message is unread for everyone.
    send_group(store, "g", ["a", "b", "c"], 4, [4, 4, 4], "anonymous")
    assert dict((m, listed(store, m)[0][3]) for m in "abc") == {"a": 1, "b": 3, "c": 4}


def test_a_sender_outside_the_member_list_gets_the_conversation(store: Store) -> None:
    send_group(store, "g", ["a"], 1, [1], "hello", sender="boss")
    assert listed(store, "boss") == [("g", 1, 1, 0)]


def test_a_read_position_alone_does_not_list_a_conversation(store: Store) -> None:
    send_group(store, "g", ["a"], 1, [1], "x")
    state = store.mark_read("outsider", Conversation.GROUP, "g", "g", 1)
    assert (state.read, state.unread) == (1, 0)
    assert listed(store, "outsider") == []
    # Once it receives a message there, it is listed, with the position it had.
    send_group(store, "g", ["a", "outsider"], 2, [2, 1], "y")
    assert listed(store, "outsider") == [("g", 2, 1, 1)]
    # A position in a conversation that holds nothing yet: 0.
    state = store.mark_read("a", Conversation.SINGLE, "a:q", "q", 5)
    assert (state.read, state.unread, state.latest, state.last) == (0, 0, 0, None)


def test_holes_are_not_unread(store: Store) -> None:
    send_group(store, "g", ["a"], 1, [1], "one")
    store.seal(Kind.HISTORY, [("g", 2), ("g", 3)], 1_000)  # two sequences that hold nothing
    send_group(store, "g", ["a"], 4, [2], "four")
    assert listed(store, "a") == [("g", 4, 0, 2)]
    state = store.mark_read("a", Conversation.GROUP, "g", "g", 2)
    assert state.unread == 1
    assert [e.mid for e in store.read(Kind.HISTORY, "g", 0, 9)] == ["g-1", "g-4"]
    assert HOLE_MID  # the placeholders are the store's own


def test_writing_the_same_message_again_changes_no_count(store: Store) -> None:
    send_group(store, "g", ["a", "b"], 1, [1, 1], "once", sender="a")
    before = (listed(store, "a"), listed(store, "b"))
    history = Copies(
        ["g"],
        [1],
        [message(t="once")],
        1_000,
        "g-1",
        activity=group_activity("g", ["a", "b"], 1, "once", "a"),
    )
    result = store.write(history, None)  # a retry: its history copy is there already
    assert result.history_taken
    assert (
        (listed(store, "a"), listed(store, "b")) == before == ([("g", 1, 1, 0)], [("g", 1, 0, 1)])
    )


def test_a_late_lower_message_does_not_replace_the_latest(store: Store) -> None:
    send_group(store, "g", ["a"], 2, [2], "second", at=2_000)
    send_group(store, "g", ["a"], 1, [1], "first", at=1_000)  # stored after, below
    [state] = store.conversations("a", 5, None)
    assert state.latest == 2
    assert state.last is not None
    assert orjson.loads(state.last.message) == {"t": "second"}
    assert state.activity_ms == 2_000
    # "a" was listed by message 2, when nothing was stored below it: both are unread.
    assert state.unread == 2


def test_a_changed_member_list_is_recorded(store: Store) -> None:
    send_group(store, "g", ["a", "b"], 1, [1, 1], "x")
    send_group(store, "g", ["b", "a"], 2, [2, 2], "same members, another order")
    send_group(store, "g", ["a", "b", "c"], 3, [3, 3, 1], "c joined")
    # A new member has read what came before it joined: only message 3 is unread.
    assert listed(store, "c") == [("g", 3, 2, 1)]
    assert listed(store, "a") == [("g", 3, 0, 3)]


def test_a_big_group_lists_every_member(store: Store) -> None:
    members = [f"m{i}" for i in range(3_000)]
    send_group(store, "big", members, 1, [1] * len(members), "hello")
    assert listed(store, "m0") == [("big", 1, 0, 1)]
    assert listed(store, "m2999") == [("big", 1, 0, 1)]


def test_devices_hold_entries_until_each_has_them(store: Store) -> None:
    day = 86_400_000
    store.device_seen("m", "phone", 1_000)
    store.device_seen("m", "laptop", 1_000)
    assert store.device_ack("m", "phone", 10, 2_000, day) == 0  # the laptop has acked nothing
    assert store.device_ack("m", "laptop", 5, 3_000, day) == 5
    assert store.device_ack("m", "laptop", 3, 3_500, day) == 5  # never back
    assert store.device_ack("m", "laptop", 12, 4_000, day) == 10
    assert store.devices("m") == [Device("laptop", 12, 4_000), Device("phone", 10, 2_000)]
    # The phone idle past the limit: it holds nothing back any more.
    assert store.device_ack("m", "laptop", 20, 2_000 + day + 1, day) == 20
    # Seen again, it holds entries again from its position.
    store.device_seen("m", "phone", 2_000 + day + 2)
    assert store.device_ack("m", "laptop", 25, 2_000 + day + 3, day) == 10
    assert store.devices("other") == []


def test_a_device_seen_earlier_than_recorded_does_not_go_back(store: Store) -> None:
    store.device_seen("m", "d", 5_000)
    store.device_seen("m", "d", 4_000)
    assert store.devices("m") == [Device("d", 0, 5_000)]


def test_state_of_an_unlisted_conversation_is_typed(store: Store) -> None:
    state = store.mark_read("a", Conversation.SINGLE, "a:b", "b", 3)
    assert isinstance(state, ConversationState)
    assert (state.kind, state.conversation, state.peer) == (Conversation.SINGLE, "a:b", "b")


def test_a_new_member_has_read_what_came_before_it(store: Store) -> None:
    send_group(store, "g", ["a"], 1, [1], "one", "two", "three")
    send_group(store, "g", ["a", "late"], 4, [4, 1], "four", "five")
    assert listed(store, "late") == [("g", 5, 3, 2)]
    assert listed(store, "a") == [("g", 5, 0, 5)]


def test_a_member_removed_from_a_group_leaves_its_list_and_comes_back_when_added(
    store: Store,
) -> None:
    send_group(store, "g", ["a", "b", "c"], 1, [1, 1, 1], "all three")
    send_group(store, "g", ["a", "b"], 2, [2, 2], "c was removed")
    assert listed(store, "c") == []  # c is not shown what it is no longer sent
    assert listed(store, "a") == [("g", 2, 0, 2)]
    send_group(store, "g", ["a", "b"], 3, [3, 3], "still without c")
    assert listed(store, "c") == []
    send_group(store, "g", ["a", "b", "c"], 4, [4, 4, 2], "c is back")
    assert listed(store, "c") == [("g", 4, 0, 4)]  # its position is where it was
    # A sender left out of its own message's member list is listed by it all the same.
    send_group(store, "g", ["a"], 5, [5], "only a", sender="b")
    assert listed(store, "b") == [("g", 5, 5, 0)]
    assert listed(store, "c") == []


def test_a_first_message_stored_after_a_later_one_is_unread_to_the_members(store: Store) -> None:
    """Two messages of a new conversation in flight at once, the later stored first: the
    members are listed by it, and the earlier one, still on its way, is unread to them."""
    send_group(store, "g", ["a", "b"], 2, [2, 2], "second, stored first", sender="b")
    assert listed(store, "a") == [("g", 2, 0, 2)]
    send_group(store, "g", ["a", "b"], 1, [1, 1], "first, stored second", sender="b")
    assert listed(store, "a") == [("g", 2, 0, 2)]
