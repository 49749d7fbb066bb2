"""IP warm-up end to end: the real relay in a thread, smtp-sink upstream, an injected clock.

A burst over the day's budget delivers the budget and holds the rest in the spool (the send
status says so); moving the clock to the next day delivers the held mail up to that day's
budget; a restart in between loses nothing, sends nothing twice and keeps the day's count.
The clock is the relay's ``clock`` constructor argument: the tests move it a day, never sleep.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from peers import Sink
from relay.relaykit import (
    RelayEnv,
    RelayThread,
    bearer,
    http,
    message,
    template_doc,
    wait_for,
)
from txmail_relay.contract import WARMUP_DAY_SECONDS
from txmail_relay.http.api import SEND_PATH
from txmail_relay.records.records import DB_NAME

DAY = WARMUP_DAY_SECONDS
ORDER = 101


class Clock:
    """A wall clock the test moves (the relay reads it from its own thread)."""

    def __init__(self, start: float) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _warmup(volumes: list[int], started: float) -> dict[str, Any]:
    return {"enabled": True, "dailyVolumes": volumes, "startedAt": _iso(started)}


def _start(env: RelayEnv, clock: Clock, warmup: dict[str, Any] | None, **extra: Any) -> RelayThread:
    overrides: dict[str, Any] = {"templates": [template_doc(ORDER)], **extra}
    if warmup is not None:
        overrides["relay"] = {"warmup": warmup}
    settings = env.settings(overrides=overrides)
    return env.start(settings, clock=clock, warmup_check_interval=0.05)


def _submit(env: RelayEnv, relay: RelayThread, seqs: range) -> None:
    with env.client(relay) as smtp:
        for seq in seqs:
            smtp.sendmail("app@example.com", [f"user{seq}@dest.test"], message(seq))


def _seqs(env: RelayEnv) -> list[int]:
    """The test message numbers smtp-sink received, in any order (duplicates kept)."""
    found = []
    for captured in env.sink.messages():
        match = re.search(r"END-OF-MESSAGE (\S+)", captured.content)
        assert match is not None
        found.append(int(match.group(1)) if match.group(1).isdigit() else -1)
    return sorted(found)


def _delivered(env: RelayEnv, count: int) -> list[int]:
    env.sink.wait(count)
    return _seqs(env)


def _settled(relay: RelayThread, *, sent: float, deferred: float) -> bool:
    return (
        relay.metric("txmail_relay_warmup_sent_today") == sent
        and relay.metric("txmail_relay_warmup_deferred") == deferred
    )


def _status(relay: RelayThread, status_id: str, env: RelayEnv) -> dict[str, Any]:
    reply = http(
        relay.api_port,
        "GET",
        f"/marketing/v3/email/send-statuses/{status_id}",
        headers=bearer(env.password),
    )
    assert reply.status == 200, reply.body
    doc: dict[str, Any] = reply.json()
    return doc


def test_a_burst_over_the_budget_is_held_then_delivered_on_the_next_days(env: RelayEnv) -> None:
    started = time.time()
    clock = Clock(started + 60)  # day 1
    stats_file = env.directory / "stats.json"
    relay = _start(
        env,
        clock,
        _warmup([3, 2, 1000], started),
        statsFile=str(stats_file),
        statsInterval=0.1,
    )
    assert relay.metric("txmail_relay_warmup_budget") == 3

    _submit(env, relay, range(1, 8))  # 7 messages, one recipient each: 3 go today
    reply = http(
        relay.api_port,
        "POST",
        SEND_PATH,
        body={
            "emailId": ORDER,
            "message": {"to": "api@dest.test"},
            "contactProperties": {"firstname": "Ada"},
            "customProperties": {"order_id": "42"},
        },
        headers=bearer(env.password),
    )
    assert reply.status == 200, reply.body  # never refused: accepted and held
    send = reply.json()
    assert send["status"] == "PROCESSING" and send["sendResult"] == "QUEUED"

    assert _delivered(env, 3) == [1, 2, 3]  # arrival order
    wait_for(lambda: _settled(relay, sent=3, deferred=5), what="5 recipients held")
    assert len(env.sink.messages()) == 3
    assert relay.relay is not None and relay.call(relay.relay.queue.depth) == 5  # still spooled
    held = _status(relay, send["statusId"], env)
    next_day = datetime.fromtimestamp(started + DAY, UTC)
    assert held["status"] == "PROCESSING" and held["sendResult"] == "QUEUED"
    assert held["deferred"]["reason"] == "WARMUP"
    assert datetime.fromisoformat(held["deferred"]["notBefore"]) == next_day.replace(
        microsecond=next_day.microsecond // 1000 * 1000
    )
    report = wait_for(
        lambda: (
            (
                (doc := json.loads(stats_file.read_text())).get("warmup", {}).get("deferred") == 5
                and doc
            )
            if stats_file.exists()
            else None
        ),
        what="the stats report's warm-up figures",
    )
    assert report["warmup"] == {"day": 1, "budget": 3, "sent": 3, "deferred": 5}

    clock.advance(DAY)  # day 2: a budget of 2, oldest first
    assert _delivered(env, 5) == [1, 2, 3, 4, 5]
    wait_for(lambda: _settled(relay, sent=2, deferred=3), what="day 2's budget used")
    assert len(env.sink.messages()) == 5
    assert relay.metric("txmail_relay_warmup_budget") == 2

    clock.advance(DAY)  # day 3: room for the rest
    assert _delivered(env, 8)[:7] == [1, 2, 3, 4, 5, 6, 7]
    final = wait_for(
        lambda: (s := _status(relay, send["statusId"], env))["status"] == "COMPLETE" and s,
        what="the API send COMPLETE",
    )
    assert final["sendResult"] == "SENT" and "deferred" not in final
    wait_for(lambda: _settled(relay, sent=3, deferred=0), what="day 3's count")
    # Nothing bounced or expired while held: holding is not a failed attempt.
    for outcome in ("deferred", "bounced", "expired"):
        assert (
            relay.metric(
                "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": outcome}
            )
            == 0
        )


def test_a_restart_keeps_the_held_mail_and_the_days_count(env: RelayEnv) -> None:
    started = time.time()
    clock = Clock(started + 3600)
    warmup = _warmup([3, 4], started)
    relay = _start(env, clock, warmup)
    _submit(env, relay, range(1, 7))
    assert _delivered(env, 3) == [1, 2, 3]
    wait_for(lambda: _settled(relay, sent=3, deferred=3), what="3 recipients held")
    relay.stop()

    relay = _start(env, clock, warmup)  # the same spool and records, still day 1
    wait_for(lambda: _settled(relay, sent=3, deferred=3), what="the held mail recovered")
    assert relay.metric("txmail_relay_warmup_budget") == 3
    _submit(env, relay, range(7, 8))  # today's budget is still used up
    wait_for(lambda: _settled(relay, sent=3, deferred=4), what="the new mail held too")
    assert _seqs(env) == [1, 2, 3]

    clock.advance(DAY)  # day 2: 4 more, each once
    assert _delivered(env, 7) == [1, 2, 3, 4, 5, 6, 7]
    wait_for(lambda: _settled(relay, sent=4, deferred=0), what="day 2's count")
    relay.stop()

    relay = _start(env, clock, warmup)  # day 2's count survives too
    wait_for(lambda: _settled(relay, sent=4, deferred=0), what="day 2's count after a restart")
    _submit(env, relay, range(8, 9))
    wait_for(lambda: _settled(relay, sent=4, deferred=1), what="over day 2's budget")
    assert _seqs(env) == [1, 2, 3, 4, 5, 6, 7]


def test_after_the_last_day_and_when_off_there_is_no_limit(env: RelayEnv) -> None:
    started = time.time()
    clock = Clock(started + 2 * DAY + 5)  # day 3 of a two-day schedule: done
    relay = _start(env, clock, _warmup([1, 2], started))
    _submit(env, relay, range(1, 6))
    assert _delivered(env, 5) == [1, 2, 3, 4, 5]
    assert relay.metric("txmail_relay_warmup_budget") == -1
    assert relay.metric("txmail_relay_warmup_deferred") == 0
    relay.stop()
    for path in env.sink.directory.glob("dump/*"):
        path.unlink()

    relay = _start(env, clock, None)  # off (the default)
    _submit(env, relay, range(1, 6))
    assert _delivered(env, 5) == [1, 2, 3, 4, 5]
    assert relay.metric("txmail_relay_warmup_budget") == -1


def test_turning_warm_up_off_releases_the_held_mail(env: RelayEnv, tmp_path: Path) -> None:
    started = time.time()
    clock = Clock(started + 60)
    relay = _start(env, clock, _warmup([2, 2], started))
    _submit(env, relay, range(1, 6))
    assert _delivered(env, 2) == [1, 2]
    wait_for(lambda: _settled(relay, sent=2, deferred=3), what="3 recipients held")
    settings = env.directory / "relay.yaml"
    settings.write_text(settings.read_text().replace("enabled: true", "enabled: false"))
    assert _delivered(env, 5) == [1, 2, 3, 4, 5]
    wait_for(lambda: relay.metric("txmail_relay_warmup_deferred") == 0, what="none held")


def test_a_message_over_the_budget_goes_out_in_parts_to_every_recipient(env: RelayEnv) -> None:
    started = time.time()
    clock = Clock(started + 60)
    relay = _start(env, clock, _warmup([3, 3], started))
    recipients = [f"user{n}@dest.test" for n in range(5)]
    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", recipients, message(1))
    [first] = env.sink.wait(1)
    wait_for(lambda: _settled(relay, sent=3, deferred=2), what="2 recipients held")
    clock.advance(DAY)
    both = env.sink.wait(2)
    rcpts = sorted(r for captured in both for r in captured.rcpts)
    assert rcpts == sorted(f"<{r}>" for r in recipients)  # each once
    assert sorted(len(captured.rcpts) for captured in both) == [2, 3]
    assert len(first.rcpts) == 3
    wait_for(lambda: _settled(relay, sent=2, deferred=0), what="day 2's count")


def test_a_start_without_an_offset_is_utc_and_delivery_goes_on(env: RelayEnv) -> None:
    """A hand-written ``startedAt`` without a time zone offset is read as UTC: mail is still
    accepted (250), delivered within the budget and held past it."""
    started = time.time()
    clock = Clock(started + 60)
    naive = datetime.fromtimestamp(started, UTC).replace(tzinfo=None).isoformat()
    relay = _start(env, clock, {"enabled": True, "dailyVolumes": [2, 5], "startedAt": naive})
    _submit(env, relay, range(1, 4))  # 250 for each (a dead spool writer never answers)
    assert _delivered(env, 2) == [1, 2]
    wait_for(lambda: _settled(relay, sent=2, deferred=1), what="1 recipient held")
    clock.advance(DAY)
    assert _delivered(env, 3) == [1, 2, 3]


def test_unreadable_warm_up_records_neither_stop_the_relay_nor_lift_the_budget(
    env: RelayEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Today's count and a message's counted recipients are odd in the records database
    (written by hand): the relay still starts, logs it once, and takes the day as full (new
    mail is held, not sent at full volume for want of a count) until the next day."""
    started = time.time()
    clock = Clock(started + 60)
    warmup = _warmup([3, 5], started)
    relay = _start(env, clock, warmup)
    _submit(env, relay, range(1, 2))
    assert _delivered(env, 1) == [1]
    wait_for(lambda: _settled(relay, sent=1, deferred=0), what="1 counted")
    relay.stop()
    with contextlib.closing(sqlite3.connect(env.directory / "spool" / DB_NAME)) as db, db:
        db.execute("UPDATE warmup SET sent = 'lots'")
        db.execute("INSERT INTO warmup_messages VALUES ('odd', 'x,y', 0, NULL)")

    relay = _start(env, clock, warmup)  # started: _start waits for its listeners
    wait_for(lambda: _settled(relay, sent=3, deferred=0), what="the day taken as full")
    _submit(env, relay, range(2, 3))  # answered 250, held
    wait_for(lambda: _settled(relay, sent=3, deferred=1), what="new mail held")
    logged = [r for r in caplog.records if "warm-up records unreadable" in r.getMessage()]
    assert len(logged) == 1
    assert "today's count" in logged[0].getMessage()
    clock.advance(DAY)  # day 2: a count of its own
    assert _delivered(env, 2) == [1, 2]
    wait_for(lambda: _settled(relay, sent=1, deferred=0), what="day 2's count")


