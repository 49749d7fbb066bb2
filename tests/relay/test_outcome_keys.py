"""Delivery outcomes keyed by attempt (records/events.py ``Events.outcome``): an outcome asked
for again (the redelivery after a crash between the records' write and the spool's DONE) is
not counted or logged twice, a redelivery that ends otherwise still is, and the keys go when
the message is finished. The crash itself: tests/relay/test_outcome_crash.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from txmail_relay.outcomes import Outcome, OutcomeEvent
from txmail_relay.records.model import Kind
from txmail_relay.records.records import DB_NAME, Records
from txmail_relay.records.stats import OutcomeRecorder


def keys(directory: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(directory / DB_NAME) as db:
        return sorted(db.execute("SELECT spool_id, recipient, kind FROM uniques").fetchall())


async def counts(records: Records) -> tuple[int, int, int]:
    """DEFERRED, DELIVERED counters and events of user ``u``."""
    found = (await records.counters.totals()).counts["u"]
    events = await records.events.after(0, limit=100)
    return found.get(Kind.DEFERRED, 0), found.get(Kind.DELIVERED, 0), len(events)


async def test_an_outcome_asked_for_again_is_written_once(tmp_path: Path) -> None:
    records = Records(tmp_path, owner=lambda _: ("apps", "t"))
    await records.open()
    try:
        outcome = records.events.outcome
        await outcome("m1", "u", "a@x.test", Outcome.DEFERRED, 1.0, attempt=1)
        await outcome("m1", "u", "a@x.test", Outcome.DEFERRED, 1.5, attempt=1)  # again
        assert await counts(records) == (1, 0, 1)
        # The same attempt number ended otherwise (delivered on the redelivery): it counts.
        await outcome("m1", "u", "a@x.test", Outcome.DELIVERED, 2.0, attempt=1)
        assert await counts(records) == (1, 1, 2)
        # After the final outcome, nothing more for that recipient (a redelivery again).
        await outcome("m1", "u", "a@x.test", Outcome.DELIVERED, 3.0, attempt=1)
        await outcome("m1", "u", "a@x.test", Outcome.DEFERRED, 3.0, attempt=2)
        await outcome("m1", "u", "a@x.test", Outcome.DELIVERED, 3.0, attempt=2)
        assert await counts(records) == (1, 1, 2)
        # Without an attempt (a caller that does not key its writes): written every time.
        await outcome("m1", "u", "b@x.test", Outcome.DEFERRED, 4.0)
        await outcome("m1", "u", "b@x.test", Outcome.DEFERRED, 4.0)
        assert await counts(records) == (3, 1, 4)
        await outcome("m2", "u", "c@x.test", Outcome.DELIVERED, 5.0, attempt=1)
        with sqlite3.connect(tmp_path / DB_NAME) as db:  # a unique open: not an attempt key
            db.execute("INSERT INTO uniques VALUES ('m1', 'a@x.test', 'unique_opened')")
        await records.events.forget_outcomes(["m1"])
        assert keys(tmp_path) == [
            ("m1", "a@x.test", "unique_opened"),
            ("m2", "c@x.test", "outcome:final"),
        ]
    finally:
        await records.close()


def event(spool_id: str, outcome: Outcome, attempts: int = 1) -> OutcomeEvent:
    return OutcomeEvent(spool_id, "u", "a@x.test", outcome, "250 ok", attempts, 0.0, 1.0)


async def test_the_recorder_writes_an_attempt_now_and_forgets_finished_messages(
    tmp_path: Path,
) -> None:
    records = Records(tmp_path, owner=lambda _: ("apps", "t"))
    await records.open()
    try:
        recorder = OutcomeRecorder(records)
        written = [event("m1", Outcome.DEFERRED), event("m2", Outcome.DELIVERED)]
        assert await recorder.record(written) == []  # all written, nothing for later
        assert await counts(records) == (1, 1, 2)
        assert await recorder.record([event("m2", Outcome.DELIVERED)]) == []  # asked again
        assert await counts(records) == (1, 1, 2)
        recorder.finished("m2")  # its keys go with the next attempt's write
        assert len(keys(tmp_path)) == 2
        assert await recorder.record([event("m1", Outcome.DELIVERED, 2)]) == []
        assert await counts(records) == (1, 2, 3)
        assert keys(tmp_path) == [
            ("m1", "a@x.test", "outcome:1"),
            ("m1", "a@x.test", "outcome:final"),
        ]
    finally:
        await records.close()
