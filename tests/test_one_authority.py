"""Exactly once through Redis loss, decided by one authority: the store's record of an
idempotent message, changed only by compare-and-set.

Each case forces one interleaving deterministically: a store wrapper runs the next attempt
from inside the current one's first write (after its allocation and, for a retry, its
reading of the record; before anything of it is stored), so attempts nest without threads
or sleeps, on every store backend
(mongomock included, which is not thread-safe). Each asserts the same outcome:

- one reply value, shared by every attempt;
- the message stored exactly once in each of its timelines;
- no sequence holding two messages, none skipped unsealed (a reader is never held up);
- the next message lands at the next sequence.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from typing import Any

import pytest
import redis

from test_exactly_once import restore, snapshot
from test_faults import Clock, msg, read_all, service, texts
from timeline.errors import PartialWrite, Unavailable, WriteFailed
from timeline.model import Copies, Kind, Timeline
from timeline.service import TimelineService
from timeline.store import Claim, Store, WriteResult

TIMELINES = ((Kind.HISTORY, "u0:u1"), (Kind.SYNC, "u0"), (Kind.SYNC, "u1"))


class Lockstep:
    """Runs attempts in threads, one at a time, in three rounds. Every attempt allocates,
    then stops where it is about to read the store's record of the message (`claim`, or a
    first write that carries the record); once all have, each in turn (in start order)
    reads it, decides, and stops where it is about to write copies; once all are there,
    each in turn writes and runs to its end. So every attempt has allocated before any
    reads the record, and all have read it and decided before any copy is written."""

    ALLOCATED, DECIDED, DONE = 1, 2, 3

    def __init__(self, names: list[str]) -> None:
        self.order = names
        self.phase = dict.fromkeys(names, 0)
        self.running: str | None = names[0]
        self.turns = 0  # how often one attempt stopped for another: the proof it ran so
        self.condition = threading.Condition()

    def begin(self) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.running == threading.current_thread().name)

    def point(self, phase: int) -> None:
        """The current attempt reached `phase`: the next attempt runs, this one waits."""
        me = threading.current_thread().name
        with self.condition:
            if me not in self.phase or self.phase[me] >= phase:
                return  # not one of ours, or past that point already
            self.phase[me] = phase
            left = [name for name in self.order if self.phase[name] < self.DONE]
            low = min((self.phase[name] for name in left), default=0)
            self.running = next((name for name in left if self.phase[name] == low), None)
            if self.running not in (me, None):
                self.turns += 1
            self.condition.notify_all()
            if phase < self.DONE:
                self.condition.wait_for(lambda: self.running == me)


class Interleaving:
    """A real store that can store a write's record and then fail it, as MongoStore.write
    can (its record stored, its copies not, or only some of them), and that marks the
    points where a Lockstep switches attempts."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.record_then_fail = 0  # next writes with a record: store it, then fail
        self.partly = False  # ... after storing the history and the first sync copy
        self.lockstep: Lockstep | None = None

    def _point(self, phase: int) -> None:
        if self.lockstep is not None:
            self.lockstep.point(phase)

    def claim(self, claim: Claim, *rest: Any) -> Claim:
        self._point(Lockstep.ALLOCATED)
        return self.inner.claim(claim, *rest)

    def write(
        self, history: Copies | None, sync: Copies | None, claim: Claim | None = None, *rest: Any
    ) -> WriteResult:
        if history is not None:
            self._point(Lockstep.ALLOCATED if claim is not None else Lockstep.DECIDED)
        if claim is not None and self.record_then_fail:
            self.record_then_fail -= 1
            self.inner.claim(claim, *rest)
            if self.partly and history is not None and sync is not None:
                first = Copies(
                    sync.ids[:1], sync.firsts[:1], sync.messages, sync.created_at_ms, sync.mid
                )
                self.inner.write(history, first)
                raise PartialWrite("injected: the record and a part stored, then failed")
            raise Unavailable("injected: the record stored, its copies not")
        return self.inner.write(history, sync, claim, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def together(svc: TimelineService, gate: Interleaving, attempts: int) -> list[Any]:
    """`attempts` retries of m at once, in lockstep: their replies (or errors), in order."""
    names = [f"A{i + 2}" for i in range(attempts)]
    lockstep = gate.lockstep = Lockstep(names)
    replies: dict[str, Any] = {}

    def run() -> None:
        me = threading.current_thread().name
        lockstep.begin()
        try:
            replies[me] = svc.send("u0", "u1", [msg("m")], "c1")
        except Exception as exc:
            replies[me] = exc
        finally:
            lockstep.point(Lockstep.DONE)

    threads = [threading.Thread(target=run, name=name, daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    gate.lockstep = None
    assert not any(thread.is_alive() for thread in threads), "an attempt never ended"
    assert lockstep.turns >= attempts - 1  # they did interleave
    return [replies[name] for name in names]


def now() -> Clock:
    """A test clock at the real time: mongomock applies the TTL index of the records by the
    real time, and would remove a record that expires a day after a clock set in the past."""
    clock = Clock()
    clock.ms = time.time_ns() // 1_000_000
    return clock


def forget_redis(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)


def assert_once(store: Store, svc: TimelineService, replies: list[Any]) -> None:
    """The invariants every case ends with."""
    assert all(reply == replies[0] for reply in replies), replies
    assert isinstance(replies[0], list), replies
    for kind, id_ in TIMELINES:
        stored = texts(read_all(store, kind, id_))
        assert stored.count("m") == 1, (kind, id_, stored)
        assert stored.count("other") == 1, (kind, id_, stored)
    # The next message lands at the next sequence of each timeline, readable at once: no
    # unsealed hole below it holds readers up, and nothing it is given was used before.
    before = {t: store.max_seqs(t[0], [t[1]]).get(t[1], 0) for t in TIMELINES}
    sequence = svc.send("u0", "u1", [msg("next")])
    assert sequence == [before[(Kind.SYNC, "u1")] + 1]
    for kind, id_ in TIMELINES:
        assert store.max_seqs(kind, [id_])[id_] == before[(kind, id_)] + 1
    page = svc.sync("u1", 0, 1000)
    assert texts(page.entries) == texts(read_all(store, Kind.SYNC, "u1"))
    assert texts(page.entries)[-1] == "next"
    assert page.entries[-1].seq == page.latest_seq


def interleaved(
    redis_url: str, key_prefix: str, store: Store
) -> tuple[Interleaving, Clock, TimelineService]:
    """The service over the store behind an Interleaving, one write attempt per request."""
    gate, clock = Interleaving(store), now()
    svc = service(redis_url, key_prefix, gate, clock, retry_backoff_ms=0, write_attempts=1)
    return gate, clock, svc


def lost_first_attempt(svc: TimelineService, gate: Interleaving, *, partly: bool = False) -> None:
    """A1 of m stores its record (sequence 1 everywhere), then its copies fail (or only a
    part of them is stored): 503. Then the conversation goes on at sequence 2."""
    gate.record_then_fail, gate.partly = 1, partly
    with pytest.raises(WriteFailed if partly else Unavailable):
        svc.send("u0", "u1", [msg("m")], "c1")
    assert gate.record_then_fail == 0
    assert svc.send("u0", "u1", [msg("other")]) == [2]


@pytest.mark.parametrize("retries", [2, 3, 4])
def test_concurrent_retries_after_redis_lost_everything_store_the_message_once(
    redis_url: str, key_prefix: str, store: Store, retries: int
) -> None:
    gate, clock, svc = interleaved(redis_url, key_prefix, store)
    lost_first_attempt(svc, gate)
    forget_redis(redis_url, key_prefix)  # FLUSHALL, or a failover to a replica that lagged
    clock.ms += 100
    # A2 allocates anew (3, recorded in Redis), the others replay A2's record; all read the
    # store's record (1) before any writes.
    assert_once(store, svc, together(svc, gate, retries))


@pytest.mark.parametrize("retries", [2, 3])
def test_concurrent_retries_after_redis_came_back_from_an_older_snapshot(
    redis_url: str, key_prefix: str, store: Store, retries: int
) -> None:
    gate, clock, svc = interleaved(redis_url, key_prefix, store)
    client = redis.Redis.from_url(redis_url)
    saved = snapshot(client, key_prefix)  # taken before m: no record, counters at 0
    lost_first_attempt(svc, gate)
    restore(client, key_prefix, saved)  # counters behind the store, no record of m
    clock.ms += 100
    assert_once(store, svc, together(svc, gate, retries))


@pytest.mark.parametrize("retries", [2, 3])
def test_concurrent_retries_after_the_record_and_part_of_the_copies_were_stored(
    redis_url: str, key_prefix: str, store: Store, retries: int
) -> None:
    gate, clock, svc = interleaved(redis_url, key_prefix, store)
    lost_first_attempt(svc, gate, partly=True)
    forget_redis(redis_url, key_prefix)
    clock.ms += 100
    assert_once(store, svc, together(svc, gate, retries))


def test_a_retry_racing_its_first_attempt_still_in_flight(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    gate, _clock, svc = interleaved(redis_url, key_prefix, store)
    assert svc.send("u0", "u1", [msg("other")]) == [1]
    # A2 (the first attempt) allocates and records in Redis; A3, its retry, replays that;
    # both reach the store before either has stored anything.
    replies = together(svc, gate, 2)
    assert replies == [[2], [2]]
    assert_once(store, svc, replies)


@pytest.mark.parametrize("retries", [2, 3])
def test_concurrent_stale_retries_after_redis_loss_move_the_message_once(
    redis_url: str, key_prefix: str, store: Store, retries: int
) -> None:
    """The retries come after the gap grace: readers may have passed m's holes, so m moves
    above them, by compare-and-set on the record: one attempt's move wins, the others adopt
    it and give back or seal what they allocated for theirs."""
    gate, clock, svc = interleaved(redis_url, key_prefix, store)
    lost_first_attempt(svc, gate)
    forget_redis(redis_url, key_prefix)
    clock.ms += 60_000
    assert_once(store, svc, together(svc, gate, retries))


def test_a_request_out_of_time_before_its_history_copy_gives_its_sequences_back(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    """A fan-out whose deadline (a gRPC client's 20 ms, say) passes after its allocation and
    before its history copy stores nothing and answers 503: what it allocated is given back
    before it answers, so the next message is readable by every member at once, with no
    hole for readers to wait on."""
    clock = now()
    svc = service(redis_url, key_prefix, store, clock, request_deadline_ms=20)
    members = [f"m{i}" for i in range(300)]
    assert svc.send_group("g", members, [msg("first")]) == []
    real = svc.allocator.allocate

    def slow(*args: Any, **kwargs: Any) -> Any:
        allocated = real(*args, **kwargs)
        clock.ms += 25  # the allocation took the whole deadline
        return allocated

    svc.allocator.allocate = slow  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="ran out of time before its history copy"):
        svc.send_group("g", members, [msg("late")])
    svc.allocator.allocate = real  # type: ignore[method-assign]
    assert svc.send_group("g", members, [msg("next")]) == []
    for member in members:
        page = svc.sync(member, 0, 10)
        assert texts(page.entries) == ["first", "next"], member
        assert [e.seq for e in page.entries] == [1, 2]
    assert texts(svc.history("g", 0, 10)) == ["first", "next"]


def test_redis_keeps_a_message_s_record_briefly_and_the_store_answers_after(
    redis_url: str, key_prefix: str, store: Store
) -> None:
    """Redis's record of an idempotent message lives for idempotency_redis_seconds (here
    0.3 s), the store's for the whole idempotency_ttl_seconds: once Redis has let its
    records go, nothing of those messages is left there, and a retry is answered from the
    store's record, with the first answer, stored once."""
    clock = now()
    svc = service(redis_url, key_prefix, store, clock, record_redis_ttl_ms=300)
    client = redis.Redis.from_url(redis_url)
    first = svc.send("u0", "u1", [msg("m0")], "c0")
    for i in range(1, 200):
        svc.send("u0", "u1", [msg(f"m{i}")], f"c{i}")
    counters = {
        svc.allocator.key(Timeline(kind, id_)) for kind, id_ in TIMELINES
    }  # what stays: one counter per timeline
    deadline = time.monotonic() + 10  # a state to wait for (Redis's expiry), not a delay
    while {k.decode() for k in client.scan_iter(match=key_prefix + "*")} != counters:
        assert time.monotonic() < deadline, "Redis kept records past their time"
        time.sleep(0.05)
    clock.ms += 1_000
    assert svc.send("u0", "u1", [msg("m0")], "c0") == first
    assert svc.send("u0", "u1", [msg("m7")], "c7") == [first[0] + 7]
    for kind, id_ in TIMELINES:
        stored = texts(read_all(store, kind, id_))
        assert stored == [f"m{i}" for i in range(200)], (kind, id_)
    assert svc.send("u0", "u1", [msg("next")]) == [201]


class RandomFaults:
    """A real store whose writes and claims fail at random (a fixed seed): a write fails
    whole, or after storing its record (as MongoStore.write can), a claim fails."""

    def __init__(self, inner: Store, seed: int) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.on = True
        self.injected = 0

    def _roll(self, p: float) -> bool:
        with self.lock:
            hit = self.on and self.random.random() < p
            self.injected += hit
            return hit

    def write(
        self, history: Copies | None, sync: Copies | None, claim: Claim | None = None, *rest: Any
    ) -> WriteResult:
        if self._roll(0.1):
            raise Unavailable("injected: store write failed")
        if claim is not None and self._roll(0.1):
            self.inner.claim(claim, *rest)
            raise Unavailable("injected: the record stored, its copies not")
        return self.inner.write(history, sync, claim, *rest)

    def claim(self, claim: Claim, *rest: Any) -> Claim:
        if self._roll(0.1):
            raise Unavailable("injected: claim failed")
        return self.inner.claim(claim, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_random_faults_and_redis_flushes_under_concurrent_retries(
    redis_url: str, key_prefix: str, sqlite_store: Store
) -> None:
    """Threads send idempotent messages in a few conversations and retry each until it is
    answered, while the store fails at random and Redis forgets everything now and then.
    Afterwards every message is in each of its timelines exactly once, and every attempt
    that was answered got the same answer. (SQLite: mongomock is not thread-safe.)"""
    seed = 20261207
    faults = RandomFaults(sqlite_store, seed)
    clock = now()
    svc = service(redis_url, key_prefix, faults, clock, retry_backoff_ms=0, write_attempts=2)
    users = ["u0", "u1", "u2", "u3"]
    answers: dict[str, list[Any]] = {}
    sent: dict[str, tuple[str, str]] = {}
    lock = threading.Lock()

    def client(worker: int) -> None:
        # Two clients send each stream of messages (a client and its proxy both retrying,
        # two gateway instances): concurrent attempts of the same message.
        stream = worker % 3
        plan = random.Random(seed + stream)  # the same messages for both clients
        rng = random.Random(seed + 10 + worker)  # their own lost replies
        for i in range(12):
            sender, receiver = plan.sample(users, 2)
            cid = f"s{stream}-{i}"
            with lock:
                sent[cid] = (sender, receiver)
            for _ in range(30):  # a careful client: the same request until it is answered
                try:
                    reply = svc.send(sender, receiver, [msg(cid)], cid)
                except (Unavailable, WriteFailed):
                    continue
                with lock:
                    answers.setdefault(cid, []).append(reply)
                if rng.random() < 0.3:
                    continue  # its reply was lost, as far as it knows: it sends again
                break
            time.sleep(0.002)

    def flusher() -> None:
        rng = random.Random(seed)
        for _ in range(20):
            time.sleep(rng.uniform(0.005, 0.02))
            forget_redis(redis_url, key_prefix)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    threads.append(threading.Thread(target=flusher))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    faults.on = False
    assert faults.injected > 0
    assert set(answers) == set(sent), "a message was never answered in 30 tries"
    for cid, replies in answers.items():
        assert all(reply == replies[0] for reply in replies), (cid, replies)
    for user in users:
        stored = texts(read_all(sqlite_store, Kind.SYNC, user))
        mine = sorted(c for c, pair in sent.items() if user in pair)
        assert sorted(stored) == mine, user
    for a, b in itertools.combinations(users, 2):
        conversation = ":".join(sorted((a, b)))
        stored = texts(read_all(sqlite_store, Kind.HISTORY, conversation))
        assert sorted(stored) == sorted(c for c, pair in sent.items() if set(pair) == {a, b})
    # And each answer is where the message is: the receiver's sequence of it.
    for cid, (_, receiver) in sent.items():
        at = {
            e.seq: json.loads(e.message)["text"]
            for e in read_all(sqlite_store, Kind.SYNC, receiver)
        }
        assert at[answers[cid][0][0]] == cid, cid
