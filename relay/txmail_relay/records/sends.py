"""Sends: the status of each API/template send, and every spooled recipient.

* ``statuses``: one row per API/template send (``statusId``), unique per (token, sendId),
  so a repeated sendId finds the first send. A reservation is inserted before spooling; a
  send that never reached the spool (the process died in between, so the client got no
  answer) is removed on open, and a retry with the same sendId sends again. This is the
  spool's own at-least-once window.
* ``messages``: (spool id, recipient) -> token, emailId, Message-ID, tracking event id and
  statusId; what outcomes, opens, clicks and complaints are tied to
  (:mod:`txmail_relay.records.events`), and the namespace and name of the SmtpToken that sent
  it, which every later event of the message carries.

Recording copies logs a SENT event per recipient; a refused send logs a DROPPED one
(:meth:`Sends.dropped`), each in the same transaction as its counters.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiosqlite

from txmail_relay.contract import SendState
from txmail_relay.records import counters
from txmail_relay.records.contacts import upsert_sync as upsert_contacts
from txmail_relay.records.database import Database
from txmail_relay.records.events import append as append_event
from txmail_relay.records.events import append_sync
from txmail_relay.records.model import EventType, Kind, Recipient, SendStatus, SentCopy


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
        bounce=json.loads(row["bounce"]) if row["bounce"] else None,
    )


async def drop_unspooled(db: aiosqlite.Connection) -> None:
    """On open: reservations that never reached the spool (the client got no answer)."""
    await db.execute("DELETE FROM statuses WHERE status = ?", (SendState.PENDING.value,))


class Sends:
    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def reserve(
        self, username: str, send_id: str | None, email_id: int, recipient: str
    ) -> Awaitable[tuple[SendStatus, bool]]:
        """A new PENDING status and True, or the existing one of (username, send_id) and
        False."""

        async def write(db: aiosqlite.Connection) -> tuple[SendStatus, bool]:
            if send_id is not None:
                for row in await db.execute_fetchall(
                    "SELECT * FROM statuses WHERE username = ? AND send_id = ?",
                    (username, send_id),
                ):
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
            await db.execute(
                "INSERT INTO statuses (status_id, username, send_id, email_id, recipient, status,"
                " requested_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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

        return self._db.write(write)

    def release(self, status_id: str) -> Awaitable[None]:
        """Drop a reservation whose send did not reach the spool (a retry may send)."""

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM statuses WHERE status_id = ? AND status = ?",
                (status_id, SendState.PENDING.value),
            )

        return self._db.write(write)

    async def spool_ids(self, status_id: str) -> list[str]:
        """The spooled messages of a send (what the warm-up gate may be holding)."""

        async def read(db: aiosqlite.Connection) -> list[str]:
            rows = await db.execute_fetchall(
                "SELECT DISTINCT spool_id FROM messages WHERE status_id = ?", (status_id,)
            )
            return [r[0] for r in rows]

        return await self._db.read(read)

    async def get(self, username: str, status_id: str) -> SendStatus | None:
        async def read(db: aiosqlite.Connection) -> SendStatus | None:
            rows = await db.execute_fetchall(
                "SELECT * FROM statuses WHERE status_id = ? AND username = ?",
                (status_id, username),
            )
            return next((_status(r) for r in rows), None)

        return await self._db.read(read)

    def record(
        self,
        username: str,
        email_id: int,
        copies: Iterable[SentCopy],
        *,
        contacts: Mapping[str, Any] | None = None,
        queued_status: str | None = None,
        namespace: str = "",
        token: str = "",
    ) -> Awaitable[None]:
        """Spooled copies, counted as sent and logged as SENT events (of the SmtpToken
        ``token`` in ``namespace``), in one transaction; with ``contacts``
        (createContacts tokens) each recipient becomes or updates a contact with them; with
        ``queued_status`` that reservation is now PROCESSING (queued)."""
        sent = list(copies)

        def write(conn: sqlite3.Connection) -> None:  # on the connection's thread
            now = self._clock()
            conn.executemany(
                "INSERT OR IGNORE INTO messages (spool_id, recipient, username, email_id,"
                " message_id, event_id, status_id, sent_at, namespace, token)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.spool_id,
                        c.recipient,
                        username,
                        email_id,
                        c.message_id,
                        c.event_id,
                        c.status_id,
                        now,
                        namespace,
                        token,
                    )
                    for c in sent
                ],
            )
            for c in sent:
                copy = Recipient(
                    c.spool_id,
                    c.recipient,
                    username,
                    email_id,
                    namespace,
                    token,
                    c.status_id,
                    c.message_id,
                )
                append_sync(conn, EventType.SENT, copy, now)
            if contacts is not None and sent:
                upsert_contacts(conn, username, (c.recipient for c in sent), contacts, now)
            if sent:
                counters.bump_sync(conn, username, email_id, Kind.SENT, len(sent))
                counters.sent_now_sync(conn, username, now)
            if queued_status is not None:
                conn.execute(
                    "UPDATE statuses SET status = ?, send_result = 'QUEUED', started_at = ?"
                    " WHERE status_id = ? AND status = ?",
                    (SendState.PROCESSING.value, now, queued_status, SendState.PENDING.value),
                )

        return self._db.write_sync(write)

    def dropped(
        self,
        username: str,
        email_id: int,
        recipients: Iterable[str],
        reason: str,
        message: str,
        *,
        namespace: str,
        token: str,
    ) -> Awaitable[None]:
        """A send refused before spooling (``reason``: its sendResult, such as
        ``PREVIOUSLY_BOUNCED``): counted as dropped and a DROPPED event per recipient."""
        refused = list(recipients)

        async def write(db: aiosqlite.Connection) -> None:
            now = self._clock()
            detail = {"dropReason": reason, "dropMessage": message}
            for rcpt in refused:
                who = Recipient("", rcpt, username, email_id, namespace, token)
                await append_event(db, EventType.DROPPED, who, now, detail=detail)
            if refused:
                await counters.bump(db, username, email_id, Kind.DROPPED, len(refused))

        return self._db.write(write)
