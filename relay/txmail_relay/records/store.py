"""The relay's local store: send statuses, per-token and per-email events, contacts.

SQLite (stdlib) in WAL mode, in the spool directory, so it survives restarts with the
spool. One connection, used by one worker thread only: every call is a short transaction
run off the event loop (:meth:`Store.call`), and fire-and-forget writes (:meth:`Store.submit`)
keep outcome listeners non-blocking.

Tables:

* ``statuses``: one row per API/template send (``statusId``), unique per (token, sendId),
  so a repeated sendId finds the first send. A reservation is inserted before spooling; a
  send that never reached the spool (the process died in between, so the client got no
  answer) is removed on open, and a retry with the same sendId sends again. This is the
  spool's own at-least-once window.
* ``messages``: (spool id, recipient) -> token, emailId, Message-ID, tracking event id and
  statusId; what outcomes, opens, clicks and complaints are tied to.
* ``counters``: per (token, emailId, kind) counts (emailId 0 = plain SMTP mail).
* ``uniques``: (spool id, recipient, kind) for unique opens and clicks.
* ``contacts``: per (token, address) for tokens with ``createContacts``.
* ``suppressions``: (address, reason) for every recipient that complained or hard-bounced
  (a 5xx outcome), across tokens; consulted only when the DedicatedIP opts into suppression.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from txmail_relay.outcomes import Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_NAME = "txmail.db"

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (address, reason)
);
"""

# Complaints recorded before the suppressions table existed (once, when it is created).
_BACKFILL = """
INSERT OR IGNORE INTO suppressions
    SELECT lower(recipient), 'complained', 0 FROM uniques WHERE kind = 'complained';
"""


class Kind(StrEnum):
    """Event kinds counted per token and per email."""

    SENT = "sent"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    OPENED = "opened"
    CLICKED = "clicked"
    UNIQUE_OPENED = "unique_opened"
    UNIQUE_CLICKED = "unique_clicked"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


class Suppression(StrEnum):
    """Why a recipient may be suppressed; the values are also the store's reasons."""

    BOUNCED = "bounced"
    COMPLAINED = "complained"


