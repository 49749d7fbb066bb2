"""The relay's records: sends, events, contacts, suppressions and counters, in SQLite.

One file (``txmail.db``) in the spool directory, so it survives restarts with the spool; one
repository per concern over one connection (:mod:`txmail_relay.records.database` says in
which order work runs and what is durable together). Writes start when they are asked for:
await them, or hand them to :func:`~txmail_relay.records.database.background`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from txmail_relay.records.contacts import Contacts
from txmail_relay.records.counters import Counters
from txmail_relay.records.database import Database, RecordsFullError
from txmail_relay.records.engagement import EngagementRecords
from txmail_relay.records.events import Events, Owner
from txmail_relay.records.sends import Sends, drop_unspooled
from txmail_relay.records.suppressions import Suppressions
from txmail_relay.records.warmup import WarmupCounts
from txmail_relay.records.webhooks import Webhooks

DB_NAME = "txmail.db"


class Records:
    """``open()`` before use, ``close()`` at the end (it waits for the writes asked for)."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        owner: Owner | None = None,
    ) -> None:
        self._db = Database(directory / DB_NAME)
        self.sends = Sends(self._db, clock)
        # ``owner``: a username's (namespace, token) in the live configuration, for mail
        # whose messages row does not say (records/events.py Events.owned).
        self.events = Events(self._db, clock, owner)
        self.engagement = EngagementRecords(self._db, self.events)  # opens and clicks, batched
        self.contacts = Contacts(self._db)
        self.suppressions = Suppressions(self._db)
        self.counters = Counters(self._db)
        self.warmup = WarmupCounts(self._db)
        self.webhooks = Webhooks(self._db, clock)

    @property
    def path(self) -> Path:
        return self._db.path

    def has_room(self) -> bool:
        """Whether the records' queue takes more without waiting (records/database.py)."""
        return self._db.has_room()

    async def room(self) -> None:
        """Wait until the records' queue has room."""
        await self._db.room()

    def observe_commits(self, observer: Callable[[int], None]) -> None:
        """``observer`` gets the number of writes of each records transaction (one fsync)."""
        self._db.on_commit = observer

    def headroom(self) -> int:
        """Bytes the records may still add on the spool volume (the spool counts them)."""
        return self._db.headroom()

    async def open(self) -> None:
        """Connect, migrate the schema, and drop the reservations that never reached the
        spool (their clients got no answer and may retry)."""
        await self._db.open()
        try:
            await self._db.write(drop_unspooled)
        except RecordsFullError:
            if not await asyncio.to_thread(self._db.release_room):
                raise
            await self._db.write(drop_unspooled)

    async def close(self) -> None:
        await self._db.close()
