"""The relay's SQLite records on their own: what they keep, across restarts and schema versions."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from itertools import count
from pathlib import Path

import pytest

from txmail_relay.contract import RecordsSettings, SendState
from txmail_relay.outcomes import Outcome
from txmail_relay.records.events import status_code
from txmail_relay.records.model import EventType, Kind, Recipient, SentCopy, Suppression
from txmail_relay.records.records import Records
from txmail_relay.records.schema import MIGRATIONS, VERSION, SchemaError
from txmail_relay.records.suppressions import page_sql

# The schema as the relay wrote it before the suppressions table (commit 576fbf0), and the
# suppressions table added later (736f49a), both before schema versions: user_version 0.
UNVERSIONED_FIRST = """
CREATE TABLE IF NOT EXISTS statuses (
    status_id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    send_id TEXT,
    email_id INTEGER NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    send_result TEXT,
    requested_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS statuses_send_id ON statuses (username, send_id)
    WHERE send_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    spool_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    username TEXT NOT NULL,
    email_id INTEGER NOT NULL,
    message_id TEXT,
    event_id BLOB,
    status_id TEXT,
    sent_at REAL NOT NULL,
    PRIMARY KEY (spool_id, recipient)
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_event_id ON messages (event_id)
    WHERE event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    username TEXT NOT NULL,
    email_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (username, email_id, kind)
);
CREATE TABLE IF NOT EXISTS uniques (
    spool_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (spool_id, recipient, kind)
);
CREATE TABLE IF NOT EXISTS tokens (
    username TEXT PRIMARY KEY,
    last_sent_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    username TEXT NOT NULL,
    address TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_sent REAL NOT NULL,
    properties TEXT NOT NULL,
    unsubscribed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (username, address)
);
"""
UNVERSIONED_SUPPRESSIONS = """
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (address, reason)
);
"""
# What those relays had recorded: a send queued to ada, a complaint from her, a contact.
OLD_ROWS = """
INSERT INTO statuses VALUES ('st1', 'app1', 'order-1', 7, 'Ada@Dest.test', 'PROCESSING',
    'QUEUED', 1.0, 2.0, NULL);
INSERT INTO statuses VALUES ('st2', 'app1', 'order-2', 7, 'ada@dest.test', 'PENDING',
    NULL, 1.0, NULL, NULL);
