"""The SQLite store's file: its tables, the SQL text every part of the store runs on them, and
the migration of a file an earlier version made (all done once, as the store opens)."""

from __future__ import annotations

import functools
import logging
import sqlite3

from timeline.model import Kind
from timeline.store import COLLECTIONS

log = logging.getLogger(__name__)

HISTORY = COLLECTIONS[Kind.HISTORY]
SYNC = COLLECTIONS[Kind.SYNC]

# A rowid table with a unique (id, seq) index. Rows append in rowid order, which is also
# the order of their creation time: the purge finds the expired ones by a binary search on
# rowid, so no index on created_at has to be kept up on every insert (it cost a 10,000-copy
# fan-out about 30% more). Every scan of a timeline is served by the unique index.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    mid TEXT NOT NULL DEFAULT '',
    conv_kind TEXT NOT NULL DEFAULT '',
    conv TEXT NOT NULL DEFAULT '',
    conv_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (id, seq)
)
"""
# A sync entry's conversation (the About of its copy): kind, name as the member knows it,
# and the message's history sequence. Added to a file an earlier version made.
_ABOUT_COLUMNS = (
    ("conv_kind", "TEXT NOT NULL DEFAULT ''"),
    ("conv", "TEXT NOT NULL DEFAULT ''"),
    ("conv_seq", "INTEGER NOT NULL DEFAULT 0"),
)
# The placeholders of a history timeline, and only they: a conversation's unread count
# subtracts those after the read position (a hole sealed holds no message), one probe each.
_HOLES_INDEX = "CREATE INDEX IF NOT EXISTS {table}_holes ON {table} (id, seq) WHERE mid = '~hole'"

# What ack and purge removed, per timeline: the highest sequence the table no longer holds,
# so that counters Redis lost still continue above it.
_FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table}_floor (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID
"""
# Nothing is written at or below a timeline's floor (what ack and purge removed): a counter
# that lags behind (a Redis replica promoted before it caught up) would otherwise put a
# message where no reader looks any more. The write sees a taken key and moves above. The
# floors of a write's timelines are read in its own transaction (writing.insert): floors
# rise only in write transactions, so none rises between that read and the insert. (Earlier
# versions checked each row in a trigger: 25 ms of a 10,000-row write; dropped at open.)
_FLOOR_GUARD_DROP = "DROP TRIGGER IF EXISTS {table}_floor_guard"
_FLOORS_OF = "SELECT id, seq FROM {table}_floor WHERE id IN (SELECT value FROM json_each(?))"
RAISE_FLOOR = """
INSERT INTO {table}_floor (id, seq) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET seq = MAX(seq, excluded.seq)
"""
# Idempotent messages' records (Store.claim): which sequences each holds. `lasts` is the
# record's integers in decimal, joined by commas ("7,12,3,40"), as Redis holds them: a byte
# a digit and one a comma, so a 10,000-member fan-out's record (10,001 integers) is about
# 70 KB at sequences below a million; only a retry reads it back. A rowid table: SQLite
# advises WITHOUT ROWID only for rows well under a page. The index on expires_ms serves
# the purge (forget_expired_claims), never a request.
IDEMPOTENCY = "idempotency"
_IDEMPOTENCY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {IDEMPOTENCY} (
    mid TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    lasts TEXT NOT NULL,
    allocated_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
)
"""
_IDEMPOTENCY_EXPIRY = (
    f"CREATE INDEX IF NOT EXISTS {IDEMPOTENCY}_expires ON {IDEMPOTENCY} (expires_ms)"
)
# Stored unless an unexpired record of the mid is: an expired one is replaced in place.
CLAIM = f"""
INSERT INTO {IDEMPOTENCY} (mid, fingerprint, lasts, allocated_ms, expires_ms)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (mid) DO UPDATE SET fingerprint = excluded.fingerprint, lasts = excluded.lasts,
    allocated_ms = excluded.allocated_ms, expires_ms = excluded.expires_ms
