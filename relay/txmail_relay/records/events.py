"""Events: delivery outcomes, opens and clicks, complaints, tied to a spooled recipient.

``uniques`` holds (spool id, recipient, kind) for unique opens and clicks and for complaints.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import aiosqlite

from txmail_relay.contract import SendState
from txmail_relay.outcomes import Outcome
from txmail_relay.records import suppressions
from txmail_relay.records.contacts import unsubscribe
from txmail_relay.records.counters import bump
from txmail_relay.records.database import Database
from txmail_relay.records.model import Kind, Recipient, Suppression

_OUTCOME_KIND = {
    Outcome.DELIVERED: Kind.DELIVERED,
    Outcome.DEFERRED: Kind.DEFERRED,
    Outcome.BOUNCED: Kind.BOUNCED,
    Outcome.EXPIRED: Kind.EXPIRED,
}
_UNIQUE = {Kind.OPENED: Kind.UNIQUE_OPENED, Kind.CLICKED: Kind.UNIQUE_CLICKED}
_RECIPIENT = "SELECT spool_id, recipient, username, email_id FROM messages"


async def _first_time(db: aiosqlite.Connection, found: Recipient, kind: Kind) -> bool:
    cursor = await db.execute(
        "INSERT OR IGNORE INTO uniques VALUES (?, ?, ?)",
        (found.spool_id, found.recipient, kind.value),
    )
    return bool(cursor.rowcount)


class Events:
    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def outcome(
        self, spool_id: str, username: str, recipient: str, outcome: Outcome, at: float
    ) -> Awaitable[None]:
        """Counted; a bounce suppresses the recipient; a final outcome completes the send's
        status (if the recipient has one)."""

        async def write(db: aiosqlite.Connection) -> None:
            rows = await db.execute_fetchall(
                "SELECT email_id, status_id FROM messages WHERE spool_id = ? AND recipient = ?",
                (spool_id, recipient),
            )
            row = next(iter(rows), None)
            email_id = row["email_id"] if row else 0
            await bump(db, username, email_id, _OUTCOME_KIND[outcome])
            if outcome is Outcome.BOUNCED:
                await suppressions.add(db, recipient, Suppression.HARD_BOUNCE, at)
            if row is None or row["status_id"] is None or not outcome.final:
                return
            result = "SENT" if outcome is Outcome.DELIVERED else "UNDELIVERABLE"
            await db.execute(
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

        return self._db.write(write)

    def engagement(self, event_id: bytes, kind: Kind) -> Awaitable[Recipient | None]:
        """An open or a click (``kind``) of a tracked recipient; returns it, or None if
        unknown."""
        unique = _UNIQUE[kind]

        async def write(db: aiosqlite.Connection) -> Recipient | None:
            rows = await db.execute_fetchall(f"{_RECIPIENT} WHERE event_id = ?", (event_id,))
            found = next((Recipient(*r) for r in rows), None)
            if found is None:
                return None
            await bump(db, found.username, found.email_id, kind)
            if await _first_time(db, found, kind):
                await bump(db, found.username, found.email_id, unique)
            return found

        return self._db.write(write)

    async def find_message(self, message_id: str, recipients: Iterable[str]) -> Recipient | None:
        """The recipient a Message-ID was sent to (preferring one of ``recipients``)."""
        wanted = {r.lower() for r in recipients}

        async def read(db: aiosqlite.Connection) -> Recipient | None:
            rows = [
                Recipient(*r)
                for r in await db.execute_fetchall(
                    f"{_RECIPIENT} WHERE message_id = ? ORDER BY rowid", (message_id,)
                )
            ]
            for row in rows:
                if row.recipient.lower() in wanted:
                    return row
            return rows[0] if len(rows) == 1 else None

        return await self._db.read(read)

    def complaint(self, found: Recipient) -> Awaitable[bool]:
        """A complaint and an unsubscribe, once per (message, recipient); True the first time."""

        async def write(db: aiosqlite.Connection) -> bool:
            if not await _first_time(db, found, Kind.COMPLAINED):
                return False
            await bump(db, found.username, found.email_id, Kind.COMPLAINED)
            await bump(db, found.username, found.email_id, Kind.UNSUBSCRIBED)
            await suppressions.add(db, found.recipient, Suppression.SPAM_REPORT, self._clock())
            await unsubscribe(db, found.username, found.recipient)
            return True

        return self._db.write(write)