INSERT INTO messages VALUES ('s1', 'Ada@Dest.test', 'app1', 7, '<m1@x>', NULL, 'st1', 2.0);
INSERT INTO counters VALUES ('app1', 7, 'sent', 1);
INSERT INTO counters VALUES ('app1', 7, 'complained', 1);
INSERT INTO uniques VALUES ('s1', 'Ada@Dest.test', 'complained');
INSERT INTO tokens VALUES ('app1', 2.0);
INSERT INTO contacts VALUES ('app1', 'ada@dest.test', 2.0, 2.0, '{"firstname": "Ada"}', 1);
"""


def _write_db(path: Path, script: str, *, user_version: int = 0) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(script)
        db.execute(f"PRAGMA user_version = {user_version}")
        db.commit()


def _user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


@contextlib.asynccontextmanager
async def opened(
    directory: Path,
    clock: Callable[[], float] = time.time,
    owner: Callable[[str], tuple[str, str] | None] | None = None,
) -> AsyncIterator[Records]:
    records = Records(directory, clock=clock, owner=owner)
    await records.open()
    try:
        yield records
    finally:
        await records.close()


# -- sends ---------------------------------------------------------------------------------------


async def test_unspooled_reservations_are_dropped_on_restart(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        pending, created = await records.sends.reserve("u", "s1", 1, "a@x.test")
        assert created and pending.status is SendState.PENDING
        queued, _ = await records.sends.reserve("u", "s2", 1, "a@x.test")
        await records.sends.record("u", 1, [], queued_status=queued.status_id)
    async with opened(tmp_path) as records:
        _, again = await records.sends.reserve("u", "s1", 1, "a@x.test")
        assert again  # the crashed send may be retried
        kept, fresh = await records.sends.reserve("u", "s2", 1, "a@x.test")
        assert not fresh and kept.status is SendState.PROCESSING


async def test_a_send_is_recorded_even_when_its_caller_is_cancelled(tmp_path: Path) -> None:
    """The mail is in the spool by then: a client hanging up must not lose its record."""
    async with opened(tmp_path) as records:
        status, _ = await records.sends.reserve("u", "s1", 1, "a@x.test")
        copies = [SentCopy("m1", "a@x.test", status_id=status.status_id)]

        async def caller() -> None:
            await records.sends.record("u", 1, copies, queued_status=status.status_id)

        task = asyncio.create_task(caller())
        await asyncio.sleep(0)  # the write has been asked for
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        found = await records.sends.get("u", status.status_id)  # runs after the write
        assert found is not None and found.status is SendState.PROCESSING
        assert found.send_result == "QUEUED"
        totals = await records.counters.totals()
        assert totals.counts["u"][Kind.SENT] == 1


async def test_outcomes_complete_the_send_and_are_counted(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        status, _ = await records.sends.reserve("u", None, 3, "a@x.test")
        copies = [SentCopy("m1", "a@x.test", status_id=status.status_id), SentCopy("m1", "b@x")]
        await records.sends.record("u", 3, copies, queued_status=status.status_id)
        await records.events.outcome("m1", "u", "a@x.test", Outcome.DEFERRED, 5.0)
        still = await records.sends.get("u", status.status_id)
        assert still is not None and still.status is SendState.PROCESSING
        await records.events.outcome("m1", "u", "a@x.test", Outcome.DELIVERED, 6.0)
        await records.events.outcome("m1", "u", "b@x", Outcome.EXPIRED, 7.0)
        done = await records.sends.get("u", status.status_id)
        assert done is not None and done.status is SendState.COMPLETE
        assert (done.send_result, done.completed_at) == ("SENT", 6.0)
        assert await records.sends.get("someone-else", status.status_id) is None
        totals = await records.counters.totals()
    counts = totals.counts["u"]
    assert (counts[Kind.SENT], counts[Kind.DEFERRED], counts[Kind.DELIVERED]) == (2, 1, 1)
    assert counts[Kind.EXPIRED] == 1
    assert "u" in totals.last_sent


# -- events and contacts -----------------------------------------------------------------------


async def test_opens_and_clicks_count_once_per_recipient_as_unique(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        await records.sends.record("u", 4, [SentCopy("m1", "a@x", "<m@x>", b"e1")])
        for _ in range(2):
            found = await records.events.engagement(b"e1", Kind.OPENED)
            assert found == Recipient("m1", "a@x", "u", 4, message_id="<m@x>")
        await records.events.engagement(b"e1", Kind.CLICKED)
        assert await records.events.engagement(b"unknown", Kind.CLICKED) is None
        counts = (await records.counters.totals()).counts["u"]
    assert (counts[Kind.OPENED], counts[Kind.UNIQUE_OPENED]) == (2, 1)
    assert (counts[Kind.CLICKED], counts[Kind.UNIQUE_CLICKED]) == (1, 1)


async def test_contacts_merge_properties_and_page_by_address(tmp_path: Path) -> None:
    ticks = count(1)
    async with opened(tmp_path, clock=lambda: float(next(ticks))) as records:
        first = [SentCopy("m1", "Ada@Dest.test"), SentCopy("m1", "bob@dest.test")]
        await records.sends.record("u", 1, first, contacts={"firstname": "Ada", "plan": "a"})
        await records.sends.record(
            "u", 1, [SentCopy("m2", "ada@dest.test")], contacts={"plan": "b"}
        )
        await records.sends.record("u", 1, [SentCopy("m3", "cy@dest.test")])  # no contacts
        await records.sends.record("u", 1, [SentCopy("m4", "BOB@dest.test")], contacts={})
        page = await records.contacts.page("u", limit=1)
        assert [c.address for c in page] == ["ada@dest.test"]
        assert dict(page[0].properties) == {"firstname": "Ada", "plan": "b"}
        rest = await records.contacts.page("u", after=page[0].address)
        assert [c.address for c in rest] == ["bob@dest.test"]
        assert dict(rest[0].properties) == {"firstname": "Ada", "plan": "a"}  # kept
        assert (rest[0].first_seen, rest[0].last_sent) == (1.0, 4.0)  # the 1st and 4th send
        assert (await records.counters.totals()).contacts == {"u": 2}


async def test_bounces_and_complaints_suppress_their_recipients(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        copies = [SentCopy("s1", "Ada@Dest.test", "<m1@x>"), SentCopy("s1", "bob@dest.test")]
        await records.sends.record("app1", 0, copies, contacts={}, namespace="ns1", token="t1")
        await records.events.outcome(
            "s1", "app1", "bob@dest.test", Outcome.BOUNCED, 1.0, reply="550 5.1.1 unknown user"
        )
        await records.events.outcome("s1", "app1", "Ada@Dest.test", Outcome.DEFERRED, 1.0)
        suppressions = records.suppressions
        assert await suppressions.find("ns1", ["BOB@dest.test"], [Suppression.HARD_BOUNCE]) == {
            "BOB@dest.test": Suppression.HARD_BOUNCE
        }
        # Only in the sending token's namespace.
        assert await suppressions.find("ns2", ["BOB@dest.test"], list(Suppression)) == {}
        assert await suppressions.find("ns1", ["ada@dest.test"], list(Suppression)) == {}
        ada = await records.events.find_message("<m1@x>", ["ada@dest.test"])
        assert ada == Recipient("s1", "Ada@Dest.test", "app1", 0, "ns1", "t1", message_id="<m1@x>")
        assert await records.events.complaint(ada)
        assert not await records.events.complaint(ada)  # once per message and recipient
        both = await suppressions.find("ns1", ["ada@dest.test", "bob@dest.test"], list(Suppression))
        assert both == {
            "ada@dest.test": Suppression.SPAM_REPORT,
            "bob@dest.test": Suppression.HARD_BOUNCE,
        }
        assert await suppressions.find("ns1", ["ada@dest.test"], []) == {}
        [contact, _] = await records.contacts.page("app1")
        assert contact.address == "ada@dest.test" and contact.unsubscribed
        counts = (await records.counters.totals()).counts["app1"]
    assert (counts[Kind.COMPLAINED], counts[Kind.UNSUBSCRIBED], counts[Kind.BOUNCED]) == (1, 1, 1)


# -- schema versions -----------------------------------------------------------------------------


async def test_a_new_database_is_at_the_current_version(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        path = records.path
    assert _user_version(path) == VERSION


@pytest.mark.parametrize(
    "script",
    [UNVERSIONED_FIRST, UNVERSIONED_FIRST + UNVERSIONED_SUPPRESSIONS],
    ids=["before-suppressions", "with-suppressions"],
)
async def test_an_unversioned_database_migrates_in_place(tmp_path: Path, script: str) -> None:
    path = tmp_path / "txmail.db"
    _write_db(path, script + OLD_ROWS)
    async with opened(tmp_path) as records:
        status = await records.sends.get("app1", "st1")
        assert status is not None and status.status is SendState.PROCESSING
        assert await records.sends.get("app1", "st2") is None  # never reached the spool
        _, fresh = await records.sends.reserve("app1", "order-1", 7, "ada@dest.test")
        assert not fresh  # the sendId is still known
        # Complaints recorded before the suppressions table are suppressions now.
        assert await records.suppressions.find("ns1", ["ADA@dest.test"], list(Suppression)) == {
            "ADA@dest.test": Suppression.SPAM_REPORT
        }
        await records.events.outcome("s1", "app1", "Ada@Dest.test", Outcome.DELIVERED, 3.0)
        done = await records.sends.get("app1", "st1")
        assert done is not None and done.status is SendState.COMPLETE
        totals = await records.counters.totals()
        [contact] = await records.contacts.page("app1")
    assert totals.counts["app1"] == {Kind.SENT: 1, Kind.COMPLAINED: 1, Kind.DELIVERED: 1}
    assert totals.last_sent == {"app1": 2.0}
    assert contact.unsubscribed and dict(contact.properties) == {"firstname": "Ada"}
    assert _user_version(path) == VERSION
    async with opened(tmp_path) as records:  # and opens again at that version
        assert (await records.counters.totals()).counts == totals.counts


# A version-5 database (before issue 12): relay-wide suppressions with the old reasons.
VERSION_5_ROWS = """
INSERT INTO messages VALUES ('s1', 'Ada@Dest.test', 'app1', 7, '<m1@x>', NULL, 'st1', 2.0);
INSERT INTO statuses VALUES ('st1', 'app1', 'order-1', 7, 'Ada@Dest.test', 'PROCESSING',
    'QUEUED', 1.0, 2.0, NULL);
