"""The relay's warm-up gate on real records (SQLite in a temporary folder), an injected clock.

What the queue relies on: each recipient is counted once however often it comes back without
an attempt (a destination paused by shaping sends it through again), held recipients go out
oldest first, and the day's count is read back after a restart.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from txmail_relay.contract import WARMUP_DAY_SECONDS, WarmupConfig
from txmail_relay.delivery.warmup import WarmupGate
from txmail_relay.records.records import DB_NAME, Records
from txmail_relay.spool.segments import SpooledMessage

START = 1_800_000_000.0


def _message(n: int, recipients: int = 1) -> SpooledMessage:
    return SpooledMessage(
        id=f"m{n}",
        mail_from="app@example.com",
        recipients=tuple(f"r{n}-{i}@dest.test" for i in range(recipients)),
        username="app1",
        received_at=START,
        body_length=10,
    )


class Gate:
    """The gate as the queue uses it; ``now`` is its clock and the queue's (lifetimes)."""

    def __init__(self, records: Records, volumes: list[int], *, started: bool = True) -> None:
        self.now = START + 60
        self.config = WarmupConfig(
            enabled=True,
            daily_volumes=volumes,
            started_at=datetime.fromtimestamp(START, UTC) if started else None,
        )
        self.released: list[tuple[str, tuple[int, ...]]] = []
        self.gate = WarmupGate(lambda: self.config, records.warmup, clock=lambda: self.now)
        self.gate.bind(
            lambda msg, indices: self.released.append((msg.id, indices)), lambda: self.now
        )


async def test_a_recipient_back_without_an_attempt_is_counted_once(tmp_path: Path) -> None:
    records = Records(tmp_path)
    await records.open()
    try:
        g = Gate(records, [2, 5])
        first, second = _message(1), _message(2)
        assert g.gate.admit(first, [0], 0) == (0,)
        assert g.gate.admit(first, [0], 0) == (0,)  # a paused destination sends it through again
        assert g.gate.admit(second, [0], 0) == (0,)  # room for it: counted once above
        snapshot = g.gate.snapshot()
        assert snapshot is not None and (snapshot.sent, snapshot.deferred) == (2, 0)
    finally:
        await records.close()


async def test_held_recipients_go_oldest_first_and_the_count_survives_a_restart(
    tmp_path: Path,
) -> None:
    records = Records(tmp_path)
    await records.open()
    g = Gate(records, [1, 2])
    messages = [_message(n) for n in range(4)]
    assert g.gate.admit(messages[0], [0], 0) == (0,)
    for msg in messages[1:]:
        assert g.gate.admit(msg, [0], 0) == ()  # held
    assert g.gate.held("m1") and g.gate.held("m3")
    assert g.gate.next_day() == datetime.fromtimestamp(START + WARMUP_DAY_SECONDS, UTC)
    g.now += WARMUP_DAY_SECONDS
    g.gate.tick()
    assert g.released == [("m1", (0,)), ("m2", (0,))]
    assert not g.gate.held("m1") and g.gate.held("m3")
    await records.close()

    records = Records(tmp_path)  # the relay again, the same day
    await records.open()
    try:
        again = Gate(records, [1, 2])
        again.now = g.now
        await again.gate.load()
        assert again.gate.admit(_message(9), [0], 0) == ()  # day 2's two are used
        snapshot = again.gate.snapshot()
        assert snapshot is not None and (snapshot.day, snapshot.sent) == (2, 2)
    finally:
        await records.close()


MAX_LIFETIME = 5 * 24 * 3600.0  # the relay's default retry.maxLifetime


async def test_a_message_held_past_its_lifetime_starts_it_when_released_after_a_restart(
    tmp_path: Path,
) -> None:
    """Held longer than maxLifetime, across a restart: its lifetime starts when it goes out,
    both when the restarted relay lets it out and when it was let out before the restart."""
    records = Records(tmp_path)
    await records.open()
    g = Gate(records, [1] * 10)
    first, second, third = _message(1), _message(2), _message(3)
    assert g.gate.admit(first, [0], 0) == (0,)
    assert g.gate.admit(second, [0], 0) == ()
    assert g.gate.admit(third, [0], 0) == ()
    g.now += 6 * WARMUP_DAY_SECONDS  # past maxLifetime, and day 7: room for one
    g.gate.tick()
    assert g.released == [("m2", (0,))]
    assert g.gate.lifetime_start(second) == g.now
    released = g.now
    await records.close()

    records = Records(tmp_path)
    await records.open()
    try:
        again = Gate(records, [1] * 10)
        again.now = released + WARMUP_DAY_SECONDS  # day 8
        await again.gate.load(["m2", "m3"])
        # Recovered: m2 (retrying) keeps its release time; m3 (held) goes now, its lifetime
        # starting now.
        assert again.gate.admit(second, [0], 0) == (0,)
        assert again.gate.lifetime_start(second) == released
        assert again.gate.admit(third, [0], 0) == (0,)
        assert again.gate.lifetime_start(third) == again.now
        assert again.now - again.gate.lifetime_start(third) < MAX_LIFETIME
        assert again.gate.lifetime_start(first) == first.received_at  # never held
    finally:
        await records.close()


