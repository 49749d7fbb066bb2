"""Warm-up counts: recipients handed to delivery per day of the warm-up schedule.

One row per (start, day): ``start`` is the schedule's ``startedAt`` (ISO 8601) or ``""``
while the operator has not recorded it (counted as day 1), so a schedule started again
(warm-up turned off and on) counts from zero. The relay reads today's count when it starts,
so a restart keeps what the day already used; it adds to it as it admits mail.

Per spooled message still in the queue (``warmup_messages``): the recipients already counted
(a restart does not count them again), whether it was ever held, and when it was last let out
after being held (its queue lifetime starts then). The row goes when the message is finished.
``warmup_clock`` keeps the relay's own start of day 1 while the operator has not recorded
``startedAt``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection
from dataclasses import dataclass, field

import aiosqlite

from txmail_relay.records.database import Database


@dataclass
class AdmittedMessage:
    """What the gate knows of one spooled message (kept while it is queued)."""

    admitted: set[int] = field(default_factory=set)
    held: bool = False
    released_at: float | None = None

    def row(self, spool_id: str) -> tuple[str, str, int, float | None]:
        indices = ",".join(str(i) for i in sorted(self.admitted))
        return (spool_id, indices, int(self.held), self.released_at)


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
            await _add(db, start, day, n)

        return self._db.write(write)

    def note(
        self, key: tuple[str, int] | None, n: int, spool_id: str, state: AdmittedMessage
    ) -> Awaitable[None]:
        """Count ``n`` more recipients on ``key`` (None: no count) and write what is known of
        ``spool_id``, in one transaction."""
        row = state.row(spool_id)

        async def write(db: aiosqlite.Connection) -> None:
            if key is not None and n:
                await _add(db, key[0], key[1], n)
            await db.execute("INSERT OR REPLACE INTO warmup_messages VALUES (?, ?, ?, ?)", row)

        return self._db.write(write)

    async def messages(self) -> dict[str, AdmittedMessage]:
        async def read(db: aiosqlite.Connection) -> dict[str, AdmittedMessage]:
            found = {}
            for spool_id, admitted, held, released_at in await db.execute_fetchall(
                "SELECT spool_id, admitted, held, released_at FROM warmup_messages"
            ):
                found[str(spool_id)] = AdmittedMessage(
                    {int(i) for i in str(admitted).split(",") if i},
                    bool(held),
                    None if released_at is None else float(released_at),
                )
            return found

        return await self._db.read(read)

    def forget(self, spool_ids: Collection[str]) -> Awaitable[None]:
        """Drop what is kept of finished messages."""
        ids = [(i,) for i in spool_ids]

        async def write(db: aiosqlite.Connection) -> None:
            await db.executemany("DELETE FROM warmup_messages WHERE spool_id = ?", ids)

        return self._db.write(write)

    async def clock(self) -> float | None:
        """The relay's own start of day 1 (None: not started, or the operator's is known)."""

        async def read(db: aiosqlite.Connection) -> float | None:
            rows = list(await db.execute_fetchall("SELECT started_at FROM warmup_clock"))
            return float(rows[0][0]) if rows else None

        return await self._db.read(read)

    def set_clock(self, started_at: float | None) -> Awaitable[None]:
        async def write(db: aiosqlite.Connection) -> None:
            if started_at is None:
                await db.execute("DELETE FROM warmup_clock")
            else:
                await db.execute("INSERT OR REPLACE INTO warmup_clock VALUES (1, ?)", (started_at,))

        return self._db.write(write)


async def _add(db: aiosqlite.Connection, start: str, day: int, n: int) -> None:
    await db.execute(
        "INSERT INTO warmup VALUES (?, ?, ?) ON CONFLICT (start, day)"
        " DO UPDATE SET sent = sent + excluded.sent",
        (start, day, n),
    )
    await db.execute(
        "DELETE FROM warmup WHERE NOT (start = ? AND day = ?) AND NOT (start = '' AND ? = 1)",
        (start, day, day),
    )