WHERE {IDEMPOTENCY}.expires_ms <= ?
"""
CLAIMED = f"SELECT fingerprint, lasts, allocated_ms, expires_ms FROM {IDEMPOTENCY} WHERE mid = ?"
RECLAIM = f"UPDATE {IDEMPOTENCY} SET lasts = ? WHERE mid = ? AND fingerprint = ? AND lasts = ?"
FORGET_EXPIRED = (
    f"DELETE FROM {IDEMPOTENCY} WHERE rowid IN "
    f"(SELECT rowid FROM {IDEMPOTENCY} WHERE expires_ms <= ? LIMIT ?)"
)
COLUMNS = "(id, seq, message, created_at, mid, conv_kind, conv, conv_seq)"
ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
INSERT = {table: f"INSERT INTO {table} {COLUMNS} VALUES {ROW}" for table in COLLECTIONS.values()}
# What an entry is read back as (model.Entry, in its order).
ENTRY = "seq, message, created_at, mid, conv_kind, conv, conv_seq"
FLOORS = {table: _FLOORS_OF.format(table=table) for table in COLLECTIONS.values()}
# A small write (a send's copies, a small group's) is one statement per table: its rows,
# inserted only if no timeline's range starts at or below its floor (0 rows inserted then).
# One statement instead of a floor lookup and a step per row: each is a moment without the
# GIL, and getting it back (other request threads want it too) keeps the write lock held
# longer. Up to this many rows (so as many timelines at most) are bound one by one.
FEW = 64


@functools.lru_cache(maxsize=256)
def guarded_insert(table: str, rows: int, timelines: int) -> str:
    """The small write's statement for `rows` rows of `timelines` timelines (see FEW)."""
    values = ", ".join([ROW] * rows)
    firsts = ", ".join(["(?, ?)"] * timelines)
    return (
        f"INSERT INTO {table} {COLUMNS} SELECT * FROM (VALUES {values}) WHERE NOT EXISTS "
        f"(SELECT 1 FROM (VALUES {firsts}) AS v JOIN {table}_floor AS f "
        "ON f.id = v.column1 WHERE f.seq >= v.column2)"
    )


# The ranges of sequences a statement is given as one JSON parameter: [[id, first, last]...].
RANGES_JOIN = (
    "json_each(?) AS r CROSS JOIN {table} AS t ON t.id = json_extract(r.value, '$[0]') "
    "AND t.seq BETWEEN json_extract(r.value, '$[1]') AND json_extract(r.value, '$[2]')"
)
# Which of these sync ranges (by index) hold a document, or lie at or below their floor
# (the floor guard would refuse them): each an index range scan and a floor lookup.
TAKEN_RANGES = f"""
SELECT r.key FROM json_each(?) AS r
WHERE EXISTS (
    SELECT 1 FROM {SYNC} AS t WHERE t.id = json_extract(r.value, '$[0]')
    AND t.seq BETWEEN json_extract(r.value, '$[1]') AND json_extract(r.value, '$[2]')
) OR json_extract(r.value, '$[1]') <= (
    SELECT seq FROM {SYNC}_floor WHERE id = json_extract(r.value, '$[0]')
)
"""


