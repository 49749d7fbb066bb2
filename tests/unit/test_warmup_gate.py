"""The relay's warm-up gate on real records (SQLite in a temporary folder), an injected clock.

What the queue relies on: each recipient is counted once however often it comes back without
an attempt (a destination paused by shaping sends it through again), held recipients go out
oldest first, and the day's count is read back after a restart.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from txmail_relay.contract import WARMUP_DAY_SECONDS, WarmupConfig
from txmail_relay.delivery.warmup import WarmupGate
from txmail_relay.records.records import Records
from txmail_relay.spool.segments import SpooledMessage

START = 1_800_000_000.0


def _message(n: int, recipients: int = 1) -> SpooledMessage:
    return SpooledMessage(
        id=f"m{n}",
        mail_from="app@example.com",
        recipients=tuple(f"r{n}-{i}@dest.test" for i in range(recipients)),
        username="app1",
        received_at=time.time(),
        body_length=10,
    )


class Gate:
    def __init__(self, records: Records, volumes: list[int]) -> None:
        self.now = START + 60
        self.config = WarmupConfig(
            enabled=True,
            daily_volumes=volumes,
            started_at=datetime.fromtimestamp(START, UTC),
        )
        self.released: list[tuple[str, tuple[int, ...]]] = []
        self.gate = WarmupGate(lambda: self.config, records.warmup, clock=lambda: self.now)
        self.gate.bind(lambda msg, indices: self.released.append((msg.id, indices)), time.time)


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