INSERT INTO suppressions VALUES ('gone@dest.test', 'bounced', 5.0);
INSERT INTO suppressions VALUES ('ada@dest.test', 'complained', 6.0);
"""


async def test_a_version_5_database_keeps_its_suppressions_relay_wide(tmp_path: Path) -> None:
    path = tmp_path / "txmail.db"
    _write_db(path, "".join(MIGRATIONS[:5]) + VERSION_5_ROWS, user_version=5)
    async with opened(tmp_path, owner={"app1": ("ns1", "t1")}.get) as records:
        suppressions = records.suppressions
        every = list(Suppression)
        for namespace in ("ns1", "ns2"):  # relay-wide: they apply in every namespace
            found = await suppressions.find(namespace, ["GONE@dest.test", "ada@dest.test"], every)
            assert found == {
                "GONE@dest.test": Suppression.HARD_BOUNCE,
                "ada@dest.test": Suppression.SPAM_REPORT,
            }
        [entry] = await suppressions.get("ns1", "gone@dest.test")
        assert (entry.reason, entry.at, entry.relay_wide) == (Suppression.HARD_BOUNCE, 5.0, True)
        assert await suppressions.remove("ns1", "gone@dest.test") == 0  # no namespace can
        assert await suppressions.get("ns2", "gone@dest.test") == [entry]
        # The old message is still tied to its status; its row has no token (""): the event is
        # of the token the configuration names for its username, never of namespace "".
        await records.events.outcome("s1", "app1", "Ada@Dest.test", Outcome.DELIVERED, 7.0)
        [event] = await records.events.after(0, limit=10)
        assert (event.type, event.namespace, event.token, event.status_id) == (
            EventType.DELIVERED,
            "ns1",
            "t1",
            "st1",
        )
        done = await records.sends.get("app1", "st1")
        assert done is not None and done.send_result == "SENT"
    assert _user_version(path) == VERSION


async def test_a_database_from_a_newer_relay_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "txmail.db"
    _write_db(path, UNVERSIONED_FIRST + UNVERSIONED_SUPPRESSIONS, user_version=VERSION + 1)
    records = Records(tmp_path)
    with pytest.raises(SchemaError) as refused:
        await records.open()
    message = str(refused.value)
    assert str(path) in message
    assert f"version {VERSION + 1} is newer than this relay knows ({VERSION})" in message
    assert _user_version(path) == VERSION + 1  # left as it was


@pytest.mark.parametrize("script", [None, UNVERSIONED_FIRST + UNVERSIONED_SUPPRESSIONS + OLD_ROWS])
async def test_a_sends_messages_are_found_by_index(tmp_path: Path, script: str | None) -> None:
    """The send API's look-up of a send's spooled messages (is warm-up holding one?) reads
    an index, in a new database and in one migrated from an older schema, not every row."""
    path = tmp_path / "txmail.db"
    if script is not None:
        _write_db(path, script)
    async with opened(tmp_path) as records:
        assert await records.sends.spool_ids("nothing") == []
    with contextlib.closing(sqlite3.connect(path)) as db:
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT DISTINCT spool_id FROM messages WHERE status_id = ?",
                ("st1",),
            )
        )
    assert "USING INDEX messages_status_id" in plan, plan


# -- the events log ------------------------------------------------------------------------------


async def test_every_write_logs_its_event_with_the_token_of_the_message(tmp_path: Path) -> None:
    ticks = count(100)
    async with opened(tmp_path, clock=lambda: float(next(ticks))) as records:
        status, _ = await records.sends.reserve("app1", None, 7, "ada@dest.test")
        copies = [
            SentCopy("s1", "ada@dest.test", "<m1@x>", b"e1", status.status_id),
            SentCopy("s1", "bob@dest.test", "<m1@x>", b"e2"),
        ]
        await records.sends.record(
            "app1", 7, copies, queued_status=status.status_id, namespace="ns1", token="t1"
        )
        events = records.events
        await events.outcome(
            "s1", "app1", "bob@dest.test", Outcome.DEFERRED, 1.0, reply="451 4.7.1 later"
        )
        await events.outcome(
            "s1", "app1", "bob@dest.test", Outcome.BOUNCED, 2.0, reply="550 5.1.1 no such user"
        )
        await events.outcome("s1", "app1", "ada@dest.test", Outcome.DELIVERED, 3.0, reply="250 ok")
        await events.engagement(b"e1", Kind.OPENED, machine=True, user_agent="Scanner/1")
        await events.engagement(b"e1", Kind.CLICKED, url="https://x.test/", user_agent="Mo/5")
        await records.sends.dropped(
            "app1",
            7,
            ["gone@dest.test"],
            "PREVIOUSLY_BOUNCED",
            "suppressed",
            namespace="ns1",
            token="t1",
        )
        logged = await events.after(0, limit=100)
        assert [(e.type, e.recipient) for e in logged] == [
            (EventType.SENT, "ada@dest.test"),
            (EventType.SENT, "bob@dest.test"),
            (EventType.DEFERRED, "bob@dest.test"),
            (EventType.BOUNCE, "bob@dest.test"),
            (EventType.DELIVERED, "ada@dest.test"),
            (EventType.OPEN, "ada@dest.test"),
            (EventType.CLICK, "ada@dest.test"),
            (EventType.DROPPED, "gone@dest.test"),
        ]
        assert {(e.namespace, e.token, e.username) for e in logged} == {("ns1", "t1", "app1")}
        assert [e.seq for e in logged] == sorted({e.seq for e in logged})
        bounce = logged[3].view()
        assert bounce["bounceType"] == "HARD" and bounce["source"] == "SMTP"
        assert (bounce["status"], bounce["category"]) == ("5.1.1", "UNKNOWN_USER")
        assert bounce["response"] == "550 5.1.1 no such user" and bounce["created"] == 2000
        assert bounce["createdAt"] == "1970-01-01T00:00:02.000Z"
        assert logged[0].view()["statusId"] == status.status_id
        assert logged[0].view()["messageId"] == "<m1@x>"
        assert logged[5].view()["filteredEvent"] is True
        assert logged[6].view()["url"] == "https://x.test/"
        assert logged[6].view()["filteredEvent"] is False
        assert logged[7].view()["dropReason"] == "PREVIOUSLY_BOUNCED"
        # Filters, paging by seq, the newest seq.
        assert await events.after(logged[5].seq, limit=1) == [logged[6]]
        assert await events.after(0, types=[EventType.BOUNCE], limit=9) == [logged[3]]
        assert await events.after(0, namespace="ns2", limit=9) == []
        assert await events.after(0, username="app1", limit=2) == logged[:2]
        assert await events.last_seq() == logged[-1].seq
        counts = (await records.counters.totals()).counts["app1"]
        assert (counts[Kind.MACHINE_OPENED], counts.get(Kind.OPENED, 0)) == (1, 0)
        assert (counts[Kind.CLICKED], counts[Kind.DROPPED]) == (1, 1)
        # Pruning by age keeps the seq counting up.
        assert await events.prune(101.5) == 5  # SENT at 101, the outcomes at 1, 2 and 3
        assert await events.after(0, limit=100) == logged[5:]
        assert await events.last_seq() == logged[-1].seq


async def test_an_asynchronous_bounce_is_tied_to_its_message(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        status, _ = await records.sends.reserve("app1", None, 7, "Ada@Dest.test")
        copies = [SentCopy("s1", "Ada@Dest.test", "<m1@x>", None, status.status_id)]
        await records.sends.record(
            "app1", 7, copies, queued_status=status.status_id, namespace="ns1", token="t1"
        )
        events = records.events
        await events.outcome("s1", "app1", "Ada@Dest.test", Outcome.DELIVERED, 3.0)
        assert (
            await events.bounce(
                "nope",
                "ada@dest.test",
                hard=True,
                status="5.1.1",
                reply="x",
                category=None,
                source="DSN",
                at=4.0,
            )
            is None
        )
        soft = await events.bounce(
            "s1",
            "ada@dest.test",
            hard=False,
            status="4.2.2",
            reply="full",
            category=None,
            source="DSN",
            at=4.0,
        )
        assert soft is not None and (soft.namespace, soft.token) == ("ns1", "t1")
        sent = await records.sends.get("app1", status.status_id)
        assert sent is not None and sent.send_result == "SENT" and sent.bounce is None
        for _ in range(2):  # a hard bounce counts once per message and recipient
            found = await events.bounce(
                "s1",
                "ADA@dest.test",
                hard=True,
                status="5.1.1",
                reply="550 5.1.1 unknown",
                category=None,
                source="DSN",
                at=5.0,
            )
            assert found is not None and found.status_id == status.status_id
        bounced = await records.sends.get("app1", status.status_id)
        assert bounced is not None and bounced.status is SendState.COMPLETE
        assert bounced.send_result == "UNDELIVERABLE"
        assert bounced.bounce == {
            "bounceType": "HARD",
            "status": "5.1.1",
            "reply": "550 5.1.1 unknown",
            "at": 5.0,
        }
        assert await records.suppressions.find("ns1", ["ada@dest.test"], [Suppression.HARD_BOUNCE])
        assert not await records.suppressions.find("ns2", ["ada@dest.test"], list(Suppression))
        counts = (await records.counters.totals()).counts["app1"]
        assert (counts[Kind.BOUNCED], counts[Kind.SOFT_BOUNCED]) == (1, 1)
        logged = await events.after(0, types=[EventType.BOUNCE], limit=9)
        assert [(e.detail["bounceType"], e.detail["category"]) for e in logged] == [
            ("SOFT", "MAILBOX_FULL"),
            ("HARD", "UNKNOWN_USER"),
            ("HARD", "UNKNOWN_USER"),
        ]


async def test_an_expired_recipient_is_a_soft_bounce_counted_as_bounced(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        await records.sends.record(
            "app1", 0, [SentCopy("s1", "cy@dest.test")], namespace="ns1", token="t1"
        )
        await records.events.outcome("s1", "app1", "cy@dest.test", Outcome.EXPIRED, 9.0)
        [event] = await records.events.after(0, types=[EventType.BOUNCE], limit=9)
        assert dict(event.detail) == {
            "bounceType": "SOFT",
            "source": "EXPIRED",
            "status": "4.4.7",
            "category": "TIMEOUT",
        }
        counts = (await records.counters.totals()).counts["app1"]
        # Not suppressed: only hard bounces are.
        assert not await records.suppressions.find("ns1", ["cy@dest.test"], list(Suppression))
    assert counts[Kind.EXPIRED] == 1 and Kind.SOFT_BOUNCED not in counts


async def test_the_relays_own_dsns_and_unrecorded_mail_never_suppress_relay_wide(
    tmp_path: Path,
) -> None:
    """A DSN the relay spools (username "") writes nothing; an outcome or a DSN of mail with
    no namespace recorded (no messages row: spooled just before a crash; or spooled before
    the upgrade) is its token's, from the live configuration: never namespace "" (relay-wide,
    which no API can remove), never another token's counts."""
    tokens = {"app1": ("ns1", "t1")}
    records = Records(tmp_path, owner=tokens.get)
    await records.open()
    try:
        events = records.events
        unknown = "550 5.1.1 no such user"
        await events.outcome("dsn1", "", "sender@app.test", Outcome.BOUNCED, 1.0, reply=unknown)
        await events.outcome("dsn2", "", "sender@app.test", Outcome.DELIVERED, 1.0)
        await events.outcome("lost", "app1", "ada@dest.test", Outcome.BOUNCED, 2.0, reply=unknown)
        await events.outcome("gone", "old", "bob@dest.test", Outcome.BOUNCED, 2.0, reply=unknown)
        await records.sends.record("app1", 3, [SentCopy("s1", "cy@dest.test", "<m@x>")])
        found = await events.bounce(
            "s1",
            "cy@dest.test",
            hard=True,
            status="5.1.1",
            reply=unknown,
            category=None,
            source="DSN",
            at=3.0,
        )
        assert found is not None and (found.namespace, found.token) == ("ns1", "t1")
        logged = await events.after(0, limit=100)
        assert {(e.namespace, e.token, e.username) for e in logged} == {("ns1", "t1", "app1")}
        assert sorted((e.type.value, e.recipient) for e in logged) == [
            ("BOUNCE", "ada@dest.test"),
            ("BOUNCE", "cy@dest.test"),
        ]
        suppressions = records.suppressions
        assert await suppressions.get("ns2", "ada@dest.test") == []  # not relay-wide
        assert await suppressions.get("ns2", "cy@dest.test") == []
        assert await suppressions.get("ns2", "bob@dest.test") == []
        assert [e.reason for e in await suppressions.get("ns1", "ada@dest.test")] == [
            Suppression.HARD_BOUNCE
        ]
        assert [e.reason for e in await suppressions.get("ns1", "cy@dest.test")] == [
            Suppression.HARD_BOUNCE
        ]
        counts = (await records.counters.totals()).counts
        assert "" not in counts
        assert counts["app1"][Kind.BOUNCED] == 2
    finally:
        await records.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "txmail.db")) as db:
        assert db.execute("SELECT count(*) FROM events WHERE namespace = ''").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM suppressions WHERE namespace = ''").fetchone() == (
            0,
        )


