"""Suppressions: (address, reason) for every recipient that complained or hard-bounced (a 5xx
outcome), across tokens; consulted only when the DedicatedIP opts into suppression."""

from __future__ import annotations

from collections.abc import Iterable

import aiosqlite

from txmail_relay.records.database import Database
from txmail_relay.records.model import Suppression


async def add(db: aiosqlite.Connection, address: str, reason: Suppression, at: float) -> None:
    """Inside a write."""
    await db.execute(
        "INSERT OR IGNORE INTO suppressions VALUES ('', ?, ?, ?)",
        (address.lower(), reason.value, at),
    )


class Suppressions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def find(
        self, addresses: Iterable[str], reasons: Iterable[Suppression]
    ) -> dict[str, Suppression]:
        """The addresses (as given) recorded for one of ``reasons``, each with its reason.

        Case-insensitive; a bounce is reported before a complaint.
        """
        wanted = sorted(set(reasons))  # "HARD_BOUNCE" < "MANUAL" < "SPAM_REPORT"
        given = {a.lower(): a for a in addresses}
        if not wanted or not given:
            return {}
        marks = ",".join("?" * len(wanted))

        async def read(db: aiosqlite.Connection) -> dict[str, Suppression]:
            result: dict[str, Suppression] = {}
            for lowered, original in given.items():
                rows = await db.execute_fetchall(
                    f"SELECT reason FROM suppressions WHERE address = ? AND reason IN ({marks})"  # noqa: S608 - only placeholders
                    " ORDER BY reason LIMIT 1",
                    (lowered, *(r.value for r in wanted)),
                )
                for row in rows:
                    result[original] = Suppression(row[0])
            return result

        return await self._db.read(read)
