"""Suppressions: (namespace, address, reason, time), per namespace on this relay (one relay per
DedicatedIP, so per DedicatedIP and namespace).

Reasons (:class:`~txmail_relay.records.model.Suppression`): ``HARD_BOUNCE`` and
``SPAM_REPORT`` are recorded automatically for every hard bounce of a bad address
(:func:`~txmail_relay.records.events.suppresses`) and every complaint, and enforced
only when the DedicatedIP opts in (``spec.suppression``); ``MANUAL`` entries (the API) are
always enforced. Entries recorded before suppression was per namespace carry namespace ``""``:
relay-wide, they apply to every namespace, and no namespace can remove them (nor any other
namespace's entry). Addresses are kept lowercased.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Collection, Iterable
from dataclasses import dataclass

import aiosqlite

from txmail_relay.records.database import Database, run_sync
from txmail_relay.records.model import Suppression

RELAY_WIDE = ""  # the namespace of entries recorded before issue 12


@dataclass(frozen=True)
class SuppressionEntry:
    address: str  # lowercased
    reason: Suppression
    at: float
    relay_wide: bool  # recorded before entries were per namespace (namespace "")


def add_sync(
    conn: sqlite3.Connection, namespace: str, address: str, reason: Suppression, at: float
) -> bool:
    """Inside a write; True if the entry is new (an existing one keeps its first time)."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?, ?)",
        (namespace, address.lower(), reason.value, at),
    )
    return bool(cursor.rowcount)


async def add(
    db: aiosqlite.Connection, namespace: str, address: str, reason: Suppression, at: float
) -> bool:
    """:func:`add_sync` inside an async write."""
    return await run_sync(db, lambda c: add_sync(c, namespace, address, reason, at))


def _entry(row: sqlite3.Row) -> SuppressionEntry:
    return SuppressionEntry(
        address=row[1],
        reason=Suppression(row[2]),
        at=row[3],
        relay_wide=row[0] == RELAY_WIDE,
    )


_ORDER = " ORDER BY address, reason, namespace DESC"  # a namespace's own entry first


def page_sql(reasons: int) -> tuple[str, str]:
    """The two SELECTs of :meth:`Suppressions.page` (``reasons``: how many reasons it filters
    by): a page's addresses, then their entries. Each namespace (the token's and "") is read
    on its own through the primary key (namespace, address, reason), so a small namespace
    never walks a big neighbour's rows (``namespace IN (?, '')`` walks every address by the
    address index and filters the namespace row by row)."""
    by_reason = f" AND reason IN ({','.join('?' * reasons)})" if reasons else ""
    own = (
        "SELECT DISTINCT address FROM suppressions WHERE namespace = ?"  # noqa: S608 - only placeholders
        f" AND address > ?{by_reason} ORDER BY address LIMIT ?"
    )
    addresses = (
        f"SELECT address FROM ({own}) UNION SELECT address FROM ({own})"  # noqa: S608 - only placeholders
        " ORDER BY address LIMIT ?"
    )
    ranged = (
        "SELECT namespace, address, reason, at FROM suppressions"  # noqa: S608 - only placeholders
        f" WHERE namespace = ? AND address >= ? AND address <= ?{by_reason}"
    )
    rows = f"SELECT * FROM ({ranged}) UNION ALL SELECT * FROM ({ranged}){_ORDER}"  # noqa: S608 - only placeholders
    return addresses, rows


class Suppressions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def find(
        self, namespace: str, addresses: Iterable[str], reasons: Iterable[Suppression]
    ) -> dict[str, Suppression]:
        """The addresses (as given) suppressed in ``namespace`` (or relay-wide) for one of
        ``reasons``, each with its reason.

        Case-insensitive; a bounce is reported before a manual entry, that before a complaint.
        """
        wanted = sorted(set(reasons))  # "HARD_BOUNCE" < "MANUAL" < "SPAM_REPORT"
        given = {a.lower(): a for a in addresses}
        if not wanted or not given:
            return {}
        marks = ",".join("?" * len(wanted))

        def read(conn: sqlite3.Connection) -> dict[str, Suppression]:  # per message: one hop
            result: dict[str, Suppression] = {}
            for lowered, original in given.items():
                rows = conn.execute(
                    "SELECT reason FROM suppressions WHERE namespace IN (?, '') AND address = ?"  # noqa: S608 - only placeholders
                    f" AND reason IN ({marks}) ORDER BY reason LIMIT 1",
                    (namespace, lowered, *(r.value for r in wanted)),
                )
                for row in rows:
                    result[original] = Suppression(row[0])
            return result

        return await self._db.read_sync(read)

    async def get(self, namespace: str, address: str) -> list[SuppressionEntry]:
        """The entries of one address that apply in ``namespace`` (its own and relay-wide)."""

        async def read(db: aiosqlite.Connection) -> list[SuppressionEntry]:
            rows = await db.execute_fetchall(
                "SELECT namespace, address, reason, at FROM suppressions"  # noqa: S608 - constant
                " WHERE namespace IN (?, '') AND address = ?" + _ORDER,
                (namespace, address.lower()),
            )
            return [_entry(r) for r in rows]

        return await self._db.read(read)

    async def page(
        self,
        namespace: str,
        *,
        reasons: Collection[Suppression] = (),
        after: str = "",
        limit: int,
    ) -> list[tuple[str, list[SuppressionEntry]]]:
        """Up to ``limit`` addresses after ``after`` (ascending), each with its entries that
        apply in ``namespace`` (only those of ``reasons`` if given)."""
        wanted = sorted({Suppression(r).value for r in reasons})
        addresses_sql, rows_sql = page_sql(len(wanted))

        async def read(db: aiosqlite.Connection) -> list[tuple[str, list[SuppressionEntry]]]:
            addresses = [
                r[0]
                for r in await db.execute_fetchall(
                    addresses_sql,
                    (
                        *(namespace, after.lower(), *wanted, limit),
                        *(RELAY_WIDE, after.lower(), *wanted, limit),
                        limit,
                    ),
                )
            ]
            if not addresses:
                return []
            span = (addresses[0], addresses[-1], *wanted)
            rows = await db.execute_fetchall(rows_sql, (namespace, *span, RELAY_WIDE, *span))
            found: dict[str, list[SuppressionEntry]] = {a: [] for a in addresses}
            for row in rows:
                found[row[1]].append(_entry(row))
            return list(found.items())

        return await self._db.read(read)

    def put(self, namespace: str, address: str, reason: Suppression, at: float) -> Awaitable[bool]:
        """Add an entry to ``namespace``; True if it is new."""

        async def write(db: aiosqlite.Connection) -> bool:
            return await add(db, namespace, address, reason, at)

        return self._db.write(write)

    def remove(self, namespace: str, address: str) -> Awaitable[int]:
        """Remove ``namespace``'s own entries of ``address`` (never relay-wide ones, nor
        another namespace's); returns how many."""

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "DELETE FROM suppressions WHERE namespace = ? AND address = ?",
                (namespace, address.lower()),
            )
            return cursor.rowcount

        return self._db.write(write)