@pytest.mark.parametrize(
    ("reply", "suppressed"),
    [
        ("550 5.1.1 no such user", True),
        ("550 5.1.2 no such domain", True),
        ("550 5.1.10 null MX", True),
        ("550 5.2.1 mailbox disabled", True),
        ("554 5.7.1 blocked using zen.spamhaus.org", False),
        ("550 5.7.26 DMARC policy", False),
        ("552 5.3.4 message too big", False),
        ("554 5.6.0 content rejected", False),
        ("550 5.2.3 message too long for this mailbox", False),
        ("554 transaction failed", False),
    ],
)
async def test_only_a_bad_address_is_suppressed(
    tmp_path: Path, reply: str, suppressed: bool
) -> None:
    """Every hard bounce is a BOUNCE event and counted, but only one that says the address is
    bad adds a HARD_BOUNCE entry: a blocklisted IP, a DMARC refusal, a size or a content
    refusal does not stop the next message to that address."""
    async with opened(tmp_path) as records:
        copies = [SentCopy("s1", "ada@dest.test"), SentCopy("s1", "bob@dest.test")]
        await records.sends.record("app1", 0, copies, namespace="ns1", token="t1")
        await records.events.outcome(
            "s1", "app1", "ada@dest.test", Outcome.BOUNCED, 1.0, reply=reply
        )
        status = status_code(reply) or "5.0.0"
        found = await records.events.bounce(
            "s1",
            "bob@dest.test",
            hard=True,
            status=status,
            reply=reply,
            category=None,
            source="DSN",
            at=2.0,
        )
        assert found is not None
        logged = await records.events.after(0, types=[EventType.BOUNCE], limit=9)
        assert [(e.recipient, e.detail["bounceType"]) for e in logged] == [
            ("ada@dest.test", "HARD"),
            ("bob@dest.test", "HARD"),
        ]
        found_entries = await records.suppressions.find(
            "ns1", ["ada@dest.test", "bob@dest.test"], list(Suppression)
        )
        expected = {"ada@dest.test", "bob@dest.test"} if suppressed else set()
        assert set(found_entries) == expected
        counts = (await records.counters.totals()).counts["app1"]
    assert counts[Kind.BOUNCED] == 2


