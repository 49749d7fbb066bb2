"""IP warm-up: the relay's WarmupConfig and the DedicatedIP's status.warmup (pure).

The schedule math (day, budget, percentage, done) is the contract's
(:class:`~txmail_relay.contract.WarmupConfig`), so the status says what the relay enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from txmail_relay import contract as c

from ..api.warmup import WarmupSpec, WarmupState
from .naming import Obj

# status.warmup keys this module writes (others' keys are never there).
_KEYS = ("status", "percentage", "day", "days", "startedAt", "budget", "sent", "deferred")


def warmup_config(spec: WarmupSpec | None, started_at: datetime | None) -> c.WarmupConfig:
    """What the relay enforces: the schedule resolved into daily volumes, and its start."""
    if spec is None:
        return c.WarmupConfig()
    return c.WarmupConfig(enabled=True, daily_volumes=spec.volumes(), started_at=started_at)


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def recorded_start(status: Mapping[str, Any] | None, spec: WarmupSpec | None) -> datetime | None:
    """The start in a DedicatedIP status (None when warm-up is off or not started)."""
    if spec is None:
        return None
    return parse_stamp(((status or {}).get("warmup") or {}).get("startedAt"))


def warmup_status(
    spec: WarmupSpec | None,
    previous: Mapping[str, Any] | None,
    ready: bool,
    now: datetime,
    report: c.WarmupStats | None = None,
) -> Obj:
    """``status.warmup``: started the first time the IP is Ready (``startedAt`` is then kept
    as it is), with today's budget and what the relay's ``report`` says it sent today.

    ``previous`` is the current status.warmup; keys it has that the new one has not are set to
    None (a merge patch removes them), so warm-up turned off forgets its start.
    """
    before = dict(previous or {})
    if spec is None:
        shown: Obj = {"status": WarmupState.NOT_APPLICABLE.value}
    else:
        started = parse_stamp(before.get("startedAt"))
        if started is None and ready:
            started = now.replace(microsecond=0)
        config = warmup_config(spec, started)
        day = config.day(now)
        days = len(config.daily_volumes)
        shown = {"days": days}
        if started is not None:
            shown["startedAt"] = stamp(started)
        if config.done(now):
            shown |= {"status": WarmupState.DONE.value, "percentage": 100, "day": day}
        else:
            shown |= {
                "status": WarmupState.IN_PROGRESS.value,
                "percentage": config.percentage(now),
                "day": day,
                "budget": config.budget(day),
            }
        if report is not None and report.day == day:
            shown |= {"sent": report.sent, "deferred": report.deferred}
        elif report is not None:  # the relay has not reported on today yet
            shown |= {"sent": 0, "deferred": report.deferred}
    for key in _KEYS:
        if key in before and key not in shown:
            shown[key] = None
    return shown


def start_recorded(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> bool:
    """Whether ``after`` (a status written) records a warm-up start ``before`` had not: the
    relay's configuration then needs it."""
    old = ((before or {}).get("warmup") or {}).get("startedAt")
    new = (after.get("warmup") or {}).get("startedAt")
    return new is not None and new != old


def with_status(body: Mapping[str, Any], status: Mapping[str, Any]) -> Obj:
    """``body`` as it is after ``status`` was written (for a reconcile that follows)."""
    merged = {**(body.get("status") or {}), **status}
    return {**body, "status": {k: v for k, v in merged.items() if v is not None}}
