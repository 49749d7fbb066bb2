"""Warm-up counts: recipients handed to delivery per day of the warm-up schedule.

One row per (start, day): ``start`` is the schedule's ``startedAt`` (ISO 8601) or ``""``
while the operator has not recorded it (counted as day 1), so a schedule started again
(warm-up turned off and on) counts from zero. The relay reads today's count when it starts,
so a restart keeps what the day already used; it adds to it as it admits mail.
"""

from __future__ import annotations

from collections.abc import Awaitable

import aiosqlite

from txmail_relay.records.database import Database


class WarmupCounts:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def sent(self, start: str, day: int) -> int:
        """What ``day`` of the schedule started at ``start`` used (day 1 includes the
        recipients counted before the start was known)."""

        async def read(db: aiosqlite.Connection) -> int:
            keys = [(start, day), ("", 1)] if day == 1 and start else [(start, day)]
            total = 0
            for key in keys:
                for row in await db.execute_fetchall(
                    "SELECT sent FROM warmup WHERE start = ? AND day = ?", key
                ):
                    total += int(row[0])
            return total

        return await self._db.read(read)

    def add(self, start: str, day: int, n: int) -> Awaitable[None]:
        """Count ``n`` more recipients on ``day``; older days are dropped (only today's
        count is ever read)."""

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO warmup VALUES (?, ?, ?) ON CONFLICT (start, day)"
                " DO UPDATE SET sent = sent + excluded.sent",
                (start, day, n),
            )
            await db.execute(
                "DELETE FROM warmup WHERE NOT (start = ? AND day = ?)"
                " AND NOT (start = '' AND ? = 1)",
                (start, day, day),
            )

        return self._db.write(write)