async def test_a_soft_dsn_that_gave_up_completes_the_send_as_undeliverable(tmp_path: Path) -> None:
    """``Action: failed`` with a 4.x.x status (the far MTA gave up on deferred mail): SOFT, not
    suppressed, but final: the API send is UNDELIVERABLE with the bounce shown. A soft DSN
    that is not final (a delay warning) leaves the send as it was."""
    async with opened(tmp_path) as records:
        status, _ = await records.sends.reserve("app1", None, 7, "ada@dest.test")
        copies = [SentCopy("s1", "ada@dest.test", "<m1@x>", None, status.status_id)]
        await records.sends.record(
            "app1", 7, copies, queued_status=status.status_id, namespace="ns1", token="t1"
        )
        events = records.events
        await events.outcome("s1", "app1", "ada@dest.test", Outcome.DELIVERED, 3.0)
        for final, at in ((False, 4.0), (True, 5.0)):
            found = await events.bounce(
                "s1",
                "ada@dest.test",
                hard=False,
                status="4.4.7",
                reply="delivery time expired",
                category=None,
                source="DSN",
                at=at,
                final=final,
            )
            assert found is not None
            sent = await records.sends.get("app1", status.status_id)
            assert sent is not None
            if not final:
                assert sent.send_result == "SENT" and sent.bounce is None
        assert sent is not None
        assert sent.status is SendState.COMPLETE and sent.send_result == "UNDELIVERABLE"
        assert sent.bounce == {
            "bounceType": "SOFT",
            "status": "4.4.7",
            "reply": "delivery time expired",
            "at": 5.0,
        }
        assert not await records.suppressions.find("ns1", ["ada@dest.test"], list(Suppression))
        counts = (await records.counters.totals()).counts["app1"]
    assert counts[Kind.SOFT_BOUNCED] == 2 and Kind.BOUNCED not in counts


