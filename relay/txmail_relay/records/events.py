"""Events: delivery outcomes, bounces, opens and clicks, complaints, tied to a spooled recipient.

Every write here counts what happened (:mod:`~txmail_relay.records.counters`) and appends its
row to the events log (table ``events``, :class:`~txmail_relay.records.model.Event`) in the
same transaction, so the log (what the events API and the webhooks read) and the figures never
disagree. ``uniques`` holds (spool id, recipient, kind) for unique opens and clicks, for
complaints and for hard DSN bounces (each counted once per message and recipient), and the
attempt keys of delivery outcomes (:meth:`Events.outcome`: one write per recipient and attempt,
even when a crash makes the relay deliver it again), deleted once the message is finished
(:meth:`Events.forget_outcomes`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

import aiosqlite

from txmail_relay.contract import SendResult, SendState
from txmail_relay.outcomes import Outcome
from txmail_relay.records import suppressions
from txmail_relay.records.contacts import unsubscribe
from txmail_relay.records.counters import bump, bump_sync
from txmail_relay.records.database import Database, run_sync
from txmail_relay.records.model import Event, EventType, Kind, Recipient, Suppression

_OUTCOME_KIND = {
    Outcome.DELIVERED: Kind.DELIVERED,
    Outcome.DEFERRED: Kind.DEFERRED,
    Outcome.BOUNCED: Kind.BOUNCED,
    Outcome.EXPIRED: Kind.EXPIRED,
}
_UNIQUE = {Kind.OPENED: Kind.UNIQUE_OPENED, Kind.CLICKED: Kind.UNIQUE_CLICKED}
_MACHINE = {Kind.OPENED: Kind.MACHINE_OPENED, Kind.CLICKED: Kind.MACHINE_CLICKED}
_ENGAGEMENT = {Kind.OPENED: EventType.OPEN, Kind.CLICKED: EventType.CLICK}
#: The username of the DSNs the relay spools itself (delivery/dsn.py): their outcomes are the
#: relay's, no token's, so the records write nothing for them (no counter, no event, no
#: suppression entry).
RELAY_USERNAME = ""
#: Who sent a username's mail, from the live configuration's credential entry: (namespace,
#: SmtpToken name), or None if no token has that username now.
Owner = Callable[[str], tuple[str, str] | None]
_DSN_BOUNCED = "dsn_bounced"  # uniques kind: a hard DSN, counted once per message/recipient
# uniques kinds of Events.outcome's attempt keys: the recipient's final outcome (one ever), and
# a deferral per attempt number.
_FINAL_KEY = "outcome:final"
_OUTCOME_KEYS = "outcome:*"  # GLOB of both
_RECIPIENT = (
    "SELECT spool_id, recipient, username, email_id, namespace, token, status_id, message_id"
    " FROM messages"
)
_EVENT_COLUMNS = (
    "seq, id, type, created, namespace, token, username, email_id, status_id, spool_id,"
    " recipient, message_id, reply, detail"
)
# An RFC 3463 enhanced status code at the start of an SMTP reply's text ("550 5.1.1 ...").
_ENHANCED = re.compile(r"^(?:\d{3}[ -])?([245]\.\d{1,3}\.\d{1,3})\b")


def status_code(reply: str | None) -> str | None:
    """The enhanced status code ("5.1.1") an SMTP reply starts with, if any."""
    if not reply:
        return None
    found = _ENHANCED.match(reply.strip())
    return found.group(1) if found else None


def bounce_category(status: str | None, *, expired: bool = False) -> str:
    """HubSpot's bounce ``category`` from an RFC 3463 status code (its subject and detail)."""
    if expired:
        return "TIMEOUT"
    if not status:
        return "UNCATEGORIZED"
    _, subject, detail = [*status.split("."), "", ""][:3]
    if subject == "1":
        return "DNS_FAILURE" if detail == "2" else "UNKNOWN_USER"
    if subject == "2":
        return "MAILBOX_FULL" if detail == "2" else "MAILBOX_MISCONFIGURATION"
    if subject == "4":
        return (
            "TIMEOUT" if detail == "7" else "DNS_FAILURE" if detail == "4" else "TEMPORARY_PROBLEM"
        )
    if subject == "6":
        return "CONTENT"
    if subject == "7":
        return "SPAM" if detail == "1" else "POLICY"
    return "UNCATEGORIZED"


