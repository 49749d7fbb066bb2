"""Reads the tracking endpoints need to tell a machine's click from a person's
(:mod:`txmail_relay.tracking.machine`): when the message reached its recipient."""

from __future__ import annotations

import aiosqlite

from txmail_relay.records.database import Database
from txmail_relay.records.model import EventType

# The later of spooling (messages.sent_at) and the last DELIVERED event of that message and
# recipient; the events lookup goes through the events_recipient index (namespace,
# recipient NOCASE).
_DELIVERED_AT = """
SELECT max(m.sent_at, coalesce((
    SELECT max(e.created) FROM events e
    WHERE e.namespace = m.namespace AND e.recipient = m.recipient COLLATE NOCASE
        AND e.spool_id = m.spool_id AND e.type = ?
), m.sent_at))
FROM messages m WHERE m.event_id = ?
"""


class EngagementReads:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def delivered_at(self, event_id: bytes) -> float | None:
        """The later of when the tracked message was spooled for its recipient and when it
        was delivered (seconds since the epoch), or None if the event id is unknown."""

        async def read(db: aiosqlite.Connection) -> float | None:
            rows = list(
                await db.execute_fetchall(_DELIVERED_AT, (EventType.DELIVERED.value, event_id))
            )
            return float(rows[0][0]) if rows and rows[0][0] is not None else None

        return await self._db.read(read)