async def test_an_events_poll_that_finds_nothing_moves_its_offset_past_what_it_scanned(
    tmp_path: Path,
) -> None:
    """A filtered poll (eventType, startTimestamp) that matches nothing returns the newest seq
    as the offset to resume from, so the next poll scans only newer events; a type filter
    reads the (namespace, type, seq) index, one read per type, in seq order."""
    ticks = count(1000)
    async with opened(tmp_path, clock=lambda: float(next(ticks))) as records:
        copies = [SentCopy("s1", f"r{i}@dest.test") for i in range(20)]
        await records.sends.record("app1", 0, copies, namespace="ns1", token="t1")
        await records.sends.record(
            "app2", 0, [SentCopy("s2", "z@dest.test")], namespace="ns2", token="t2"
        )
        last = await records.events.last_seq()
        events = records.events
        found, scanned = await events.search("ns1", types=[EventType.BOUNCE], limit=10)
        assert (found, scanned) == ([], last)
        await events.outcome("s1", "app1", "r3@dest.test", Outcome.DELIVERED, 2000.0)
        await events.outcome("s1", "app1", "r4@dest.test", Outcome.BOUNCED, 2001.0, reply="550")
        found, scanned = await events.search(
            "ns1", after=last, types=[EventType.BOUNCE, EventType.DELIVERED], limit=10
        )
        assert [(e.type, e.recipient) for e in found] == [
            (EventType.DELIVERED, "r3@dest.test"),
            (EventType.BOUNCE, "r4@dest.test"),
        ]
        assert scanned == await events.last_seq() == last + 2
        # startTimestamp: a seq bound through the created index; nothing since: the newest.
        assert await events.search("ns1", start=5000.0, limit=10) == ([], last + 2)
        found, _ = await events.search("ns1", start=2000.5, limit=10)
        assert [e.recipient for e in found] == ["r4@dest.test"]
        sql, values = events._query(
            ["namespace = ?", "seq > ?", "seq <= ?"], ["ns1", 0, 9], [EventType.BOUNCE], 10
        )
    with contextlib.closing(sqlite3.connect(tmp_path / "txmail.db")) as db:
        plan = " ".join(str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", values))
    assert "INDEX events_namespace_type" in plan, plan


async def test_the_events_search_can_leave_out_machine_opens_and_clicks(tmp_path: Path) -> None:
    async with opened(tmp_path) as records:
        copies = [SentCopy("s1", "ada@dest.test", "<m@x>", b"e1")]
        await records.sends.record("app1", 0, copies, namespace="ns1", token="t1")
        await records.events.engagement(b"e1", Kind.OPENED, machine=True)
        await records.events.engagement(b"e1", Kind.OPENED)
        every, _ = await records.events.search("ns1", types=[EventType.OPEN], limit=9)
        people, _ = await records.events.search(
            "ns1", types=[EventType.OPEN], machine=False, limit=9
        )
    assert [e.detail["filteredEvent"] for e in every] == [True, False]
    assert people == every[1:]


async def test_the_events_log_is_pruned_oldest_first_past_its_size_bound(tmp_path: Path) -> None:
    """``records.maxEvents`` bounds the events log whatever their age (it shares the spool's
    volume), oldest first, in small transactions; the seq counts on."""
    settings = RecordsSettings.model_validate({"eventsRetention": 60, "maxEvents": 1000})
    assert (settings.events_retention, settings.max_events) == (60, 1000)
    async with opened(tmp_path, clock=lambda: 100.0) as records:
        copies = [SentCopy("s1", f"r{i}@dest.test") for i in range(30)]
        await records.sends.record("app1", 0, copies, namespace="ns1", token="t1")
        everything = await records.events.after(0, limit=100)
        last = await records.events.last_seq()
        assert await records.events.prune(50.0, keep=10, batch=4) == 20
        assert await records.events.after(0, limit=100) == everything[-10:]
        assert await records.events.prune(50.0, keep=10, batch=4) == 0
        assert await records.events.prune(150.0, batch=4) == 10  # by age: every one
        assert await records.events.last_seq() == last


@pytest.mark.parametrize("reasons", [0, 1])
async def test_a_namespaces_suppression_list_reads_only_its_own_rows(
    tmp_path: Path, reasons: int
) -> None:
    """Listing a small namespace's suppressions reads its rows (and the relay-wide ones) by the
    primary key, never a big neighbour's interleaved addresses; the page is right."""
    async with opened(tmp_path) as records:
        for i in range(50):
            await records.suppressions.put("big", f"m{i:03d}@dest.test", Suppression.MANUAL, 1.0)
        await records.suppressions.put("small", "m010x@dest.test", Suppression.MANUAL, 2.0)
        await records.suppressions.put("small", "m040x@dest.test", Suppression.HARD_BOUNCE, 2.0)
        await records.suppressions.put("", "m020x@dest.test", Suppression.MANUAL, 3.0)
        wanted = [Suppression.MANUAL] if reasons else []
        page = await records.suppressions.page("small", reasons=wanted, limit=10)
        expected = ["m010x@dest.test", "m020x@dest.test"] + ([] if reasons else ["m040x@dest.test"])
        assert [a for a, _ in page] == expected
        assert [e.relay_wide for _, es in page for e in es] == [a == expected[1] for a in expected]
    addresses_sql, rows_sql = page_sql(reasons)
    reason_args = ["MANUAL"] * reasons
    with contextlib.closing(sqlite3.connect(tmp_path / "txmail.db")) as db:
        db.execute("ANALYZE")
        for sql, args in (
            (addresses_sql, ["small", "", *reason_args, 10, "", "", *reason_args, 10, 10]),
            (rows_sql, ["small", "a", "z", *reason_args, "", "a", "z", *reason_args]),
        ):
            plan = [str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            searches = [p for p in plan if p.startswith(("SEARCH", "SCAN suppressions"))]
            assert len(searches) == 2, plan
            assert all("sqlite_autoindex_suppressions_1 (namespace=?" in p for p in searches), plan