def create(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Make the file's tables (or bring an earlier version's to them), in WAL mode. Several
    workers open the file at once: meanwhile SQLite's own busy handler waits, up to the
    busy timeout; it is off again after (see connections.Connections.begin)."""
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("SELECT json_extract('[1]', '$[0]')")  # the JSON functions exist
    for table in COLLECTIONS.values():
        _migrate(conn, table)
        conn.execute(_SCHEMA.format(table=table))
        conn.execute(_FLOOR_SCHEMA.format(table=table))
        conn.execute(_FLOOR_GUARD_DROP.format(table=table))
    for table in COLLECTIONS.values():
        _add_about_columns(conn, table)
    conn.execute(_HOLES_INDEX.format(table=HISTORY))
    # In a file an earlier version made too: IF NOT EXISTS.
    conn.execute(_IDEMPOTENCY_SCHEMA)
    conn.execute(_IDEMPOTENCY_EXPIRY)
    for statement in _CONVERSATION_SCHEMA:
        conn.execute(statement)
    conn.execute("PRAGMA busy_timeout = 0")


def _add_about_columns(conn: sqlite3.Connection, table: str) -> None:
    """Add the sync entry's conversation columns to a table an earlier version made. Every
    worker (and gRPC process) opens the file at once: the columns are looked at again under
    the write lock, so that one process adds them and the others find them added."""
    if not _missing_about_columns(conn, table):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name, definition in _missing_about_columns(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _missing_about_columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    return [(name, definition) for name, definition in _ABOUT_COLUMNS if name not in columns]


def _migrate(conn: sqlite3.Connection, table: str) -> None:
    """Bring a file an earlier version made (WITHOUT ROWID, no mid) to the schema."""
    found = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if found is None or "WITHOUT ROWID" not in found[0].upper():
        return
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    mid = "mid" if "mid" in columns else "''"
    log.warning("migrating sqlite table %s to the current schema", table)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    conn.execute(_SCHEMA.format(table=table))
    conn.execute(
        f"INSERT INTO {table} (id, seq, message, created_at, mid) "
        f"SELECT id, seq, message, created_at, {mid} FROM {table}_old ORDER BY created_at"
    )
    conn.execute(f"DROP TABLE {table}_old")
    conn.execute(f"DROP INDEX IF EXISTS {table}_created")
    conn.execute("COMMIT")


# --- conversations, read positions, devices ------------------------------------------------
#
# One row per conversation (its history timeline): its latest message, and the digest of the
# member list last recorded (a group's sends mostly list the same members: then no
# membership is written). One row per member and conversation: what the member calls it, its
# read position, and whether it is in the member's list (a read position alone is not). One
# row per member and device. All WITHOUT ROWID, small rows looked up by their key (a rowid
# table with a TEXT primary key is two b-trees to write on every send). A conversation's row
# names its latest message by sequence; the message itself is read from the history (a send
# writes it once more than before, not twice).
CONVERSATIONS = "conversations"
MEMBERSHIPS = "memberships"
DEVICES = "devices"
_CONVERSATION_SCHEMA = (
    f"""