#: The RFC 3463 codes of a hard bounce that say the ADDRESS is bad, the only ones that add a
#: HARD_BOUNCE suppression entry: 5.1.1 bad mailbox, 5.1.2 bad destination system (no such
#: domain), 5.1.3 bad mailbox syntax, 5.1.6 mailbox moved, 5.1.10 null MX (RFC 7505), 5.2.1
#: mailbox disabled. Not the others: a blocklisted IP or a policy refusal (5.7.x), a message
#: too big (5.3.4, 5.2.3), its content (5.6.x), a routing or network failure (5.4.x): the
#: next message to that address may well arrive. A reply without a code is not suppressed.
ADDRESS_FAILURES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})


def suppresses(status: str | None) -> bool:
    """Whether a hard bounce with this status code suppresses its recipient."""
    return status in ADDRESS_FAILURES


def new_event_id() -> str:
    return "evt_" + secrets.token_urlsafe(16)


def append_sync(
    conn: sqlite3.Connection,
    kind: EventType,
    found: Recipient,
    at: float,
    *,
    reply: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One row of the events log for ``found``; inside a write. Nothing without a namespace:
    an event belongs to a token's namespace (the caller resolves it, :meth:`Events.owned`)."""
    if not found.namespace:
        return
    conn.execute(
        f"INSERT INTO events ({_EVENT_COLUMNS.removeprefix('seq, ')})"  # noqa: S608 - constant
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        event_row(
            new_event_id(),
            kind,
            found,
            at,
            reply,
            json.dumps(dict(detail or {}), separators=(",", ":")),
        ),
    )


def event_row(
    event_id: str, kind: EventType, found: Recipient, at: float, reply: str | None, detail: str
) -> tuple[Any, ...]:
    """The values of an events row for ``found``, in the order of ``_EVENT_COLUMNS`` after
    ``seq``; ``detail`` is already JSON. Also the rows of records/engagement.py's batches."""
    return (
        event_id,
        kind.value,
        at,
        found.namespace,
        found.token,
        found.username,
        found.email_id,
        found.status_id,
        found.spool_id or None,
        found.recipient,
        found.message_id,
        reply,
        detail,
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["seq"],
        id=row["id"],
        type=EventType(row["type"]),
        created=row["created"],
        namespace=row["namespace"],
        token=row["token"],
        username=row["username"],
        email_id=row["email_id"],
        status_id=row["status_id"],
        spool_id=row["spool_id"],
        recipient=row["recipient"],
        message_id=row["message_id"],
        reply=row["reply"],
        detail=json.loads(row["detail"]),
    )


async def append(
    db: aiosqlite.Connection,
    kind: EventType,
    found: Recipient,
    at: float,
    *,
    reply: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """:func:`append_sync` inside an async write."""
    await run_sync(db, lambda c: append_sync(c, kind, found, at, reply=reply, detail=detail))


def _message_sync(conn: sqlite3.Connection, spool_id: str, recipient: str) -> Recipient | None:
    rows = conn.execute(
        f"{_RECIPIENT} WHERE spool_id = ? AND recipient = ?",
        (spool_id, recipient),
    ).fetchall()
    found = next((Recipient(*r) for r in rows), None)
    if found is None:  # a DSN names the recipient as the far side wrote it
        rows = conn.execute(
            f"{_RECIPIENT} WHERE spool_id = ? AND recipient = ? COLLATE NOCASE",
            (spool_id, recipient),
        ).fetchall()
        found = next((Recipient(*r) for r in rows), None)
    return found


async def _message(db: aiosqlite.Connection, spool_id: str, recipient: str) -> Recipient | None:
    return await run_sync(db, lambda c: _message_sync(c, spool_id, recipient))


def _first_outcome(conn: sqlite3.Connection, spool_id: str, recipient: str, key: str) -> bool:
    """Whether ``key`` (an attempt key of :meth:`Events.outcome`) is new; records it. A
    deferral is not new after the recipient's final outcome either."""
    if (
        key != _FINAL_KEY
        and conn.execute(
            "SELECT 1 FROM uniques WHERE spool_id = ? AND recipient = ? AND kind = ?",
            (spool_id, recipient, _FINAL_KEY),
        ).fetchone()
    ):
        return False
    cursor = conn.execute(
        "INSERT OR IGNORE INTO uniques VALUES (?, ?, ?)", (spool_id, recipient, key)
    )
    return bool(cursor.rowcount)


async def _first_time(db: aiosqlite.Connection, found: Recipient, kind: str) -> bool:
    cursor = await db.execute(
        "INSERT OR IGNORE INTO uniques VALUES (?, ?, ?)",
        (found.spool_id, found.recipient, kind),
    )
    return bool(cursor.rowcount)


#: How much later than its ``created`` time an event may be written (records/events.py
#: ``search``: ``startTimestamp`` becomes a seq bound through it). Events are written when they
#: happen; an outcome a full volume refused is written again later with its own time.
CREATED_SKEW = 3600.0


def _type_values(types: Collection[EventType]) -> list[str]:
    return sorted({EventType(t).value for t in types})


async def _last_seq(db: aiosqlite.Connection) -> int:
    rows = await db.execute_fetchall("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
    return next((int(r[0]) for r in rows), 0)


async def _nothing() -> None:
    return None


def _with_owner(found: Recipient, owner: tuple[str, str] | None) -> Recipient | None:
    if owner is None or not owner[0]:
        return None
    return dataclasses.replace(found, namespace=owner[0], token=owner[1])


class Events:
    def __init__(
        self, db: Database, clock: Callable[[], float], owner: Owner | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._owner = owner

    def owned(self, found: Recipient) -> Recipient | None:
        """``found`` with the namespace and token of its sender: its messages row's, or, when
        that has none (mail spooled before they were recorded, or not recorded at all), the
        live configuration's credential entry of its username; None if neither knows (then
        nothing namespaced is written: no event, no suppression entry, never namespace "")."""
        if found.namespace:
            return found
        return _with_owner(found, self._owner_of(found.username))

    def _owner_of(self, username: str) -> tuple[str, str] | None:
        return self._owner(username) if self._owner and username else None

    def outcome(
        self,
        spool_id: str,
        username: str,
        recipient: str,
        outcome: Outcome,
        at: float,
        *,
        reply: str | None = None,
        attempt: int | None = None,
    ) -> Awaitable[None]:
        """Counted and logged (DELIVERED, DEFERRED, or BOUNCE: hard from SMTP, soft when
        expired); a bounce of a bad address (:func:`suppresses`) suppresses the recipient in its
        namespace; a final outcome completes
        the send's status (if the recipient has one).

        Nothing at all for the relay's own DSNs (username :data:`RELAY_USERNAME`). A message
        with no messages row (spooled just before a crash) is counted for its username and
        logged in the namespace of that username's token (see :meth:`owned`).

        ``attempt`` (the attempt's number) makes it written once: delivery writes the outcomes
        before the spool crosses the recipient off, so a crash in between delivers the mail
        again (at least once) and asks for the same outcome again. A final outcome is keyed
        ``outcome:final`` (a recipient has one final outcome in the spool: any later one is
        that redelivery), a deferral ``outcome:<attempt>`` (the attempt count is persisted only
        by a deferral's STATE record, after its write, so a redelivery carries the same
        number) and is skipped after a final one. The number alone would not do: a redelivery
        may end otherwise (delivered where the first try deferred) and must still count.
        """
        if username == RELAY_USERNAME:
            return _nothing()
        # Read on the loop now: the write runs on the connection's thread (one hop with its
        # batch-mates), which must not read the live configuration.
        owner = self._owner_of(username)

        def write(conn: sqlite3.Connection) -> None:
            if attempt is not None and not _first_outcome(
                conn, spool_id, recipient, _FINAL_KEY if outcome.final else f"outcome:{attempt}"
            ):
                return
            known = _message_sync(conn, spool_id, recipient)
            if known is None:  # not recorded: its token from the configuration
                known = Recipient(spool_id, recipient, username, 0)
            bump_sync(conn, username, known.email_id, _OUTCOME_KIND[outcome])
            # A row without a namespace (spooled before they were recorded) takes the
            # spool's username's owner, read on the loop above; never the configuration here.
            found = known
            if not known.namespace and known.username == username:
                found = _with_owner(known, owner) or known
            kind, detail = _outcome_event(outcome, reply)
            append_sync(conn, kind, found, at, reply=reply, detail=detail)
            if outcome is Outcome.BOUNCED and found.namespace and suppresses(detail["status"]):
                suppressions.add_sync(conn, found.namespace, recipient, Suppression.HARD_BOUNCE, at)
            if found.status_id is None or not outcome.final:
                return
            result = "SENT" if outcome is Outcome.DELIVERED else "UNDELIVERABLE"
            conn.execute(
                "UPDATE statuses SET status = ?, send_result = ?, completed_at = ?"
                " WHERE status_id = ? AND recipient = ? AND status = ?",
                (
                    SendState.COMPLETE.value,
                    result,
                    at,
                    found.status_id,
                    found.recipient,
                    SendState.PROCESSING.value,
                ),
            )

        return self._db.write_sync(write)

    def forget_outcomes(self, spool_ids: Collection[str]) -> Awaitable[None]:
        """Delete the attempt keys of :meth:`outcome` of finished messages (crossed off in the
        spool for good: never delivered again). The messages rows stay (nothing prunes
        them); a key whose delete a crash lost stays too, one row per recipient."""
        ids = json.dumps(sorted(spool_ids))

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM uniques WHERE spool_id IN (SELECT value FROM json_each(?))"
                " AND kind GLOB ?",
                (ids, _OUTCOME_KEYS),
            )

        return self._db.write_sync(write)

    def bounce(
        self,
        spool_id: str,
        recipient: str,
        *,
        hard: bool,
        status: str,
        reply: str,
        category: str | None,
        source: str,
        at: float,
        final: bool | None = None,
    ) -> Awaitable[Recipient | None]:
        """An asynchronous bounce (a DSN that came back, ``source`` "DSN") of a spooled
        recipient; returns it, or None if the message is unknown (nothing is written).

        Hard: counted as bounced (once per message and recipient), suppressed in the
        message's namespace when ``status`` says the address is bad (:func:`suppresses`),
        and an API send's status becomes ``sendResult`` ``UNDELIVERABLE`` with the bounce in
        its view. Soft: counted as a soft bounce.
        Both are a BOUNCE event.

        ``final`` (default: ``hard``): the far side gave up, the message will never arrive.
        A soft one that is final (``Action: failed`` with a 4.x.x status: an MTA that gave
        up on deferred mail) stays SOFT (no suppression) but completes an API send's status
        as ``UNDELIVERABLE`` with the bounce, like a hard one.
        """
        done = hard if final is None else final

        async def write(db: aiosqlite.Connection) -> Recipient | None:
            known = await _message(db, spool_id, recipient)
            if known is None or known.username == RELAY_USERNAME:
                return None
            found = self.owned(known) or known
            detail = {
                "bounceType": "HARD" if hard else "SOFT",
                "source": source,
                "status": status,
                "category": category or bounce_category(status),
            }
            await append(db, EventType.BOUNCE, found, at, reply=reply, detail=detail)
            if not hard:
                await bump(db, found.username, found.email_id, Kind.SOFT_BOUNCED)
            else:
                if await _first_time(db, found, _DSN_BOUNCED):
                    await bump(db, found.username, found.email_id, Kind.BOUNCED)
                if found.namespace and suppresses(status):
                    await suppressions.add(
                        db, found.namespace, found.recipient, Suppression.HARD_BOUNCE, at
                    )
            if done and found.status_id is not None:
                shown = {
                    "bounceType": detail["bounceType"],
                    "status": status,
                    "reply": reply,
                    "at": at,
                }
                await db.execute(
                    "UPDATE statuses SET status = ?, send_result = ?,"
                    " completed_at = coalesce(completed_at, ?), bounce = ?"
                    " WHERE status_id = ?",
                    (
                        SendState.COMPLETE.value,
                        SendResult.UNDELIVERABLE.value,
                        at,
                        json.dumps(shown),
                        found.status_id,
                    ),
                )
            return found

        return self._db.write(write)

    def engagement(
        self,
        event_id: bytes,
        kind: Kind,
        *,
        machine: bool = False,
        url: str | None = None,
        user_agent: str | None = None,
    ) -> Awaitable[Recipient | None]:
        """An open or a click (``kind``) of a tracked recipient; returns it, or None if
        unknown. A ``machine`` one (a scanner, a prefetching proxy) is logged with
        ``filteredEvent`` and counted only as a machine open/click."""

        async def write(db: aiosqlite.Connection) -> Recipient | None:
            rows = await db.execute_fetchall(f"{_RECIPIENT} WHERE event_id = ?", (event_id,))
            known = next((Recipient(*r) for r in rows), None)
            if known is None:
                return None
            found = self.owned(known) or known
            detail: dict[str, Any] = {"filteredEvent": machine}
            if url is not None:
                detail["url"] = url
            if user_agent is not None:
                detail["userAgent"] = user_agent
            await append(db, _ENGAGEMENT[kind], found, self._clock(), detail=detail)
            if machine:
                await bump(db, found.username, found.email_id, _MACHINE[kind])
                return found
            await bump(db, found.username, found.email_id, kind)
            if await _first_time(db, found, _UNIQUE[kind].value):
                await bump(db, found.username, found.email_id, _UNIQUE[kind])
            return found

        return self._db.write(write)

    async def find_message(self, message_id: str, recipients: Iterable[str]) -> Recipient | None:
        """The recipient a Message-ID was sent to (preferring one of ``recipients``)."""
        wanted = {r.lower() for r in recipients}

        async def read(db: aiosqlite.Connection) -> Recipient | None:
            rows = [
                Recipient(*r)
                for r in await db.execute_fetchall(
                    f"{_RECIPIENT} WHERE message_id = ? ORDER BY rowid",
                    (message_id,),
                )
            ]
            for row in rows:
                if row.recipient.lower() in wanted:
                    return row
            return rows[0] if len(rows) == 1 else None

        return await self._db.read(read)

    async def find_spooled(self, spool_id: str, recipient: str) -> Recipient | None:
        """The recorded recipient of a spooled message (case-insensitive), or None."""

        async def read(db: aiosqlite.Connection) -> Recipient | None:
            return await _message(db, spool_id, recipient)

        return await self._db.read(read)

    def complaint(self, found: Recipient) -> Awaitable[bool]:
        """A complaint and an unsubscribe, once per (message, recipient); True the first time."""

        async def write(db: aiosqlite.Connection) -> bool:
            if not await _first_time(db, found, Kind.COMPLAINED.value):
                return False
            now = self._clock()
            stored = await _message(db, found.spool_id, found.recipient) or found
            known = self.owned(stored) or stored
            await bump(db, found.username, found.email_id, Kind.COMPLAINED)
            await bump(db, found.username, found.email_id, Kind.UNSUBSCRIBED)
            await append(db, EventType.SPAMREPORT, known, now)
            if known.namespace:
                await suppressions.add(
                    db, known.namespace, found.recipient, Suppression.SPAM_REPORT, now
                )
            await unsubscribe(db, found.username, found.recipient)
            return True

        return self._db.write(write)

    async def after(
        self,
        seq: int,
        *,
        namespace: str | None = None,
        username: str | None = None,
        types: Collection[EventType] = (),
        limit: int,
    ) -> list[Event]:
        """Up to ``limit`` events after ``seq`` (ascending), of a namespace, a token (by its
        username) and some types if given."""
        where: list[str] = ["seq > ?"]
        args: list[Any] = [seq]
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        if username is not None:
            where.append("username = ?")
            args.append(username)
        return await self._select(where, args, types, limit)

    async def search(
        self,
        namespace: str,
        *,
        after: int = 0,
        types: Collection[EventType] = (),
        recipient: str | None = None,
        status_id: str | None = None,
        start: float | None = None,
        end: float | None = None,
        machine: bool = True,
        limit: int,
    ) -> tuple[list[Event], int]:
        """The events API: up to ``limit`` of a namespace's events after ``after`` (ascending
        seq), filtered by types, recipient (case-insensitive), statusId, ``start <= created <
        end``, and without the machine opens and clicks (``filteredEvent``) unless
        ``machine``; with the seq the scan covered (the newest when the read began), the
        offset to resume from when fewer than ``limit`` were found (what the scan passed
        over is never scanned again).

        ``start`` becomes a seq lower bound through the ``created`` index: the first event
        created at or after ``start`` less :data:`CREATED_SKEW` (an event's ``created`` is
        when it happened, and it is written at most that much later)."""
        where: list[str] = ["namespace = ?", "seq > ?", "seq <= ?"]
        args: list[Any] = [namespace, after, 0]
        if recipient is not None:
            where.append("recipient = ? COLLATE NOCASE")
            args.append(recipient)
        if status_id is not None:
            where.append("status_id = ?")
            args.append(status_id)
        if start is not None:
            where.append("created >= ?")
            args.append(start)
        if end is not None:
            where.append("created < ?")
            args.append(end)
        if not machine:
            where.append("coalesce(json_extract(detail, '$.filteredEvent'), 0) = 0")

        async def read(db: aiosqlite.Connection) -> tuple[list[Event], int]:
            bound = await _last_seq(db)
            lower = after
            if start is not None:
                rows = await db.execute_fetchall(
                    "SELECT seq FROM events WHERE created >= ? ORDER BY created LIMIT 1",
                    (start - CREATED_SKEW,),
                )
                first = next((int(r[0]) for r in rows), None)
                if first is None:  # nothing created since
                    return [], max(after, bound)
                lower = max(after, first - 1)
            bounded = [namespace, lower, bound, *args[3:]]
            sql, values = self._query(where, bounded, types, limit)
            found = [_event(r) for r in await db.execute_fetchall(sql, values)]
            return found, max(after, bound)

        return await self._db.read(read)

    @staticmethod
    def _query(
        where: list[str], args: list[Any], types: Collection[EventType], limit: int
    ) -> tuple[str, list[Any]]:
        """The SELECT of ``_select`` and ``search``: one type reads its (namespace|username,
        type, seq) index in order; several are one such read each (each LIMITed), merged,
        rather than a walk of every event filtering the type row by row."""
        wanted = _type_values(types)
        one = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"  # noqa: S608 - placeholders only
        if not wanted:
            return f"{one} ORDER BY seq LIMIT ?", [*args, limit]
        part = f"SELECT * FROM ({one} AND type = ? ORDER BY seq LIMIT ?)"  # noqa: S608 - constant
        sql = " UNION ALL ".join([part] * len(wanted)) + " ORDER BY seq LIMIT ?"
        values: list[Any] = []
        for t in wanted:
            values += [*args, t, limit]
        return sql, [*values, limit]

    async def _select(
        self, where: list[str], args: list[Any], types: Collection[EventType], limit: int
    ) -> list[Event]:
        sql, values = self._query(where, args, types, limit)

        async def read(db: aiosqlite.Connection) -> list[Event]:
            return [_event(r) for r in await db.execute_fetchall(sql, values)]

        return await self._db.read(read)

    async def last_seq(self) -> int:
        """The newest event's seq (0 if none was ever written; pruning does not lower it)."""

        return await self._db.read(_last_seq)

    async def prune(self, before: float, *, keep: int | None = None, batch: int = 5000) -> int:
        """Delete the events created before ``before`` and, with ``keep``, the oldest beyond
        the newest ``keep`` (by seq); returns how many. In transactions of at most ``batch``
        rows, so other records' work goes on between them."""

        async def by_age(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "DELETE FROM events WHERE seq IN"
                " (SELECT seq FROM events WHERE created < ? LIMIT ?)",
                (before, batch),
            )
            return cursor.rowcount

        kept = keep or 0

        async def by_count(db: aiosqlite.Connection) -> int:
            # seq counts up without reuse: the newest ``keep`` are the seqs above last - keep
            # (fewer where older ones were pruned by age), so no row is counted.
            cutoff = await _last_seq(db) - kept
            rows = await db.execute_fetchall("SELECT min(seq) FROM events")
            first = next((r[0] for r in rows), None)
            if first is None or first > cutoff:
                return 0
            cursor = await db.execute(
                "DELETE FROM events WHERE seq <= ?", (min(cutoff, first + batch - 1),)
            )
            return cursor.rowcount

        total = 0
        for work in (by_age, *((by_count,) if keep is not None else ())):
            while (deleted := await self._db.write(work)) > 0:
                total += deleted
                if deleted < batch and work is by_age:
                    break
        return total


_OUTCOME_TYPE = {
    Outcome.DELIVERED: EventType.DELIVERED,
    Outcome.DEFERRED: EventType.DEFERRED,
    Outcome.BOUNCED: EventType.BOUNCE,
    Outcome.EXPIRED: EventType.BOUNCE,
}


def _outcome_event(outcome: Outcome, reply: str | None) -> tuple[EventType, dict[str, Any]]:
    """The event type of a delivery outcome and its detail: our own 5xx is a HARD bounce
    (source SMTP), the queue lifetime reached a SOFT one (source EXPIRED, 4.4.7)."""
    if outcome is Outcome.BOUNCED:
        status = status_code(reply)
        detail = {"bounceType": "HARD", "source": "SMTP", "status": status}
        return EventType.BOUNCE, {**detail, "category": bounce_category(status)}
    if outcome is Outcome.EXPIRED:
        status = status_code(reply) or "4.4.7"
        detail = {"bounceType": "SOFT", "source": "EXPIRED", "status": status}
        return EventType.BOUNCE, {**detail, "category": bounce_category(status, expired=True)}
    return _OUTCOME_TYPE[outcome], {}
