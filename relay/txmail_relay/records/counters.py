"""Counters: per (token, emailId, kind) counts, the last send per token; the stats' source."""

from __future__ import annotations

import sqlite3

import aiosqlite

from txmail_relay.records.database import Database, run_sync
from txmail_relay.records.model import Kind, Totals


def bump_sync(
    conn: sqlite3.Connection, username: str, email_id: int, kind: Kind, n: int = 1
) -> None:
    """Count ``n`` events of ``kind`` (emailId 0 = plain SMTP mail); inside a write."""
    conn.execute(
        "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (username, email_id, kind)"
        " DO UPDATE SET n = n + excluded.n",
        (username, email_id, kind.value, n),
    )


async def bump(
    db: aiosqlite.Connection, username: str, email_id: int, kind: Kind, n: int = 1
) -> None:
    """:func:`bump_sync` inside an async write."""
    await run_sync(db, lambda c: bump_sync(c, username, email_id, kind, n))


def sent_now_sync(conn: sqlite3.Connection, username: str, now: float) -> None:
    conn.execute(
        "INSERT INTO tokens VALUES (?, ?) ON CONFLICT (username)"
        " DO UPDATE SET last_sent_at = excluded.last_sent_at",
        (username, now),
    )


class Counters:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def totals(self) -> Totals:
        """Per token: totals of every kind over all emails, the last send, the contacts."""
        return await self._db.read(_totals)


async def _totals(db: aiosqlite.Connection) -> Totals:
    counts: dict[str, dict[Kind, int]] = {}
    for row in await db.execute_fetchall(
        "SELECT username, kind, SUM(n) FROM counters GROUP BY username, kind"
    ):
        counts.setdefault(row[0], {})[Kind(row[1])] = int(row[2])
    last_sent = {
        r[0]: r[1] for r in await db.execute_fetchall("SELECT username, last_sent_at FROM tokens")
    }
    contacts = {
        r[0]: r[1]
        for r in await db.execute_fetchall(
            "SELECT username, COUNT(*) FROM contacts GROUP BY username"
        )
    }
    return Totals(counts=counts, last_sent=last_sent, contacts=contacts)
