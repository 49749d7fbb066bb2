"""Contacts: per (token, address) for tokens with ``createContacts``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

import aiosqlite

from txmail_relay.records.database import Database
from txmail_relay.records.model import Contact

_CHUNK = 500  # addresses per IN (...) query, well under SQLite's limit on parameters


def upsert_sync(
    conn: sqlite3.Connection,
    username: str,
    addresses: Iterable[str],
    properties: Mapping[str, Any],
    now: float,
) -> None:
    """Each address becomes a contact, or is updated: ``properties`` merged over the known
    ones, last sent now; inside a write."""
    wanted = sorted({a.lower() for a in addresses})
    if not properties:  # nothing to merge (plain SMTP mail): no need to read them first
        conn.executemany(
            "INSERT INTO contacts VALUES (?, ?, ?, ?, '{}', 0) ON CONFLICT (username, address)"
            " DO UPDATE SET last_sent = excluded.last_sent",
            [(username, a, now, now) for a in wanted],
        )
        return
    known: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT address, properties FROM contacts WHERE username = ? AND address IN ({marks})",  # noqa: S608 - only placeholders
            (username, *chunk),
        ):
            known[row["address"]] = json.loads(row["properties"])
    conn.executemany(
        "INSERT INTO contacts VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (username, address)"
        " DO UPDATE SET last_sent = excluded.last_sent, properties = excluded.properties",
        [
            (username, a, now, now, json.dumps({**known.get(a, {}), **properties}, sort_keys=True))
            for a in wanted
        ],
    )


async def unsubscribe(db: aiosqlite.Connection, username: str, address: str) -> None:
    await db.execute(
        "UPDATE contacts SET unsubscribed = 1 WHERE username = ? AND address = ?",
        (username, address.lower()),
    )


class Contacts:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def page(self, username: str, *, after: str = "", limit: int = 100) -> list[Contact]:
        """A token's contacts by address, the first ``limit`` after ``after``."""

        async def read(db: aiosqlite.Connection) -> list[Contact]:
            return [
                Contact(
                    address=r["address"],
                    first_seen=r["first_seen"],
                    last_sent=r["last_sent"],
                    properties=json.loads(r["properties"]),
                    unsubscribed=bool(r["unsubscribed"]),
                )
                for r in await db.execute_fetchall(
                    "SELECT * FROM contacts WHERE username = ? AND address > ?"
                    " ORDER BY address LIMIT ?",
                    (username, after, limit),
                )
            ]

        return await self._db.read(read)