CREATE TABLE IF NOT EXISTS {CONVERSATIONS} (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    latest INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT 0,
    members TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID
""",
    f"""
CREATE TABLE IF NOT EXISTS {MEMBERSHIPS} (
    member TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    peer TEXT NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    listed INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (member, id)
) WITHOUT ROWID
""",
    # A conversation's memberships, for the member list's changes (see UNLIST_OTHERS).
    f"CREATE INDEX IF NOT EXISTS {MEMBERSHIPS}_of ON {MEMBERSHIPS} (id, listed)",
    f"""
CREATE TABLE IF NOT EXISTS {DEVICES} (
    member TEXT NOT NULL,
    device TEXT NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (member, device)
) WITHOUT ROWID
""",
)
# The conversation's latest message moves only up: a lower `last` (a late write, a retry)
# changes nothing.
RAISE_CONVERSATION = f"""
INSERT INTO {CONVERSATIONS} (id, kind, latest, created_at) VALUES (?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET latest = excluded.latest, created_at = excluded.created_at
WHERE excluded.latest > {CONVERSATIONS}.latest
RETURNING members
"""
MEMBERS_DIGEST = f"SELECT members FROM {CONVERSATIONS} WHERE id = ?"
HIGHEST_BELOW = f"SELECT MAX(seq) FROM {HISTORY} WHERE id = ? AND seq < ?"
SET_MEMBERS_DIGEST = f"UPDATE {CONVERSATIONS} SET members = ? WHERE id = ?"
LIST_MEMBER = f"""
INSERT INTO {MEMBERSHIPS} (member, id, kind, peer, read_seq) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (member, id) DO UPDATE SET listed = 1 WHERE NOT {MEMBERSHIPS}.listed
"""
# A member the conversation's new member list leaves out (removed from a group) leaves the
# list: it is no longer sent the conversation's messages, so its list stops showing them.
UNLIST_OTHERS = f"""
UPDATE {MEMBERSHIPS} SET listed = 0
WHERE id = ? AND listed AND member NOT IN (SELECT value FROM json_each(?))
"""
# A read position moves only up, and never above the conversation's latest.
RAISE_READ = f"""
INSERT INTO {MEMBERSHIPS} (member, id, kind, peer, read_seq, listed)
VALUES (?1, ?2, ?3, ?4,
    MIN(?5, COALESCE((SELECT latest FROM {CONVERSATIONS} WHERE id = ?2), 0)), ?6)
ON CONFLICT (member, id) DO UPDATE SET read_seq = MAX(read_seq, excluded.read_seq),
    listed = MAX(listed, excluded.listed)
"""
# The sender's own message: its position moves to it (the conversation's latest may not be
# raised yet in this transaction's order, so no clamp: it is at most what was allocated).
RAISE_SENDER_READ = f"""
INSERT INTO {MEMBERSHIPS} (member, id, kind, peer, read_seq) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (member, id) DO UPDATE SET read_seq = MAX(read_seq, excluded.read_seq), listed = 1
"""
_STATE = f"""
SELECT c.kind, c.id, m.peer, c.latest, MIN(m.read_seq, c.latest), l.message, l.created_at,
    l.mid, (SELECT COUNT(*) FROM {HISTORY} AS h
        WHERE h.id = c.id AND h.seq > m.read_seq AND h.seq <= c.latest AND h.mid = '~hole'),
    c.created_at
FROM {{source}}
"""
# The list: the member's memberships (its primary key's range), each joined to its
# conversation, ordered by activity; the holes are counted for the page's rows only.
CONVERSATION_PAGE = _STATE.format(
    source=f"""(SELECT * FROM {MEMBERSHIPS} AS m0 JOIN {CONVERSATIONS} AS c0 ON c0.id = m0.id
        WHERE m0.member = ?1 AND m0.listed AND (c0.created_at, c0.id) < (?2, ?3)
        ORDER BY c0.created_at DESC, c0.id DESC LIMIT ?4) AS p
    JOIN {MEMBERSHIPS} AS m ON m.member = p.member AND m.id = p.id
    JOIN {CONVERSATIONS} AS c ON c.id = p.id
    LEFT JOIN {HISTORY} AS l ON l.id = c.id AND l.seq = c.latest AND l.mid != '~hole'
    ORDER BY c.created_at DESC, c.id DESC"""
)
CONVERSATION_OF = _STATE.format(
    source=f"""{MEMBERSHIPS} AS m LEFT JOIN {CONVERSATIONS} AS c ON c.id = m.id
    LEFT JOIN {HISTORY} AS l ON l.id = c.id AND l.seq = c.latest AND l.mid != '~hole'
    WHERE m.member = ? AND m.id = ?"""
)
DEVICE_SEEN = f"""
INSERT INTO {DEVICES} (member, device, position, last_seen) VALUES (?, ?, 0, ?)
ON CONFLICT (member, device) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen)
"""
DEVICE_ACK = f"""
INSERT INTO {DEVICES} (member, device, position, last_seen) VALUES (?, ?, ?, ?)
ON CONFLICT (member, device) DO UPDATE SET position = MAX(position, excluded.position),
    last_seen = MAX(last_seen, excluded.last_seen)
"""
DEVICES_LOWEST = f"SELECT MIN(position) FROM {DEVICES} WHERE member = ? AND last_seen >= ?"
DEVICES_OF = f"SELECT device, position, last_seen FROM {DEVICES} WHERE member = ? ORDER BY device"