def test_a_failing_gate_does_not_stop_acceptance_or_delivery(env: RelayEnv) -> None:
    """A bug in the warm-up gate (injected: its configuration read raises) must not kill
    the spool writer nor hold mail: every message still gets its 250 and is delivered."""
    started = time.time()
    clock = Clock(started + 60)
    relay = _start(env, clock, _warmup([1, 5], started))
    assert relay.relay is not None
    gate = relay.relay.warmup

    def broken() -> None:
        raise RuntimeError("warm-up gate bug")

    relay.call(lambda: setattr(gate, "_config", broken))
    _submit(env, relay, range(1, 4))  # each answered 250 (smtplib raises otherwise)
    assert _delivered(env, 3) == [1, 2, 3]
    _submit(env, relay, range(4, 5))  # and the writer is still alive
    assert _delivered(env, 4) == [1, 2, 3, 4]


def test_a_restart_does_not_count_retrying_mail_against_the_day_again(
    env: RelayEnv, sink_factory: Callable[..., Sink]
) -> None:
    """Mail admitted and retrying (4xx) when the relay restarts is not counted again: the
    day's count stays, and new mail still has the room the day had left."""
    started = time.time()
    clock = Clock(started + 60)
    warmup = _warmup([2, 5], started)
    deferring = sink_factory("-r", "RCPT")  # 4xx to every RCPT
    upstream = {"smarthost": {"port": deferring.port}}
    relay = _start(env, clock, None, relay={"warmup": warmup, "delivery": upstream})
    _submit(env, relay, range(1, 2))
    wait_for(
        lambda: (
            relay.metric(
                "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": "deferred"}
            )
            == 1
        ),
        what="the first attempt deferred",
    )
    assert _settled(relay, sent=1, deferred=0)
    relay.stop()

    relay = _start(env, clock, warmup)  # the working upstream; the same day
    assert _delivered(env, 1) == [1]
    wait_for(lambda: _settled(relay, sent=1, deferred=0), what="the count unchanged")
    _submit(env, relay, range(2, 3))  # the day's second: room for it
    assert _delivered(env, 2) == [1, 2]
    wait_for(lambda: _settled(relay, sent=2, deferred=0), what="counted once each")
