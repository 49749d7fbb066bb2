"""Webhook subscriptions' delivery state: the outbox is the events log, this is its cursors.

One row per subscription (id ``<namespace>/<token>/<name>``): ``cursor`` is the seq of the
last event of the token given to the receiver (or given up on); the batch in flight is its
range of seqs, its ``webhook-id`` and the event types it was formed with, written BEFORE its
first attempt, so a retry and a restart send the same events with the same id. A 2xx moves the
cursor to the batch's end in the same transaction that clears the batch. Alongside: attempts of
the batch and the next one's time, failures in a row and since when, the last error and the
last success, and counts delivered and dropped.

A subscription that leaves the configuration keeps its row (marked ``removed``) so that one
that comes back soon (a Secret briefly missing, say) resumes where it was; a row removed for
longer than the retry period starts again from the newest event (:meth:`Webhooks.ensure`).
A new subscription starts at the newest event: it gets what happens from then on.

Scans are bounded: :meth:`Webhooks.scan` looks at most :data:`SCAN_WINDOW` seqs past the cursor
and says how far it looked (``upto``): a subscription filtered by event type whose events do
not match moves past them (the dispatcher keeps that horizon and writes it now and then with
:meth:`Webhooks.advance`) instead of reading them again at every wake-up. :meth:`backlog`
counts within :data:`BACKLOG_CAP` seqs past the cursor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import aiosqlite

from txmail_relay.records.database import Database
from txmail_relay.records.events import _EVENT_COLUMNS, _event
from txmail_relay.records.model import Event, EventType

# What stats count of a backlog at most: the events within this many seqs past the cursor
# (a count over a long backlog, or over a token's many events of other types, would read
# them all, on the connection every write waits for).
BACKLOG_CAP = 100_000
# What one scan for a new batch looks at, at most: this many seqs past the cursor.
SCAN_WINDOW = 10_000

_COLUMNS = (
    "id, username, name, cursor, batch_first, batch_last, batch_size, batch_id, batch_types,"
    " batch_formed, attempts, next_attempt, failures, failing_since, last_error, last_success,"
    " delivered, dropped, created, removed"
)


@dataclass(frozen=True)
class Batch:
    """The events ``first..last`` (seqs, inclusive; ``size`` of them matched) sent as one
    request with ``webhook-id`` ``id``; ``types`` is the filter it was formed with."""

    first: int
    last: int
    size: int
    id: str
    types: str
    formed: float  # its first attempt (the body's timestamp; the retry period runs from it)
    attempts: int  # failed attempts so far
    next_attempt: float


@dataclass(frozen=True)
class WebhookState:
    id: str
    username: str
    name: str
    cursor: int
    batch: Batch | None
    failures: int  # failed attempts in a row (across batches), 0 after a success
    failing_since: float | None  # the first failure of that run
    last_error: str | None
    last_success: float | None
    delivered: int
    dropped: int
    created: float
    removed: float | None


@dataclass(frozen=True)
class Scan:
    """What :meth:`Webhooks.scan` found: ``events`` (ascending seq) are every event of the
    filter in ``(after, upto]``; ``newest`` is the newest seq when it looked."""

    events: list[Event]
    upto: int
    newest: int


def _type_filter(types: Collection[EventType | str]) -> tuple[str, list[str]]:
    wanted = sorted({EventType(t).value for t in types})
    if not wanted:
        return "", []
    return f" AND type IN ({','.join('?' * len(wanted))})", wanted


def types_key(types: Collection[str]) -> str:
    """The stored form of an event-type filter ("" is every type)."""
    return ",".join(sorted(set(types)))


def _state(row: aiosqlite.Row) -> WebhookState:
    batch = None
    if row["batch_id"] is not None:
        batch = Batch(
            first=row["batch_first"],
            last=row["batch_last"],
            size=row["batch_size"],
            id=row["batch_id"],
            types=row["batch_types"],
            formed=row["batch_formed"],
            attempts=row["attempts"],
            next_attempt=row["next_attempt"],
        )
    return WebhookState(
        id=row["id"],
        username=row["username"],
        name=row["name"],
        cursor=row["cursor"],
        batch=batch,
        failures=row["failures"],
        failing_since=row["failing_since"],
        last_error=row["last_error"],
        last_success=row["last_success"],
        delivered=row["delivered"],
        dropped=row["dropped"],
        created=row["created"],
        removed=row["removed"],
    )


async def _get(db: aiosqlite.Connection, sub_id: str) -> WebhookState:
    rows = await db.execute_fetchall(
        f"SELECT {_COLUMNS} FROM webhooks WHERE id = ?",  # noqa: S608 - constant columns
        (sub_id,),
    )
    row = next(iter(rows), None)
    if row is None:
        raise KeyError(sub_id)
    return _state(row)


async def _newest(db: aiosqlite.Connection) -> int:
    rows = await db.execute_fetchall("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
    return next((int(r[0]) for r in rows), 0)


_CLEAR_BATCH = (
    "batch_first = NULL, batch_last = NULL, batch_size = NULL, batch_id = NULL,"
    " batch_types = NULL, batch_formed = NULL, attempts = 0, next_attempt = NULL"
)


class Webhooks:
    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def ensure(
        self, sub_id: str, username: str, name: str, *, resume_within: float
    ) -> Awaitable[WebhookState]:
        """The row of a configured subscription: created at the newest event if new (or
        removed more than ``resume_within`` seconds ago), otherwise marked present again."""
        now = self._clock()

        async def write(db: aiosqlite.Connection) -> WebhookState:
            rows = list(
                await db.execute_fetchall("SELECT removed FROM webhooks WHERE id = ?", (sub_id,))
            )
            if rows and rows[0]["removed"] is not None and rows[0]["removed"] < now - resume_within:
                await db.execute("DELETE FROM webhooks WHERE id = ?", (sub_id,))
                rows = []
            if not rows:
                await db.execute(
                    "INSERT INTO webhooks (id, username, name, cursor, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (sub_id, username, name, await _newest(db), now),
                )
            else:
                await db.execute(
                    "UPDATE webhooks SET removed = NULL, username = ? WHERE id = ?",
                    (username, sub_id),
                )
            return await _get(db, sub_id)

        return self._db.write(write)

    def remove(self, sub_id: str) -> Awaitable[None]:
        """The subscription left the configuration (its row stays, see the module doc)."""
        now = self._clock()

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE webhooks SET removed = ? WHERE id = ? AND removed IS NULL", (now, sub_id)
            )

        return self._db.write(write)

    def prune_removed(self, before: float) -> Awaitable[int]:
        """Forget subscriptions removed before ``before``; returns how many."""

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute("DELETE FROM webhooks WHERE removed < ?", (before,))
            return cursor.rowcount

        return self._db.write(write)

    async def get(self, sub_id: str) -> WebhookState:
        """The state of ``sub_id`` (KeyError if it has no row)."""

        async def read(db: aiosqlite.Connection) -> WebhookState:
            return await _get(db, sub_id)

        return await self._db.read(read)

    async def all(self) -> list[WebhookState]:
        """Every row, removed ones included."""

        async def read(db: aiosqlite.Connection) -> list[WebhookState]:
            return [
                _state(r)
                for r in await db.execute_fetchall(
                    f"SELECT {_COLUMNS} FROM webhooks ORDER BY id"  # noqa: S608 - constant
                )
            ]

        return await self._db.read(read)

    def start_batch(
        self,
        sub_id: str,
        *,
        first: int,
        last: int,
        size: int,
        batch_id: str,
        types: str,
        at: float,
    ) -> Awaitable[WebhookState]:
        """Persist a new batch (before its first attempt, which is due at ``at``)."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(
                "UPDATE webhooks SET batch_first = ?, batch_last = ?, batch_size = ?,"
                " batch_id = ?, batch_types = ?, batch_formed = ?, attempts = 0,"
                " next_attempt = ? WHERE id = ?",
                (first, last, size, batch_id, types, at, at, sub_id),
            )
            return await _get(db, sub_id)

        return self._db.write(write)

    def drop_batch(self, sub_id: str) -> Awaitable[WebhookState]:
        """Forget the batch without moving the cursor (its filter changed: formed again)."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(f"UPDATE webhooks SET {_CLEAR_BATCH} WHERE id = ?", (sub_id,))  # noqa: S608
            return await _get(db, sub_id)

        return self._db.write(write)

    def delivered_batch(self, sub_id: str, batch_id: str, at: float) -> Awaitable[WebhookState]:
        """The receiver took batch ``batch_id`` (a 2xx): the cursor moves past it."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(
                f"UPDATE webhooks SET cursor = max(cursor, batch_last),"  # noqa: S608
                f" delivered = delivered + batch_size, failures = 0, failing_since = NULL,"
                f" last_success = ?, {_CLEAR_BATCH} WHERE id = ? AND batch_id = ?",
                (at, sub_id, batch_id),
            )
            return await _get(db, sub_id)

        return self._db.write(write)

    def skip_batch(self, sub_id: str, batch_id: str) -> Awaitable[WebhookState]:
        """Nothing of batch ``batch_id`` is left to send (its events were pruned): the
        cursor moves past it, counted neither delivered nor dropped."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(
                f"UPDATE webhooks SET cursor = max(cursor, batch_last), {_CLEAR_BATCH}"  # noqa: S608
                " WHERE id = ? AND batch_id = ?",
                (sub_id, batch_id),
            )
            return await _get(db, sub_id)

        return self._db.write(write)

    def failed_attempt(
        self,
        sub_id: str,
        batch_id: str,
        *,
        error: str,
        at: float,
        next_attempt: float | None,
    ) -> Awaitable[WebhookState]:
        """An attempt of batch ``batch_id`` failed with ``error``: retried at
        ``next_attempt``, or, if None, given up on (the cursor moves past it, its events
        counted dropped)."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(
                "UPDATE webhooks SET failures = failures + 1,"
                " failing_since = coalesce(failing_since, ?), last_error = ?,"
                " attempts = attempts + 1, next_attempt = ? WHERE id = ? AND batch_id = ?",
                (at, error, next_attempt, sub_id, batch_id),
            )
            if next_attempt is None:
                await db.execute(
                    f"UPDATE webhooks SET cursor = max(cursor, batch_last),"  # noqa: S608
                    f" dropped = dropped + batch_size, {_CLEAR_BATCH}"
                    " WHERE id = ? AND batch_id = ?",
                    (sub_id, batch_id),
                )
            return await _get(db, sub_id)

        return self._db.write(write)

    async def backlog(self, username: str, cursor: int, types: Collection[str]) -> int:
        """Events of ``username`` after ``cursor`` of ``types`` (all if empty), counted among
        the :data:`BACKLOG_CAP` seqs after ``cursor`` (so at most that many rows are read)."""
        filtered, wanted = _type_filter(types)
        sql = (
            "SELECT count(*) FROM events WHERE username = ? AND seq > ? AND seq <= ?"  # noqa: S608
            + filtered
        )

        async def read(db: aiosqlite.Connection) -> int:
            rows = await db.execute_fetchall(sql, (username, cursor, cursor + BACKLOG_CAP, *wanted))
            return int(next(iter(rows))[0])

        return await self._db.read(read)

    async def scan(
        self,
        username: str,
        after: int,
        types: Collection[EventType],
        *,
        limit: int,
        window: int = SCAN_WINDOW,
    ) -> Scan:
        """Up to ``limit`` events of ``username`` (and ``types``, all if empty) after
        ``after``, looking at most ``window`` seqs ahead; ``upto`` is how far that covered:
        the last event's seq when ``limit`` were found, otherwise the end of what was looked
        at (the newest seq, or ``after + window``). Events are written on the connection this
        reads on, in seq order, so none can appear later at or below ``upto``."""
        filtered, wanted = _type_filter(types)
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608 - placeholders only
            f" WHERE username = ? AND seq > ? AND seq <= ?{filtered} ORDER BY seq LIMIT ?"
        )

        async def read(db: aiosqlite.Connection) -> Scan:
            newest = await _newest(db)
            end = max(after, min(newest, after + window))
            args: list[Any] = [username, after, end, *wanted, limit]
            events = [_event(r) for r in await db.execute_fetchall(sql, args)]
            upto = events[-1].seq if len(events) >= limit else end
            return Scan(events, upto, newest)

        return await self._db.read(read)

    async def batch_events(
        self, username: str, types: Collection[EventType], batch: Batch
    ) -> list[Event]:
        """The events of a persisted batch, for a retry: exactly its range (``first..last``)
        and at most its ``size``, whatever ``maxBatch`` is now (a smaller one must not send
        part of it and then move the cursor past the rest)."""
        filtered, wanted = _type_filter(types)
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608 - placeholders only
            f" WHERE username = ? AND seq BETWEEN ? AND ?{filtered} ORDER BY seq LIMIT ?"
        )

        async def read(db: aiosqlite.Connection) -> list[Event]:
            args: list[Any] = [username, batch.first, batch.last, *wanted, batch.size]
            return [_event(r) for r in await db.execute_fetchall(sql, args)]

        return await self._db.read(read)

    def advance(self, sub_id: str, upto: int) -> Awaitable[WebhookState]:
        """Move the cursor of ``sub_id`` to ``upto`` (a scan found nothing of its filter up
        to there) unless a batch is in flight (its success moves it)."""

        async def write(db: aiosqlite.Connection) -> WebhookState:
            await db.execute(
                "UPDATE webhooks SET cursor = max(cursor, ?) WHERE id = ? AND batch_id IS NULL",
                (upto, sub_id),
            )
            return await _get(db, sub_id)

        return self._db.write(write)

    async def new_events(self, after: int) -> tuple[int, set[str]]:
        """The newest seq after ``after`` and the usernames with events there (what the
        dispatchers' wake-ups are made from: one query for the whole relay)."""

        async def read(db: aiosqlite.Connection) -> tuple[int, set[str]]:
            rows = await db.execute_fetchall(
                "SELECT username, max(seq) FROM events WHERE seq > ? GROUP BY username",
                (after,),
            )
            newest = max((int(r[1]) for r in rows), default=after)
            return newest, {r[0] for r in rows}

        return await self._db.read(read)

    async def newest(self) -> int:
        """The newest event's seq (0 if none)."""
        return await self._db.read(_newest)
