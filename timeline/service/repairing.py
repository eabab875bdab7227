"""The Repairer: what the service does off the steady state, when a write finds its
sequences taken (a counter behind the store) or counters missing (Redis lost them), and what
it gives back or seals when a request will not write what it allocated."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence

from timeline import metrics
from timeline.errors import Unavailable
from timeline.model import Kind, Timeline
from timeline.service.common import Parts, _Plan

log = logging.getLogger("timeline.service")


class Repairer:
    """Seeds missing counters from the store; settles a write that found its sequences
    taken: stored by this message already, moved to new sequences, or filled in place; gives
    back or seals what a request will not write."""

    def __init__(self, parts: Parts) -> None:
        self.allocator, self.store, self.policy = parts.allocator, parts.store, parts.policy
        self._clock_ms = parts.clock_ms

    def seed(self, timelines: Sequence[Timeline]) -> None:
        """Raise counters to the store's highest sequence: continue at max + 1, never reuse."""
        floors: dict[Timeline, int] = {}
        for kind in Kind:
            ids = [t.id for t in timelines if t.kind is kind]
            if ids:
                for id_, seq in self.store.max_seqs(kind, ids).items():
                    floors[Timeline(kind, id_)] = seq
        self.allocator.seed(floors)
        metrics.SEQUENCE_REPAIRS.labels("seeded").inc(len(floors))

    def abandon(
        self,
        timelines: Sequence[Timeline],
        count: int,
        lasts: dict[int, int],
        release: bool = True,
    ) -> None:
        """Seal ranges this request allocated but will never write, so that readers step
        over them at once. With `release` (the request never sent a write there), a range
        nothing was allocated after is given back instead, and the timeline keeps no hole;
        without (a failed write may have stored a part), it is only sealed around that part.
        Best effort: otherwise readers seal them after the grace period."""
        if not lasts:
            return
        if release:
            with contextlib.suppress(Unavailable):
                released = self.allocator.release(timelines, count, lasts)
                lasts = {p: last for p, last in lasts.items() if p not in released}
        now = self._clock_ms()
        for kind in Kind:
            keys = [
                (timelines[p].id, seq)
                for p, last in lasts.items()
                if timelines[p].kind is kind and last
                for seq in range(last - count + 1, last + 1)
            ]
            if keys:
                with contextlib.suppress(Unavailable):
                    self.store.seal(kind, keys, now)

    def settle(
        self,
        plan: _Plan,
        positions: list[int],
        todo: set[int],
        moving: bool,
        pinned: set[int],
        given_up: set[int],
    ) -> bool:
        """Look at what is stored of these timelines' copies (one kind at a time), after a
        write found some of their sequences taken (or, with `moving`, for a stale replay).

        All the message's: done. None of them: the copies move to new sequences above the
        store (another message, a placeholder or a floor holds the range), and the range
        left behind is sealed. Some of them, written by this request's own successful write
        a moment ago next to another message's copy: the range moves whole (its own copies
        removed first), so that its messages stay together and in order. Some of them
        otherwise (a replay of an earlier attempt, a write of this request that failed
        partway, or nothing else holding the rest): the timeline is pinned, since a reader
        may already have the part that is stored; the rest is written where it belongs,
        copy by copy, and if that is refused it is given up (reported to the caller), never
        moved: moving would deliver the stored part twice. Returns whether anything moved.
        """
        if not positions:
            return False
        kind = plan.kind(positions[0])
        keys = [key for p in positions for key in plan.keys(p)]
        owners = self.store.owners(kind, keys)
        mid = plan.mid
        to_move: list[int] = []
        for p in positions:
            found = [owners.get(key) for key in plan.keys(p)]
            ours = [owner == mid for owner in found]
            if all(ours):
                todo.discard(p)  # stored, by this message
            elif not any(ours):
                to_move.append(p)
            elif moving or p in pinned or all(owner in (mid, None) for owner in found):
                pinned.add(p)
                todo.discard(p)
                if not self._fill(plan, p, ours):
                    given_up.add(p)  # refused where it belongs, and it must not move
            else:
                # Written by this very request a moment ago, next to another message's copy:
                # the range moves whole, so that its messages stay together and in order.
                to_move.append(p)
        if not to_move:
            return False
        own = [key for p in to_move for key in plan.keys(p) if owners.get(key) == mid]
        if own:
            self.store.unwrite(kind, own, mid)
        # The sequences left behind will never hold these messages: sealed before the move,
        # so that no other attempt of the message (one that read the store's record before
        # this move changes it) can write there after it: its write finds them taken and
        # moves too, which the record's compare-and-set settles. Readers step over them at
        # once. Should this fail, readers seal them themselves after the grace period.
        left = [key for p in to_move for key in plan.keys(p)]
        with contextlib.suppress(Unavailable):
            self.store.seal(kind, left, self._clock_ms())  # skips those another message holds
        if plan.record is not None:
            # Another attempt may have written some of them between the look above and the
            # seal: those timelines stay where they are (pinned), never move.
            again = self.store.owners(kind, left)
            late = {p for p in to_move if any(again.get(key) == mid for key in plan.keys(p))}
            if late:
                pinned.update(late)
                todo.update(late)
                to_move = [p for p in to_move if p not in late]
                if not to_move:
                    return False
        try:
            self._move(plan, to_move)
        except Unavailable as exc:
            todo.update(to_move)
            if plan.record is None:
                raise _MoveLost from exc
            raise
        todo.update(to_move)
        return True

    def _fill(self, plan: _Plan, position: int, stored: list[bool]) -> bool:
        """Write a pinned timeline's missing copies where they belong, one by one (the rest
        is stored already); whether all of them went in."""
        first = plan.firsts[position]
        for j, done in enumerate(stored):
            if done:
                continue
            if self._clock_ms() >= plan.deadline_ms:
                return False  # reported; the caller's retry fills it in
            copy = plan.one(position, [plan.messages[j]], j)
            history, sync = (copy, None) if position == 0 else (None, copy)
            result = self.store.write(history, sync)
            if result.history_taken or result.sync_taken:
                owner = self.store.owners(plan.kind(position), [(plan.ids[position], first + j)])
                if owner.get((plan.ids[position], first + j)) != plan.mid:
                    return False
        return True

    def _move(self, plan: _Plan, positions: list[int]) -> None:
        """New ranges, above the store's highest, for timelines another message holds."""
        metrics.SEQUENCE_REPAIRS.labels("moved").inc(len(positions))
        first = plan.timeline(positions[0])
        log.warning(
            "%d timeline(s) moved to new sequences (first: %s %s seq %d): taken or stale",
            len(positions),
            first.kind,
            first.id,
            plan.firsts[positions[0]],
        )
        count = plan.count
        floors = self.store.max_seqs(first.kind, [plan.ids[p] for p in positions])
        moves = [(p, plan.firsts[p] + count - 1, floors[plan.ids[p]]) for p in positions]
        lasts = self.allocator.reallocate(plan.timelines, moves, count, plan.record)
        firsts = list(plan.firsts)
        for p, last in zip(positions, lasts, strict=True):
            firsts[p] = last - count + 1
        if plan.claim is not None:
            # The store's record first, by compare-and-set on what this attempt holds: a
            # copy is only ever written where it says, so that a retry after Redis forgot
            # finds it (a failure here is a failed write: retried, and the retried move gets
            # the same sequences back from Redis's record).
            wanted = tuple(first + count - 1 if first else 0 for first in firsts)
            stored = self.store.reclaim(plan.claim, wanted)
            if stored is None:  # expired and purged meanwhile: this attempt claims anew
                stored = self.store.claim(
                    dataclasses.replace(plan.claim, lasts=wanted), self._clock_ms()
                )
            if stored.lasts != wanted:
                # Another attempt changed the record first: its sequences stand, and what
                # this move allocated is given back (nothing was written there).
                mine = {p: wanted[p] for p in positions if wanted[p] != stored.lasts[p]}
                self.abandon(plan.timelines, count, mine)
                if stored.fingerprint != plan.claim.fingerprint:
                    raise Unavailable("the message's record was replaced by another's")
                metrics.SEQUENCE_REPAIRS.labels("adopted").inc(len(mine))
                firsts = [last - count + 1 if last else 0 for last in stored.lasts]
                positions = [p for p in positions if p not in mine]
            plan.claim = stored
        plan.firsts = firsts
        plan.moved.update(positions)  # at ranges of this request's own
        plan.tried.difference_update(positions)


class _MoveLost(Exception):
    """A move without an idempotency record failed: it must not be retried."""
