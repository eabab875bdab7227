"""Repairing: what the service does off the steady state, when a write finds its sequences
taken (a counter behind the store) or counters missing (Redis lost them)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence

from timeline import metrics
from timeline.errors import Unavailable
from timeline.model import Copies, Kind, Timeline
from timeline.service.common import Parts, _Plan

log = logging.getLogger("timeline.service")


class Repairing(Parts):
    """Seeds missing counters from the store; settles a write that found its sequences
    taken: stored by this message already, moved to new sequences, or filled in place."""

    def _seed(self, timelines: Sequence[Timeline]) -> None:
        """Raise counters to the store's highest sequence: continue at max + 1, never reuse."""
        floors: dict[Timeline, int] = {}
        for kind in Kind:
            ids = [t.id for t in timelines if t.kind is kind]
            if ids:
                for id_, seq in self.store.max_seqs(kind, ids).items():
                    floors[Timeline(kind, id_)] = seq
        self.allocator.seed(floors)
        metrics.SEQUENCE_REPAIRS.labels("seeded").inc(len(floors))

    def _settle(
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
        left = [key for p in to_move for key in plan.keys(p)]
        try:
            self._move(plan, to_move)
        except Unavailable as exc:
            todo.update(to_move)
            if plan.record is None:
                raise _MoveLost from exc
            raise
        todo.update(to_move)
        # The sequences left behind will never hold these messages: seal them at once, so
        # that readers step over them without waiting out the grace period. Should this
        # fail, readers seal them themselves after the grace period.
        with contextlib.suppress(Unavailable):
            self.store.seal(kind, left, self._clock_ms())  # skips those another message holds
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
            copy = Copies(
                [plan.ids[position]], [first + j], [plan.messages[j]], plan.created_at_ms, plan.mid
            )
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
            # The store's record first: a copy is only ever written where it says, so that a
            # retry after Redis forgot finds it (a failure here is a failed write: retried,
            # and the retried move gets the same sequences back from Redis's record).
            claim = dataclasses.replace(
                plan.claim, lasts=tuple(first + count - 1 if first else 0 for first in firsts)
            )
            self.store.reclaim(claim)
            plan.claim = claim
        plan.firsts = firsts


class _MoveLost(Exception):
    """A move without an idempotency record failed: it must not be retried."""