class SendState(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    CANCELED = "CANCELED"
    COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class SendStatus:
    status_id: str
    username: str
    send_id: str | None
    email_id: int
    recipient: str
    status: SendState
    send_result: str | None
    requested_at: float
    started_at: float | None
    completed_at: float | None


@dataclass(frozen=True)
class SentCopy:
    """One recipient of one spooled message."""

    spool_id: str
    recipient: str
    message_id: str | None = None
    event_id: bytes | None = None
    status_id: str | None = None


@dataclass(frozen=True)
class Recipient:
    """What a tracking event id or a Message-ID leads back to."""

    spool_id: str
    recipient: str
    username: str
    email_id: int


@dataclass(frozen=True)
class Contact:
    address: str
    first_seen: float
    last_sent: float
    properties: Mapping[str, Any]
    unsubscribed: bool


_OUTCOME_KIND = {
    Outcome.DELIVERED: Kind.DELIVERED,
    Outcome.DEFERRED: Kind.DEFERRED,
    Outcome.BOUNCED: Kind.BOUNCED,
    Outcome.EXPIRED: Kind.EXPIRED,
}


def _status(row: sqlite3.Row) -> SendStatus:
    return SendStatus(
        status_id=row["status_id"],
        username=row["username"],
        send_id=row["send_id"],
        email_id=row["email_id"],
        recipient=row["recipient"],
        status=SendState(row["status"]),
        send_result=row["send_result"],
        requested_at=row["requested_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
    )


class Store:
    """The SQLite store; ``open()`` before use, ``close()`` at the end."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / DB_NAME
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()

    # -- lifecycle and threading -------------------------------------------------------------

    async def open(self) -> None:
        await self.call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        new_table = not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'suppressions'"
        ).fetchone()
        db.executescript(_SCHEMA)
        if new_table:
            db.executescript(_BACKFILL)
        # Reservations that never reached the spool: the client got no answer and retries.
        db.execute("DELETE FROM statuses WHERE status = ?", (SendState.PENDING.value,))
        self._db = db

    async def close(self) -> None:
        await self.drain()
        await self.call(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire and forget (outcome listeners must not block); failures are logged."""
        future = self._executor.submit(fn, *args)
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        self._pending.discard(future)
        error = future.exception()
        if error is not None:
            log.error("store write failed: %s", type(error).__name__, exc_info=error)

    async def drain(self) -> None:
        """Wait for fire-and-forget writes submitted so far."""
        await self.call(lambda: None)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One short write transaction (the connection is in autocommit mode otherwise)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _bump(self, username: str, email_id: int, kind: Kind, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (username, email_id, kind)"
            " DO UPDATE SET n = n + excluded.n",
            (username, email_id, kind.value, n),
        )

    # -- send statuses ------------------------------------------------------------------------

    def reserve(
        self, username: str, send_id: str | None, email_id: int, recipient: str
    ) -> tuple[SendStatus, bool]:
        """A new PENDING status, or the existing one of (username, send_id) and False."""
        db = self.db
        with self._tx():
            if send_id is not None:
                row = db.execute(
                    "SELECT * FROM statuses WHERE username = ? AND send_id = ?",
                    (username, send_id),
                ).fetchone()
                if row is not None:
                    return _status(row), False
            status = SendStatus(
                status_id=str(uuid.uuid4()),
                username=username,
                send_id=send_id,
                email_id=email_id,
                recipient=recipient,
                status=SendState.PENDING,
                send_result=None,
                requested_at=self._clock(),
                started_at=None,
                completed_at=None,
            )
            db.execute(
                "INSERT INTO statuses VALUES (?, ?, ?, ?, ?, ?, NULL, ?, NULL, NULL)",
                (
                    status.status_id,
                    username,
                    send_id,
                    email_id,
                    recipient,
                    status.status.value,
                    status.requested_at,
                ),
            )
        return status, True

    def release(self, status_id: str) -> None:
        """Drop a reservation whose send did not reach the spool (a retry may send)."""
        with self._tx():
            self.db.execute(
                "DELETE FROM statuses WHERE status_id = ? AND status = ?",
                (status_id, SendState.PENDING.value),
            )

    def status(self, username: str, status_id: str) -> SendStatus | None:
        row = self.db.execute(
            "SELECT * FROM statuses WHERE status_id = ? AND username = ?", (status_id, username)
        ).fetchone()
        return None if row is None else _status(row)

    # -- sends and outcomes -------------------------------------------------------------------

    def record_sent(
        self,
        username: str,
        email_id: int,
        copies: Iterable[SentCopy],
        *,
        contacts: Mapping[str, Any] | None = None,
        queued_status: str | None = None,
    ) -> None:
        """Spooled copies: counted as sent; with ``contacts`` (createContacts tokens) each
        recipient becomes or updates a contact with these properties."""
        now = self._clock()
        db = self.db
        with self._tx():
            count = 0
            for copy in copies:
                db.execute(
                    "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        copy.spool_id,
                        copy.recipient,
                        username,
                        email_id,
                        copy.message_id,
                        copy.event_id,
                        copy.status_id,
                        now,
                    ),
                )
                count += 1
                if contacts is not None:
                    self._contact(username, copy.recipient, contacts, now)
            if count:
                self._bump(username, email_id, Kind.SENT, count)
                db.execute(
                    "INSERT INTO tokens VALUES (?, ?) ON CONFLICT (username)"
                    " DO UPDATE SET last_sent_at = excluded.last_sent_at",
                    (username, now),
                )
            if queued_status is not None:
                db.execute(
                    "UPDATE statuses SET status = ?, send_result = 'QUEUED', started_at = ?"
                    " WHERE status_id = ? AND status = ?",
                    (SendState.PROCESSING.value, now, queued_status, SendState.PENDING.value),
                )

    def _contact(
        self, username: str, address: str, properties: Mapping[str, Any], now: float
    ) -> None:
        address = address.lower()
        row = self.db.execute(
            "SELECT properties FROM contacts WHERE username = ? AND address = ?",
            (username, address),
        ).fetchone()
        merged = {**(json.loads(row["properties"]) if row else {}), **properties}
        self.db.execute(
            "INSERT INTO contacts VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (username, address)"
            " DO UPDATE SET last_sent = excluded.last_sent, properties = excluded.properties",
            (username, address, now, now, json.dumps(merged, sort_keys=True)),
        )

    def record_outcome(
        self, spool_id: str, username: str, recipient: str, outcome: Outcome, at: float
    ) -> None:
        db = self.db
        with self._tx():
            row = db.execute(
                "SELECT email_id, status_id FROM messages WHERE spool_id = ? AND recipient = ?",
                (spool_id, recipient),
            ).fetchone()
            email_id = row["email_id"] if row else 0
            self._bump(username, email_id, _OUTCOME_KIND[outcome])
            if outcome is Outcome.BOUNCED:
                self._suppress(recipient, Suppression.BOUNCED, at)
            if row is None or row["status_id"] is None or not outcome.final:
                return
            result = "SENT" if outcome is Outcome.DELIVERED else "UNDELIVERABLE"
            db.execute(
                "UPDATE statuses SET status = ?, send_result = ?, completed_at = ?"
                " WHERE status_id = ? AND recipient = ? AND status = ?",
                (
                    SendState.COMPLETE.value,
                    result,
                    at,
                    row["status_id"],
                    recipient,
                    SendState.PROCESSING.value,
                ),
            )

    # -- engagement ---------------------------------------------------------------------------

    def _by_event(self, event_id: bytes) -> Recipient | None:
        row = self.db.execute(
            "SELECT spool_id, recipient, username, email_id FROM messages WHERE event_id = ?",
            (event_id,),
        ).fetchone()
        return None if row is None else Recipient(*row)

    def record_engagement(self, event_id: bytes, kind: Kind) -> Recipient | None:
        """An open or a click of a tracked recipient; returns it, or None if unknown."""
        unique = {Kind.OPENED: Kind.UNIQUE_OPENED, Kind.CLICKED: Kind.UNIQUE_CLICKED}[kind]
        db = self.db
        with self._tx():
            found = self._by_event(event_id)
            if found is None:
                return None
            self._bump(found.username, found.email_id, kind)
            first = db.execute(
                "INSERT OR IGNORE INTO uniques VALUES (?, ?, ?)",
                (found.spool_id, found.recipient, kind.value),
            ).rowcount
            if first:
                self._bump(found.username, found.email_id, unique)
        return found

    def find_message(self, message_id: str, recipients: Iterable[str]) -> Recipient | None:
        """The recipient a Message-ID was sent to (preferring one of ``recipients``)."""
        rows = [
            Recipient(*r)
            for r in self.db.execute(
                "SELECT spool_id, recipient, username, email_id FROM messages"
                " WHERE message_id = ? ORDER BY rowid",
                (message_id,),
            )
        ]
        wanted = {r.lower() for r in recipients}
        for row in rows:
            if row.recipient.lower() in wanted:
                return row
        return rows[0] if len(rows) == 1 else None

    def record_complaint(self, found: Recipient) -> bool:
        """A complaint and an unsubscribe, once per (message, recipient)."""
        db = self.db
        with self._tx():
            first = db.execute(
                "INSERT OR IGNORE INTO uniques VALUES (?, ?, ?)",
                (found.spool_id, found.recipient, Kind.COMPLAINED.value),
            ).rowcount
            if not first:
                return False
            self._bump(found.username, found.email_id, Kind.COMPLAINED)
            self._bump(found.username, found.email_id, Kind.UNSUBSCRIBED)
            self._suppress(found.recipient, Suppression.COMPLAINED, self._clock())
            db.execute(
                "UPDATE contacts SET unsubscribed = 1 WHERE username = ? AND address = ?",
                (found.username, found.recipient.lower()),
            )
        return True

    # -- suppression --------------------------------------------------------------------------

    def _suppress(self, address: str, reason: Suppression, at: float) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?)",
            (address.lower(), reason.value, at),
        )

    def suppressed(
        self, addresses: Iterable[str], reasons: Iterable[Suppression]
    ) -> dict[str, Suppression]:
        """The addresses (as given) recorded for one of ``reasons``, each with its reason.

        Case-insensitive; a bounce is reported before a complaint.
        """
        wanted = sorted(set(reasons))  # "bounced" < "complained"
        given = {a.lower(): a for a in addresses}
        if not wanted or not given:
            return {}
        result: dict[str, Suppression] = {}
        marks = ",".join("?" * len(wanted))
        for lowered, original in given.items():
            row = self.db.execute(
                f"SELECT reason FROM suppressions WHERE address = ? AND reason IN ({marks})"  # noqa: S608 - only placeholders
                " ORDER BY reason LIMIT 1",
                (lowered, *(r.value for r in wanted)),
            ).fetchone()
            if row is not None:
                result[original] = Suppression(row[0])
        return result

    # -- reading ------------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[Kind, int]]:
        """Per token: totals of every kind over all emails."""
        result: dict[str, dict[Kind, int]] = {}
        for row in self.db.execute(
            "SELECT username, kind, SUM(n) FROM counters GROUP BY username, kind"
        ):
            result.setdefault(row[0], {})[Kind(row[1])] = int(row[2])
        return result

    def email_counters(self, username: str) -> dict[int, dict[Kind, int]]:
        result: dict[int, dict[Kind, int]] = {}
        for row in self.db.execute(
            "SELECT email_id, kind, n FROM counters WHERE username = ?", (username,)
        ):
            result.setdefault(row[0], {})[Kind(row[1])] = int(row[2])
        return result

    def last_sent(self) -> dict[str, float]:
        return {r[0]: r[1] for r in self.db.execute("SELECT username, last_sent_at FROM tokens")}

    def contact_counts(self) -> dict[str, int]:
        return {
            r[0]: r[1]
            for r in self.db.execute("SELECT username, COUNT(*) FROM contacts GROUP BY username")
        }

    def contacts(self, username: str, *, after: str = "", limit: int = 100) -> list[Contact]:
        return [
            Contact(
                address=r["address"],
                first_seen=r["first_seen"],
                last_sent=r["last_sent"],
                properties=json.loads(r["properties"]),
                unsubscribed=bool(r["unsubscribed"]),
            )
            for r in self.db.execute(
                "SELECT * FROM contacts WHERE username = ? AND address > ?"
                " ORDER BY address LIMIT ?",
                (username, after, limit),
            )
        ]
