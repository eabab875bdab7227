"""Named mutations: each breaks one promise of the service; at least one test must fail.

    .venv/bin/python tests/mutants.py              # every mutation, its targeted tests
    .venv/bin/python tests/mutants.py --all        # every mutation, the whole suite each
    .venv/bin/python tests/mutants.py --list       # the mutations, nothing run
    .venv/bin/python tests/mutants.py --every      # name every failing test, not the first
    .venv/bin/python tests/mutants.py NAME ...     # only these (names or unique prefixes)

Each mutation is a file, an exact text found in it once, and the text put in its place. The
working tree is never touched (nor is git): the repository as it is, without .venv, var, .git
and caches, is copied once to a temporary directory; each mutation is applied to a copy of
that snapshot, and pytest runs there with this interpreter, the copy first on PYTHONPATH.
Before any mutation the targeted test files must pass on an unmutated copy (the baseline), or
nothing is concluded.

A mutation is "killed by <test>" when a test fails (pytest stops at the first), and SURVIVED
when every test passes. The exit status is 0 only when every mutation was killed; 1 when one
survived; 2 when one no longer applies (its text is not in its file exactly once: the code
moved, so the mutation must be updated, never silently skipped) or the baseline fails.

Named mutations are used instead of mutmut: each is a bug the tests were found to miss once,
chosen by hand and stated in the code, so a run is deterministic, takes minutes rather than
hours (mutmut mutates every operator of every line and runs the suite on each) and reads as a
list of promises; one that stops applying fails loudly instead of vanishing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".venv",
    "var",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "*.sqlite3*",
    "*.log",
)
TIMEOUT_S = 900  # per pytest run; a mutation that hangs the tests counts as killed


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str  # found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids, files, -k expressions


API, VALIDATION = "timeline/api.py", "timeline/validation.py"
READING, WRITING = "timeline/service/reading.py", "timeline/service/writing.py"
ALLOCATOR, RELEASE = "timeline/allocator/__init__.py", "lua/release.lua"
ALLOCATE, MONGO = "lua/allocate.lua", "timeline/store/mongo.py"
SQLITE_SCHEMA, SQLITE_STORE = "timeline/store/sqlite/schema.py", "timeline/store/sqlite/store.py"
SQLITE_WRITING, SQLITE_GROUP = "timeline/store/sqlite/writing.py", "timeline/store/sqlite/group.py"
T_API, T_LIFE, T_ALLOC = "tests/test_api.py", "tests/test_lifecycle.py", "tests/test_allocator.py"
T_STORE, T_READERS = "tests/test_store_contract.py", "tests/test_readers.py"
T_MODES, T_CLUSTER = "tests/test_modes.py", "tests/test_cluster.py"
PAGING = "count or page or paging or pages"

T_ONCE = "tests/test_one_authority.py"
T_CONV, T_CONV_STORE = "tests/test_conversations.py", "tests/test_conversations_store.py"
CONVERSATIONS = "timeline/service/conversations.py"
T_MONGO = "tests/test_mongo.py"

MUTATIONS: list[Mutation] = [
    Mutation(
        "a sender's own message is unread to it (its read position not moved, SQLite)",
        SQLITE_WRITING,
        "    if activity.sender:\n",
        "    if False:\n",
        (T_CONV, T_CONV_STORE, "-k", "sqlite"),
    ),
    Mutation(
        "a sender's own message is unread to it (its read position not moved, MongoDB)",
        MONGO,
        "        if activity.sender and not sender_listed:\n",
        "        if False:\n",
        (T_CONV, T_CONV_STORE, "-k", "mongo"),
    ),
    Mutation(
        "a sealed hole counts as unread",
        SQLITE_SCHEMA,
        "WHERE h.id = c.id AND h.seq > m.read_seq AND h.seq <= c.latest AND h.mid = '~hole')",
        "WHERE h.id = c.id AND h.seq > m.read_seq AND h.seq <= c.latest AND 0)",
        (T_CONV_STORE, "-k", "sqlite and holes"),
    ),
    Mutation(
        "a read position moves back",
        SQLITE_SCHEMA,
        "ON CONFLICT (member, id) DO UPDATE SET read_seq = MAX(read_seq, excluded.read_seq),\n"
        "    listed = MAX(listed, excluded.listed)",
        "ON CONFLICT (member, id) DO UPDATE SET read_seq = excluded.read_seq,\n"
        "    listed = MAX(listed, excluded.listed)",
        (T_CONV, T_CONV_STORE, "-k", "sqlite and read"),
    ),
    Mutation(
        "one device's ack releases what another has not acked",
        READING,
        "        upto = self.devices.acked(member, device, min(seq, latest))\n",
        "        upto = max(seq, self.devices.acked(member, device, min(seq, latest)))\n",
        (T_CONV, "-k", "sqlite and device"),
    ),
    Mutation(
        "a sync entry's conversation sequence is its own sequence",
        "timeline/service/common.py",
        "        about = About(self.conversation, self.ids[0], self.firsts[0], peers)\n",
        "        about = About(self.conversation, self.ids[0], self.firsts[1], peers)\n",
        ("tests/test_conversation_order.py",),
    ),
    Mutation(
        "the store's record of a message changed by a blind write (no compare-and-set)",
        SQLITE_SCHEMA,
        'SET lasts = ? WHERE mid = ? AND fingerprint = ? AND lasts = ?"',
        'SET lasts = ? WHERE mid = ? AND fingerprint = ? AND ? IS NOT NULL"',
        (T_STORE, T_ONCE, "-k", "reclaim or stale"),
    ),
    Mutation(
        "a request that gives up leaves what it allocated (neither given back nor sealed)",
        WRITING,
        "        mine = (unwritten - set(replayed) - failed) | (unwritten & plan.moved)\n",
        "        mine: set[int] = set()\n",
        (T_ONCE, "-k", "out_of_time"),
    ),
    Mutation(
        "SQLite writes a small write at or below a timeline's floor (its floors not read)",
        SQLITE_SCHEMA,
        '"ON f.id = v.column1 WHERE f.seq >= v.column2)"',
        '"ON f.id = v.column1 WHERE 0)"',
        (T_STORE, "-k", "floor"),
    ),
    Mutation(
        "SQLite group commit keeps what a write of the group stored, whatever it was refused",
        SQLITE_GROUP,
        "                    if not self._parts.write_all(conn, job.part):\n",
        "                    if not (self._parts.write_all(conn, job.part) or True):\n",
        (T_STORE, "-k", "group"),
    ),
    Mutation(
        "SQLite writes a big write at or below a timeline's floor (its floors not read)",
        SQLITE_WRITING,
        "    if any(firsts[id_] <= floor for id_, floor in floors):\n",
        "    if False:\n",
        (T_STORE, "-k", "floor"),
    ),
    Mutation(
        "sync ignores count (always 100)",
        API,
        "result = ctx.service.sync(member, last_read, count, device)",
        "result = ctx.service.sync(member, last_read, 100, device)",
        (T_API, T_LIFE, "-k", PAGING),
    ),
    Mutation(
        "forward history ignores count (always 100)",
        API,
        "_entries(ctx.service.history(timeline_id, last_read, count))}",
        "_entries(ctx.service.history(timeline_id, last_read, 100))}",
        (T_API, T_LIFE, "-k", PAGING),
    ),
    Mutation(
        "backward history ignores count (always 100)",
        API,
        "page = ctx.service.history_backward(timeline_id, before, count)",
        "page = ctx.service.history_backward(timeline_id, before, 100)",
        (T_API, T_LIFE, "-k", PAGING),
    ),
    Mutation(
        "allocator hands out last + 1 (skips a sequence)",
        ALLOCATE,
        "reply[i - first + 2] = last\n",
        "reply[i - first + 2] = last + 1\n",
        (T_ALLOC,),
    ),
    Mutation(
        "allocator reuses the last sequence (advances by count - 1)",
        ALLOCATE,
        "redis.pcall('INCRBY', KEYS[i], count)",
        "redis.pcall('INCRBY', KEYS[i], count - 1)",
        (T_ALLOC,),
    ),
    Mutation(
        "gap check off (readers step over a hole without looking)",
        READING,
        "                if entry.seq != expected:\n",
        "                if False:\n",
        (T_API, T_READERS, "-k", "hole or gap or write_landing or sealed"),
    ),
    Mutation(
        "replay reallocates (a retry with the same client_msg_id gets new sequences)",
        ALLOCATE,
        "  if record then\n    return {'replay', record}",
        "  if false then\n    return {'replay', record}",
        (T_ALLOC, T_LIFE, T_API, "-k", "record or retr or replay or client_msg_id"),
    ),
    Mutation(
        "the store's record of a message ignored (a retry after Redis forgot stores it again)",
        SQLITE_WRITING,
        "    if conn.execute(CLAIM, (*row, now_ms)).rowcount:\n",
        "    if conn.execute(CLAIM, (*row, now_ms)).rowcount or True:\n",
        (T_MODES, "-k", "forgot and standalone"),
    ),
    Mutation(
        "a bucket call of unknown outcome sent again without a record",
        ALLOCATOR,
        "if record is not None and _unknown(reply):",
        "if _unknown(reply):",
        (T_CLUSTER, "-k", "without_a_record"),
    ),
    Mutation(
        "release gives back a range another allocation came after",
        RELEASE,
        "  if current and current == ARGV[i + 1] then",
        "  if current then",
        (T_ALLOC, "-k", "release"),
    ),
    Mutation(
        "MongoDB sync copies inserted ordered (one taken key stops the rest)",
        MONGO,
        "self._collections[kind].insert_many(documents, ordered=False)",
        "self._collections[kind].insert_many(documents, ordered=True)",
        (T_STORE, "-k", "mongo and (taken or stored_once)"),
    ),
    Mutation(
        "':' accepted in an id",
        VALIDATION,
        '    if ":" in value:\n',
        "    if False:\n",
        (T_API, "-k", "colon"),
    ),
    Mutation(
        "':' accepted in a member list",
        VALIDATION,
        '        and ":" not in joined\n',
        "        and True\n",
        (T_API, "-k", "colon"),
    ),
    Mutation(
        "'/' accepted in an id",
        VALIDATION,
        "    if routable:\n        _unroutable(value, name)\n",
        "    if False:\n        _unroutable(value, name)\n",
        (T_API, "-k", "slash"),
    ),
    Mutation(
        "'/' accepted in a member list",
        VALIDATION,
        '        and "/" not in joined\n',
        "        and True\n",
        (T_API, "-k", "slash"),
    ),
    Mutation(
        "ack removes up to seq + 1",
        READING,
        "self.store.ack(member, upto, min(upto, latest))",
        "self.store.ack(member, upto + 1, min(upto, latest))",
        (T_LIFE, "-k", "ack"),
    ),
    Mutation(
        "ack removes up to seq - 1",
        READING,
        "self.store.ack(member, upto, min(upto, latest))",
        "self.store.ack(member, upto - 1, min(upto, latest))",
        (T_LIFE, "-k", "ack"),
    ),
    Mutation(
        "SQLite ack keeps the acked seq (< instead of <=)",
        SQLITE_STORE,
        'f"DELETE FROM {SYNC} WHERE id = ? AND seq <= ?"',
        'f"DELETE FROM {SYNC} WHERE id = ? AND seq < ?"',
        (T_LIFE, T_STORE, "-k", "ack"),
    ),
    Mutation(
        "MongoDB ack keeps the acked seq ($lt instead of $lte)",
        MONGO,
        'delete_many({"id": member, "seq": {"$lte": seq}})',
        'delete_many({"id": member, "seq": {"$lt": seq}})',
        (T_LIFE, T_STORE, "-k", "ack"),
    ),
    Mutation(
        "SQLite table without UNIQUE (id, seq)",
        SQLITE_SCHEMA,
        "    conv_seq INTEGER NOT NULL DEFAULT 0,\n    UNIQUE (id, seq)\n)",
        "    conv_seq INTEGER NOT NULL DEFAULT 0\n)",
        (T_STORE, "-k", "sqlite and (taken or stored_once)"),
    ),
    Mutation(
        "MongoDB (id, seq) index not unique",
        MONGO,
        "_create_index(collection, INDEX_KEY, unique=True, name=name)",
        "_create_index(collection, INDEX_KEY, unique=False, name=name)",
        (T_STORE, "-k", "mongo and (taken or stored_once)"),
    ),
    Mutation(
        "MongoDB shows clients what a failover can roll back (read concern local)",
        MONGO,
        'VISIBLE = ReadConcern("majority")',
        'VISIBLE = ReadConcern("local")',
        (T_MONGO, "-k", "majority or local"),
    ),
    Mutation(
        "MongoDB keeps a TTL index that deletes below the floors",
        MONGO,
        'if "expireAfterSeconds" in spec:',
        "if False:",
        (T_LIFE, "-k", "redis_lost or ttl"),
    ),
    Mutation(
        "MongoDB purge deletes without raising the floors",
        MONGO,
        "floors.bulk_write(raises, ordered=False)",
        "del raises",
        (T_LIFE, "-k", "redis_lost or (mongo and purge)"),
    ),
    Mutation(
        "MongoDB counts a key taken that a majority does not have",
        MONGO,
        "        if missing:\n            raise NotCommitted(",
        "        if False:\n            raise NotCommitted(",
        (T_MONGO, "-k", "taken_counts"),
    ),
    Mutation(
        "A waiter parks after its read without re-checking (a lost wake-up)",
        "timeline/wakes.py",
        "if entry is None or token != (self._era, entry[0]):",
        "if entry is None:",
        ("tests/test_waiting.py", "-k", "between_the_read"),
    ),
    Mutation(
        "A resubscription wakes no waiter (wake-ups published meanwhile lost)",
        "timeline/wakes.py",
        "woken = [(key, wake) for key, wakes in self._parked.items() for wake in wakes]",
        "woken = []",
        ("tests/test_waiting.py", "-k", "resubscription"),
    ),
    Mutation(
        "A wait ends on the page it parked on though the listener lost wake-ups meanwhile",
        "timeline/wakes.py",
        "            return self.listening\n",
        "            return True\n",
        ("tests/test_waiting.py", "-k", "lost_the_channel"),
    ),
    Mutation(
        "A wait stopped before a hole ends on the page it parked on (a seal wakes nobody)",
        "timeline/api.py",
        'return int(page["latestSeq"]) <= last_read',
        "return True",
        ("tests/test_waiting.py", "-k", "stopped_at_a_hole"),
    ),
    Mutation(
        "A gRPC wait stopped before a hole ends on the page it parked on",
        "timeline/rpc/servicer.py",
        "lambda page: page.latest_seq <= last_read",
        "lambda page: True",
        ("tests/test_grpc.py", "-k", "stopped_at_a_hole"),
    ),
    Mutation(
        "Preparer rebuilds after colliding documents (rescans for ever)",
        "timeline/store/__init__.py",
        "                if self._store.problem():\n",
        "                if False:\n",
        (T_MONGO, "-k", "colliding"),
    ),
]


def snapshot(destination: Path) -> Path:
    """The repository as it is now (others' uncommitted work included), minus the heavy and
    the generated: every mutant starts from this one copy, so all see the same code."""
    target = destination / "snapshot"
    try:
        shutil.copytree(ROOT, target, ignore=IGNORED, symlinks=True)
    except shutil.Error as exc:
        # An editor's temporary file that vanished mid-copy is no part of the code.
        problems = [error for error in exc.args[0] if not _vanished(error[0])]
        if problems:
            raise
    return target


def _vanished(source: str) -> bool:
    return not os.path.lexists(source)


def copy_of(tree: Path, destination: Path) -> Path:
    shutil.copytree(tree, destination, symlinks=True)
    return destination


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.path
    text = path.read_text(encoding="utf-8")
    found = text.count(mutation.old)
    if found != 1:
        raise LookupError(
            f"{mutation.path}: the text to mutate is found {found} times, not once: "
            f"{mutation.old!r}"
        )
    path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")


def check_applies(mutation: Mutation, tree: Path = ROOT) -> str | None:
    """Why the mutation no longer applies to the tree (read only), or None."""
    path = tree / mutation.path
    if not path.exists():
        return f"{mutation.path} does not exist"
    found = path.read_text(encoding="utf-8").count(mutation.old)
    if found != 1:
        return f"{mutation.path}: old text found {found} times, not once: {mutation.old!r}"
    return None


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), str(tree / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_isolated(tree: Path) -> None:
    """The copy, not the working tree, is what the tests import (the editable install points
    at the working tree)."""
    found = subprocess.run(
        [sys.executable, "-c", "import timeline, sys; sys.stdout.write(timeline.__file__)"],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the copy imports timeline from {found}, not from {tree}")


# pytest's short test summary: "FAILED tests/x.py::test_y[a b] - AssertionError: ...". Only
# that section is read: captured log lines ("ERROR    timeline.api:...") look alike.
_SUMMARY = re.compile(r"^=+ short test summary info =+$", re.MULTILINE)
_FAILED = re.compile(r"^(?:FAILED|ERROR) (tests/.+?)(?: - .*)?$", re.MULTILINE)


def run_pytest(tree: Path, arguments: list[str], every: bool = False) -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        *([] if every else ["-x"]),
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfE",
        *arguments,
    ]
    try:
        done = subprocess.run(
            command,
            cwd=tree,
            env=environment(tree),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return done.returncode, done.stdout + done.stderr


def verdict(code: int, output: str) -> str:
    if code == -1:
        return f"killed by a timeout ({TIMEOUT_S} s)"
    if code == 0:
        return "SURVIVED"
    if code == 5:
        return "NO TESTS RAN (the selection matches nothing)"
    summary = _SUMMARY.split(output)[-1] if _SUMMARY.search(output) else ""
    failed = list(dict.fromkeys(_FAILED.findall(summary)))
    if len(failed) > 1:
        return f"killed by {failed[0]} and {len(failed) - 1} more:\n" + "\n".join(
            f"    {test}" for test in failed[1:]
        )
    if failed:
        return f"killed by {failed[0]}"
    return f"killed (pytest exit {code}, no failing test named)"


def targeted_files(mutations: list[Mutation]) -> list[str]:
    """The files the mutations' tests live in, whole: a baseline that covers every selection
    (each -k expression picks a subset of its files), in one pytest run."""
    files: dict[str, None] = {}
    for mutation in mutations:
        arguments = iter(mutation.tests)
        for argument in arguments:
            if argument == "-k":
                next(arguments)
            else:
                files[argument.split("::")[0]] = None
    return list(files)


def selected(names: list[str]) -> list[Mutation]:
    if not names:
        return MUTATIONS
    chosen = []
    for wanted in names:
        matches = [m for m in MUTATIONS if m.name == wanted] or [
            m for m in MUTATIONS if m.name.startswith(wanted)
        ]
        if len(matches) != 1:
            raise SystemExit(f"{wanted!r} names {len(matches)} mutations; see --list")
        chosen += matches
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (names or unique prefixes)")
    parser.add_argument("--all", action="store_true", help="run the whole suite per mutation")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--every", action="store_true", help="name every failing test, not only the first"
    )
    options = parser.parse_args(argv)
    mutations = selected(options.names)
    if options.list:
        for mutation in mutations:
            print(f"{mutation.name}\n    {mutation.path}; tests: {' '.join(mutation.tests)}")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="timeline-mutants-") as scratch:
        pristine = snapshot(Path(scratch))
        stale = [(m, why) for m in mutations if (why := check_applies(m, pristine)) is not None]
        for mutation, why in stale:
            print(f"NOT APPLICABLE  {mutation.name}: {why}", flush=True)
        if stale:
            return 2

        # The baseline: every targeted test file passes before anything is mutated.
        tree = copy_of(pristine, Path(scratch) / "baseline")
        check_isolated(tree)
        arguments = ["tests"] if options.all else targeted_files(mutations)
        code, output = run_pytest(tree, arguments)
        if code != 0:
            print(output[-3000:])
            print(f"BASELINE FAILS ({' '.join(arguments)}): fix the tests first")
            return 2
        shutil.rmtree(tree)
        print(f"baseline passes ({time.monotonic() - started:.0f} s)", flush=True)

        survived = 0
        for number, mutation in enumerate(mutations, 1):
            begun = time.monotonic()
            tree = copy_of(pristine, Path(scratch) / f"mutant-{number}")
            apply(mutation, tree)
            arguments = ["tests"] if options.all else list(mutation.tests)
            code, output = run_pytest(tree, arguments, options.every)
            result = verdict(code, output)
            if not result.startswith("killed"):
                survived += 1
            took = time.monotonic() - begun
            print(f"[{number:2}] {mutation.name} ({took:.0f} s)\n     {result}", flush=True)
            shutil.rmtree(tree)

    total = time.monotonic() - started
    print(f"{len(mutations) - survived} of {len(mutations)} killed in {total:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
