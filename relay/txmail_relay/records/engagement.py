"""Opens and clicks, recorded in batches, and the read the tracking endpoints need to tell a
machine's click from a person's (:mod:`txmail_relay.tracking.machine`): when the message
reached its recipient.

:meth:`EngagementRecords.record` writes a whole batch of hits in one transaction with a
handful of statements (one lookup of the batch's messages, one insert of its events, one of
its uniques, one upsert of its counters), whatever the batch's size: the tracking endpoints
collect hits for a few tens of milliseconds and hand them over together (tracking/
endpoints.py), instead of one synced transaction of five statements per hit. What is written
per hit is what :meth:`Events.engagement <txmail_relay.records.events.Events.engagement>`
writes for one: an OPEN or CLICK event (``filteredEvent`` for a machine's), its counter, and
for a person's the unique open or click the first time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosqlite

from txmail_relay.records.database import Database
from txmail_relay.records.events import Events, event_row
from txmail_relay.records.model import EventType, Kind, Recipient

# The later of spooling (messages.sent_at) and the last DELIVERED event of that message and
# recipient; the events lookup goes through the events_recipient index (namespace,
# recipient NOCASE).
_DELIVERED = """max(m.sent_at, coalesce((
    SELECT max(e.created) FROM events e
    WHERE e.namespace = m.namespace AND e.recipient = m.recipient COLLATE NOCASE
        AND e.spool_id = m.spool_id AND e.type = ?
), m.sent_at))"""
_DELIVERED_AT = f"SELECT {_DELIVERED} FROM messages m WHERE m.event_id = ?"  # noqa: S608 - constant
# Recipient's fields (records/events.py _RECIPIENT), the event id, and when it was delivered.
_BATCH = (
    "SELECT m.spool_id, m.recipient, m.username, m.email_id, m.namespace, m.token,"  # noqa: S608 - constant
    f" m.status_id, m.message_id, m.event_id, {_DELIVERED} FROM messages m"
    " WHERE m.event_id IN ({})"
)
# The batch's event ids are padded with NULLs (which match nothing) to a power of two, so
# few statement texts are ever prepared (see _INSERT_EVENTS).

# The batch's writes are one statement each, whatever the batch's size, and each statement's
# text is the same for every batch: its rows go in as one JSON array parameter, read by
# json_each(). Not executemany(): it steps once per row, and each step gives the GIL up and
# waits to get it back from the busy event loop (a 1,000-row executemany took up to a second
# under wrk). Not a VALUES list per batch: sqlite3 keeps the last 128 statements prepared,
# and one per batch size held ~100 MB of them.
_INSERT_EVENTS = (
    "INSERT INTO events (id, type, created, namespace, token, username, email_id, status_id,"
    " spool_id, recipient, message_id, reply, detail)"
    " SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,"
    " value->>7, value->>8, value->>9, value->>10, value->>11, value->>12 FROM json_each(?)"
)
_INSERT_UNIQUES = (
    "INSERT OR IGNORE INTO uniques SELECT value->>0, value->>1, value->>2 FROM json_each(?)"
    " RETURNING spool_id, recipient, kind"  # the rows inserted: the first times
)
_BUMP = (
    "INSERT INTO counters SELECT value->>0, value->>1, value->>2, value->>3"
    " FROM json_each(?) WHERE true"  # (WHERE: an upsert's SELECT needs one to parse)
    " ON CONFLICT (username, email_id, kind) DO UPDATE SET n = n + excluded.n"
)
_UNIQUE = {Kind.OPENED: Kind.UNIQUE_OPENED, Kind.CLICKED: Kind.UNIQUE_CLICKED}
_MACHINE = {Kind.OPENED: Kind.MACHINE_OPENED, Kind.CLICKED: Kind.MACHINE_CLICKED}
# Hits judged and made into rows between two turns of the event loop (~10 us each): a
# 1,000-hit batch in one go held the loop, and the redirects waiting on it, ~10-20 ms.
YIELD_EVERY = 200
EVENT_ID_BYTES = 16  # records/events.py new_event_id(): token_urlsafe(16)
_TYPE = {Kind.OPENED: EventType.OPEN, Kind.CLICKED: EventType.CLICK}
# One encoder (json.dumps with arguments makes a new one per call: most of its cost).
_JSON = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(slots=True)  # not frozen: a frozen init costs 7 us a hit, on the request path
class Hit:
    """One open or click (``kind``) of a tracked recipient, at ``at`` (the relay's clock)."""

    event_id: bytes
    kind: Kind  # OPENED or CLICKED
    at: float
    url: str | None = None
    user_agent: str | None = None


H = TypeVar("H", bound=Hit)


class EngagementRecords:
    def __init__(self, db: Database, events: Events) -> None:
        self._db = db
        self._events = events

    async def delivered_at(self, event_id: bytes) -> float | None:
        """The later of when the tracked message was spooled for its recipient and when it
        was delivered (seconds since the epoch), or None if the event id is unknown."""

        async def read(db: aiosqlite.Connection) -> float | None:
            rows = list(
                await db.execute_fetchall(_DELIVERED_AT, (EventType.DELIVERED.value, event_id))
            )
            return float(rows[0][0]) if rows and rows[0][0] is not None else None

        return await self._db.read(read)

    def record(self, hits: Sequence[H], judge: Callable[[H, float | None], bool]) -> Awaitable[int]:
        """Record ``hits`` in one transaction; returns how many were of a known recipient
        (a hit of an unknown event id writes nothing). ``judge(hit, delivered_at)`` says
        whether a hit of a known recipient is a machine's, given when its message was
        delivered (None: not known); it is called inside the transaction, in hit order."""
        events = self._events

        async def write(db: aiosqlite.Connection) -> int:
            ids: list[bytes | None] = list(dict.fromkeys(h.event_id for h in hits))
            ids += [None] * ((1 << (len(ids) - 1).bit_length()) - len(ids))
            rows = await db.execute_fetchall(
                _BATCH.format(", ".join("?" * len(ids))), (EventType.DELIVERED.value, *ids)
            )
            known: dict[bytes, tuple[Recipient, float | None]] = {
                bytes(r[8]): (Recipient(*r[:8]), None if r[9] is None else float(r[9]))
                for r in rows
            }
            inserts: list[tuple[Any, ...]] = []
            counts: Counter[tuple[str, int, Kind]] = Counter()
            people: dict[tuple[str, str, Kind], Recipient] = {}
            recorded = 0
            ids_left = _event_ids(len(hits))
            for i, hit in enumerate(hits, 1):
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the loop answer requests meanwhile
                entry = known.get(hit.event_id)
                if entry is None:
                    continue
                recorded += 1
                found, delivered = entry
                machine = judge(hit, delivered)
                owned = events.owned(found) or found
                detail: dict[str, Any] = {"filteredEvent": machine}
                if hit.url is not None:
                    detail["url"] = hit.url
                if hit.user_agent is not None:
                    detail["userAgent"] = hit.user_agent
                if owned.namespace:  # an event belongs to a namespace (records/events.py)
                    event = next(ids_left)
                    row = event_row(event, _TYPE[hit.kind], owned, hit.at, None, _JSON(detail))
                    inserts.append(row)
                key = (owned.username, owned.email_id)
                if machine:
                    counts[(*key, _MACHINE[hit.kind])] += 1
                    continue
                counts[(*key, hit.kind)] += 1
                people.setdefault((owned.spool_id, owned.recipient, _UNIQUE[hit.kind]), owned)
            if inserts:
                await db.execute(_INSERT_EVENTS, (_JSON(inserts),))
            if people:
                uniques = [(s, r, k.value) for s, r, k in people]
                for s, r, k in await db.execute_fetchall(_INSERT_UNIQUES, (_JSON(uniques),)):
                    first = people[(s, r, Kind(k))]
                    counts[(first.username, first.email_id, Kind(k))] += 1
            if counts:
                bumps = [(u, e, kind.value, n) for (u, e, kind), n in counts.items()]
                await db.execute(_BUMP, (_JSON(bumps),))
            return recorded

        return self._db.write(write)


def _event_ids(n: int) -> Iterator[str]:
    """``n`` ids as records/events.py new_event_id() makes them, from one draw of random
    bytes: os.urandom gives the GIL up, and getting it back from the records' thread cost
    more than the rest of a hit."""
    drawn = secrets.token_bytes(EVENT_ID_BYTES * n)
    for i in range(0, len(drawn), EVENT_ID_BYTES):
        chunk = drawn[i : i + EVENT_ID_BYTES]
        yield "evt_" + base64.urlsafe_b64encode(chunk).rstrip(b"=").decode("ascii")