async def test_a_restart_does_not_count_admitted_unfinished_mail_again(tmp_path: Path) -> None:
    records = Records(tmp_path)
    await records.open()
    g = Gate(records, [2, 2])
    retrying = _message(1)
    assert g.gate.admit(retrying, [0], 0) == (0,)  # admitted; a 4xx keeps it queued
    await records.close()

    records = Records(tmp_path)
    await records.open()
    try:
        again = Gate(records, [2, 2])
        await again.gate.load(["m1"])
        assert again.gate.admit(retrying, [0], 0) == (0,)  # recovered with no attempts
        snapshot = again.gate.snapshot()
        assert snapshot is not None and snapshot.sent == 1
        assert again.gate.admit(_message(2), [0], 0) == (0,)  # the day's second: not held
        again.gate.finished(retrying)
    finally:
        await records.close()
    records = Records(tmp_path)  # a finished message is forgotten
    await records.open()
    try:
        assert set(await records.warmup.messages()) == {"m2"}
    finally:
        await records.close()


async def test_without_a_start_the_relay_counts_days_from_its_own(tmp_path: Path) -> None:
    """Before the operator records startedAt, day 1 starts when the relay first runs with
    warm-up on; it survives a restart, so held mail goes out on the next day's budget."""
    records = Records(tmp_path)
    await records.open()
    g = Gate(records, [1, 2], started=False)
    assert g.gate.admit(_message(1), [0], 0) == (0,)
    assert g.gate.admit(_message(2), [0], 0) == ()
    first_day = g.now
    assert g.gate.next_day() == datetime.fromtimestamp(first_day + WARMUP_DAY_SECONDS, UTC)
    await records.close()

    records = Records(tmp_path)
    await records.open()
    try:
        again = Gate(records, [1, 2], started=False)
        again.now = first_day + WARMUP_DAY_SECONDS + 1
        await again.gate.load(["m2"])
        assert again.gate.admit(_message(2), [0], 0) == (0,)  # day 2: room for it
        snapshot = again.gate.snapshot()
        assert snapshot is not None and (snapshot.day, snapshot.sent) == (2, 1)
        # The operator's start replaces the relay's own.
        again.config = again.config.model_copy(
            update={"started_at": datetime.fromtimestamp(again.now, UTC)}
        )
        snapshot = again.gate.snapshot()
        assert snapshot is not None and (snapshot.day, snapshot.budget) == (1, 1)
    finally:
        await records.close()


async def test_unreadable_records_start_the_gate_with_the_day_taken_as_full(
    tmp_path: Path,
) -> None:
    """Odd rows in every warm-up table (written by hand): load() does not raise (the relay
    starts); without its own start the relay starts a new day 1, without today's count the
    day is full, so new mail waits for the next day instead of going at full volume."""
    records = Records(tmp_path)
    await records.open()
    g = Gate(records, [2, 3], started=False)
    assert g.gate.admit(_message(1), [0], 0) == (0,)
    await records.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.execute("UPDATE warmup SET sent = 'lots'")
        db.execute("UPDATE warmup_clock SET started_at = 'soon'")
        db.execute("INSERT INTO warmup_messages VALUES ('m9', 'x', 0, NULL)")

    records = Records(tmp_path)
    await records.open()
    try:
        again = Gate(records, [2, 3], started=False)
        again.now += 3600
        await again.gate.load(["m1", "m9"])
        snapshot = again.gate.snapshot()
        assert snapshot is not None and (snapshot.day, snapshot.sent) == (1, 2)
        assert again.gate.admit(_message(2), [0], 0) == ()  # held: the day is full
        again.now += WARMUP_DAY_SECONDS
        again.gate.tick()
        assert again.released == [("m2", (0,))]  # day 2's budget
    finally:
        await records.close()
