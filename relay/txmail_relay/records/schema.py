"""The records' schema: ordered migrations, the version in ``PRAGMA user_version``.

Version ``n`` means the first ``n`` migrations have been applied; each one runs in its own
transaction together with the version it sets, so a crash leaves the database at the version
before or after it. A database written by a newer relay (a version this code does not know) is
refused rather than guessed at.

Databases written before the schema had a version are at version 0 with some or all of the
tables of migrations 1 and 2 already there (2 is the suppressions table and its backfill), so
those two are written to apply on top of what exists (``IF NOT EXISTS``, ``INSERT OR IGNORE``).
Later migrations may assume the version they start from.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import aiosqlite

_SENDS_AND_EVENTS = """
CREATE TABLE IF NOT EXISTS statuses (
    status_id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    send_id TEXT,
    email_id INTEGER NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    send_result TEXT,
    requested_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS statuses_send_id ON statuses (username, send_id)
    WHERE send_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    spool_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    username TEXT NOT NULL,
    email_id INTEGER NOT NULL,
    message_id TEXT,
    event_id BLOB,
    status_id TEXT,
    sent_at REAL NOT NULL,
    PRIMARY KEY (spool_id, recipient)
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_event_id ON messages (event_id)
    WHERE event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    username TEXT NOT NULL,
    email_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (username, email_id, kind)
);
CREATE TABLE IF NOT EXISTS uniques (
    spool_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (spool_id, recipient, kind)
);
CREATE TABLE IF NOT EXISTS tokens (
    username TEXT PRIMARY KEY,
    last_sent_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    username TEXT NOT NULL,
    address TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_sent REAL NOT NULL,
    properties TEXT NOT NULL,
    unsubscribed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (username, address)
);
"""

# Every recipient that complained or hard-bounced, across tokens. Complaints recorded before
# this table existed are carried over; the backfill adds nothing where the table was already
# kept (a complaint has always been written to both tables at once).
_SUPPRESSIONS = """
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (address, reason)
);
INSERT OR IGNORE INTO suppressions
    SELECT lower(recipient), 'complained', 0 FROM uniques WHERE kind = 'complained';
"""

# IP warm-up: recipients handed to delivery per day of the schedule (records/warmup.py).
_WARMUP = """
CREATE TABLE warmup (
    start TEXT NOT NULL,
    day INTEGER NOT NULL,
    sent INTEGER NOT NULL,
    PRIMARY KEY (start, day)
);
"""

# The send API asks which spooled messages belong to a send status (records/sends.py
# spool_ids: is warm-up holding one of them?); without this index that is a scan of messages.
_MESSAGES_BY_STATUS = """
CREATE INDEX messages_status_id ON messages (status_id) WHERE status_id IS NOT NULL;
"""

# IP warm-up across restarts (records/warmup.py): per spooled message the recipients already
# counted and when it was let out after being held (its queue lifetime starts then), deleted
# when the message is finished; and the relay's own day 1 while the operator has not recorded
# startedAt (one row at most).
_WARMUP_MESSAGES = """
CREATE TABLE warmup_messages (
    spool_id TEXT PRIMARY KEY,
    admitted TEXT NOT NULL,
    held INTEGER NOT NULL,
    released_at REAL
);
CREATE TABLE warmup_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    started_at REAL NOT NULL
);
"""

# Issue 12, the feedback loop.
# * events: the log of what happened to each recipient (records/events.py, model.Event); seq
#   is the cursor of the events API and of the webhooks' per-subscription outbox, so it must
#   never be reused (AUTOINCREMENT). detail is JSON text. Indexes: per namespace and per token
#   in seq order (the API and the webhooks), a recipient or a statusId within a namespace,
#   and the time (the API's window, pruning).
# * messages learn the token (namespace and name) that sent them, so every later event of a
#   message carries it; mail recorded before has "" (unknown).
# * statuses: the asynchronous bounce shown in an API send's status view (JSON, or NULL).
# * suppressions become per namespace with HubSpot-style reasons; the relay-wide entries
#   recorded before are carried over with namespace "" (relay-wide: they apply to every
#   namespace and no namespace can remove them).
_FEEDBACK = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    created REAL NOT NULL,
    namespace TEXT NOT NULL,
    token TEXT NOT NULL,
    username TEXT NOT NULL,
    email_id INTEGER NOT NULL,
    status_id TEXT,
    spool_id TEXT,
    recipient TEXT NOT NULL,
    message_id TEXT,
    reply TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX events_namespace ON events (namespace, seq);
CREATE INDEX events_username ON events (username, seq);
CREATE INDEX events_recipient ON events (namespace, recipient COLLATE NOCASE, seq);
CREATE INDEX events_status_id ON events (status_id, seq) WHERE status_id IS NOT NULL;
CREATE INDEX events_created ON events (created);
ALTER TABLE messages ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN token TEXT NOT NULL DEFAULT '';
ALTER TABLE statuses ADD COLUMN bounce TEXT;
CREATE TABLE suppressions_v6 (
    namespace TEXT NOT NULL,
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (namespace, address, reason)
);
INSERT OR IGNORE INTO suppressions_v6
    SELECT '', lower(address),
        CASE reason WHEN 'bounced' THEN 'HARD_BOUNCE' WHEN 'complained' THEN 'SPAM_REPORT'
        ELSE reason END,
        at
    FROM suppressions;
DROP TABLE suppressions;
ALTER TABLE suppressions_v6 RENAME TO suppressions;
CREATE INDEX suppressions_address ON suppressions (address);
"""

# Webhook subscriptions (records/webhooks.py): per subscription the cursor over events (the
# outbox is the events log), the batch in flight (its seq range, webhook-id and filter, written
# before its first attempt), its attempts, and the failure and success figures of its status.
_WEBHOOKS = """
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    name TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    batch_first INTEGER,
    batch_last INTEGER,
    batch_size INTEGER,
    batch_id TEXT,
    batch_types TEXT,
    batch_formed REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_since REAL,
    last_error TEXT,
    last_success REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    removed REAL
);
"""

# The events API and the webhooks filter by type within a token or a namespace: without these a
# poll for a rare type (eventType=BOUNCE) walks every event of the token after its offset.
_EVENTS_BY_TYPE = """
CREATE INDEX events_username_type ON events (username, type, seq);
CREATE INDEX events_namespace_type ON events (namespace, type, seq);
"""

MIGRATIONS: tuple[str, ...] = (
    _SENDS_AND_EVENTS,
    _SUPPRESSIONS,
    _WARMUP,
    _MESSAGES_BY_STATUS,
    _WARMUP_MESSAGES,
    _FEEDBACK,
    _WEBHOOKS,
    _EVENTS_BY_TYPE,
)
VERSION = len(MIGRATIONS)


class SchemaError(Exception):
    """The database cannot be used by this relay (written by a newer one)."""


async def version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the database to :data:`VERSION`; raises :class:`SchemaError` if it is newer."""
    found = await version(db)
    if found > VERSION:
        raise SchemaError(
            f"{path}: records schema version {found} is newer than this relay knows"
            f" ({VERSION}); it was written by a newer relay, run that one (or a newer one)"
        )
    for number in range(found + 1, VERSION + 1):
        try:
            # executescript runs statements as written (the connection is in autocommit
            # mode): the migration and its version commit together or not at all.
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[number - 1]}\n"
                f"PRAGMA user_version = {number};\nCOMMIT;"
            )
        except BaseException:
            with contextlib.suppress(sqlite3.OperationalError):  # no transaction left open
                await db.execute("ROLLBACK")
            raise
