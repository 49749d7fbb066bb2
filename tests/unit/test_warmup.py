"""IP warm-up: the schedule math both sides share, the standard table, status.warmup."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from pydantic import ValidationError

from txmail_operator import builders
from txmail_operator.api import DedicatedIPSpec
from txmail_operator.api.warmup import STANDARD_SCHEDULE, WarmupSpec
from txmail_operator.builders.warmup import (
    recorded_start,
    start_recorded,
    warmup_config,
    warmup_status,
    with_status,
)
from txmail_operator.reconcile.warmup import known_warmup, remember_start
from txmail_relay import contract as c

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def schedule(*volumes: int, started: dt.datetime | None = START) -> c.WarmupConfig:
    return c.WarmupConfig(enabled=True, daily_volumes=list(volumes), started_at=started)


def test_days_are_24_hour_periods_from_the_start() -> None:
    warm = schedule(10, 20, 30)
    assert warm.day(START) == 1
    assert warm.day(START + DAY - dt.timedelta(seconds=1)) == 1
    assert warm.day(START + DAY) == 2
    assert warm.day(START + 2 * DAY + dt.timedelta(hours=23)) == 3
    assert warm.day(START - dt.timedelta(hours=1)) == 1  # a clock behind the start: day 1
    assert warm.day_start(2) == START + DAY


def test_the_budget_grows_by_day_and_ends_after_the_last_day() -> None:
    warm = schedule(10, 20, 30)
    assert [warm.budget(d) for d in (1, 2, 3, 4, 40)] == [10, 20, 30, None, None]
    assert not warm.done(START + 2 * DAY)
    assert warm.done(START + 3 * DAY)
    assert [warm.percentage(START + n * DAY) for n in (0, 1, 2, 3, 9)] == [0, 33, 66, 100, 100]


def test_before_the_start_is_known_day_1_applies() -> None:
    warm = schedule(10, 20, started=None)
    assert warm.day(START + 5 * DAY) == 1 and warm.budget(1) == 10
    assert not warm.done(START + 5 * DAY) and warm.percentage(START) == 0
    assert warm.day_start(2) is None


def test_off_has_no_budget() -> None:
    off = c.WarmupConfig()
    assert not off.active and off.budget(1) is None and not off.done(START)
    assert c.WarmupConfig(enabled=True).budget(1) is None  # no volumes: nothing to enforce


def test_the_standard_schedule_opens_gently_and_never_shrinks() -> None:
    assert STANDARD_SCHEDULE[:5] == (50, 100, 500, 1_000, 5_000)
    assert 30 <= len(STANDARD_SCHEDULE) <= 45
    assert list(STANDARD_SCHEDULE) == sorted(STANDARD_SCHEDULE)
    # After the opening days, no day more than doubles the one before it.
    assert all(b <= 2 * a for a, b in itertools.pairwise(STANDARD_SCHEDULE[4:]))
    assert WarmupSpec().volumes() == list(STANDARD_SCHEDULE)


def test_custom_volumes_are_the_users() -> None:
    spec = WarmupSpec.model_validate({"schedule": "Custom", "dailyVolumes": [5, 50, 500]})
    config = warmup_config(spec, START)
    assert config.daily_volumes == [5, 50, 500] and config.started_at == START
    assert config.enabled
    assert warmup_config(None, START) == c.WarmupConfig()


@pytest.mark.parametrize(
    "doc",
    [
        {"schedule": "Custom", "dailyVolumes": []},
        {"schedule": "Custom", "dailyVolumes": [0]},
        {"schedule": "Custom", "dailyVolumes": [1] * 91},
        {"schedule": "Weekly"},
        {"schedule": "Standard", "extra": 1},
    ],
)
def test_invalid_specs_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WarmupSpec.model_validate(doc)


def test_the_relay_config_carries_the_schedule_and_its_start() -> None:
    spec = DedicatedIPSpec.model_validate(
        {
            "address": "192.0.2.10",
            "hostname": "mail.example.com",
            "domains": ["example.com"],
            "warmup": {"schedule": "Custom", "dailyVolumes": [3, 6]},
        }
    )
    config = builders.relay_config("demo", spec, warmup_started=START)
    assert config.warmup == schedule(3, 6)
    document = c.RelayConfig.model_validate_json(config.to_json())  # as the relay reads it
    assert document.warmup.started_at == START
    without = builders.relay_config("demo", spec.model_copy(update={"warmup": None}))
    assert not without.warmup.enabled


def test_status_starts_when_first_ready_and_the_start_never_moves() -> None:
    spec = WarmupSpec.model_validate({"schedule": "Custom", "dailyVolumes": [10, 20]})
    pending = warmup_status(spec, None, False, START)
    assert pending == {"status": "InProgress", "percentage": 0, "day": 1, "days": 2, "budget": 10}
    started = warmup_status(spec, pending, True, START)
    assert started["startedAt"] == "2026-03-01T12:00:00Z"
    later = warmup_status(spec, started, True, START + DAY + dt.timedelta(hours=1))
    assert later["startedAt"] == started["startedAt"]  # not moved
    assert (later["day"], later["budget"], later["percentage"]) == (2, 20, 50)
    not_ready = warmup_status(spec, later, False, START + DAY)
    assert not_ready["startedAt"] == started["startedAt"]  # Ready lost: still started
    done = warmup_status(spec, later, True, START + 2 * DAY)
    assert done["status"] == "Done" and done["percentage"] == 100
    assert done["budget"] is None  # removed from the status by the merge patch


def test_status_copies_todays_figures_from_the_relays_report() -> None:
    spec = WarmupSpec.model_validate({"schedule": "Custom", "dailyVolumes": [10, 20]})
    started = warmup_status(spec, None, True, START)
    today = c.WarmupStats(day=1, budget=10, sent=10, deferred=4)
    shown = warmup_status(spec, started, True, START + dt.timedelta(hours=2), today)
    assert (shown["sent"], shown["deferred"]) == (10, 4)
    # The relay has not reported on day 2 yet: nothing sent today, what it holds stays.
    next_day = warmup_status(spec, shown, True, START + DAY, today)
    assert (next_day["day"], next_day["sent"], next_day["deferred"]) == (2, 0, 4)


def test_turning_warm_up_off_forgets_the_start() -> None:
    spec = WarmupSpec()
    started = warmup_status(spec, None, True, START)
    off = warmup_status(None, started, True, START + DAY)
    assert off["status"] == "NotApplicable"
    assert off["startedAt"] is None and off["budget"] is None  # removed by the merge patch
    assert warmup_status(None, {"status": "NotApplicable"}, True, START) == {
        "status": "NotApplicable"
    }


def test_a_recorded_start_is_noticed_once() -> None:
    spec = WarmupSpec()
    before: dict[str, Any] = {"conditions": []}
    status = {"warmup": warmup_status(spec, None, True, START)}
    assert start_recorded(before, status)
    body = with_status({"metadata": {"name": "demo"}, "status": before}, status)
    assert recorded_start(body["status"], spec) == START
    assert not start_recorded(body["status"], status)
    assert recorded_start(body["status"], None) is None


def test_a_stale_body_never_records_a_second_start() -> None:
    """kopf's index can lag the operator's own status write: a body without the start it
    just wrote, with the IP still Ready, keeps the recorded start (reconcile/warmup.py)."""
    spec = DedicatedIPSpec.model_validate(
        {"address": "203.0.113.9", "hostname": "m.example.com", "domains": ["example.com"]}
        | {"warmup": {"schedule": "Standard"}}
    )
    body: dict[str, Any] = {"metadata": {"name": "ip", "uid": "u1"}, "status": {}}
    starts: dict[str, str] = {}
    first = warmup_status(spec.warmup, known_warmup(starts, body, spec), True, START)
    remember_start(starts, body, first)
    later = START + dt.timedelta(minutes=3)
    again = warmup_status(spec.warmup, known_warmup(starts, body, spec), True, later)  # stale
    assert again["startedAt"] == first["startedAt"] == "2026-03-01T12:00:00Z"
    off = spec.model_copy(update={"warmup": None})
    known_warmup(starts, body, off)  # turned off: forgotten
    assert (
        warmup_status(spec.warmup, known_warmup(starts, body, spec), False, later).get("startedAt")
        is None
    )
