"""IP warm-up of a DedicatedIP: spec.warmup and status.warmup (docs/deliverability.md).

A new address has no reputation: mailbox providers throttle or junk a sudden volume from it.
With ``spec.warmup`` the relay sends at most a daily budget of recipients that grows day by
day (the built-in standard table, or the user's own), from the moment the IP is first Ready;
the excess waits in the spool for the next day's budget. After the last day: full volume.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field

from .common import Model, cel

# The standard schedule: recipients per day, day 1 first; afterwards no limit (30 days).
# It opens like the tables ESPs publish for a new dedicated IP (SendGrid's and Mailgun's
# 50, 100, 500, 1,000, 5,000), then grows by at most about half a day's volume per day, as
# Gmail's and Microsoft's sender guidance ask (raise volume gradually; never jump), to one
# million a day on day 30 - a month, between SES's managed warm-up (about 45 days) and the
# two-to-three weeks of the ESP tables that double daily. docs/deliverability.md lists it.
STANDARD_SCHEDULE: tuple[int, ...] = (
    50,
    100,
    500,
    1_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    25_000,
    30_000,
    40_000,
    50_000,
    60_000,
    75_000,
    90_000,
    110_000,
    130_000,
    150_000,
    175_000,
    200_000,
    250_000,
    300_000,
    350_000,
    400_000,
    500_000,
    600_000,
    700_000,
    850_000,
    1_000_000,
)
MAX_DAYS = 90

DailyVolume = Annotated[int, Field(ge=1, le=100_000_000)]


class WarmupSchedule(StrEnum):
    STANDARD = "Standard"
    CUSTOM = "Custom"


class WarmupSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.schedule != 'Custom' || has(self.dailyVolumes)",
                    "warmup.dailyVolumes is required when warmup.schedule is Custom",
                    field=".dailyVolumes",
                ),
                cel(
                    "self.schedule == 'Custom' || !has(self.dailyVolumes)",
                    "warmup.dailyVolumes is only for warmup.schedule Custom",
                    field=".dailyVolumes",
                ),
            ]
        }
    )

    schedule: WarmupSchedule = Field(
        default=WarmupSchedule.STANDARD,
        description="Standard: the built-in 30-day table (50, 100, 500, 1,000, 5,000, ... "
        "1,000,000 recipients a day; docs/deliverability.md lists it). Custom: the "
        "dailyVolumes given here.",
    )
    daily_volumes: list[DailyVolume] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_DAYS,
        description="Custom schedule: recipients the relay may send on day 1, day 2, ... "
        "(at most 90 days); after the last day there is no limit.",
    )

    def volumes(self) -> list[int]:
        """The schedule as recipients per day."""
        if self.schedule is WarmupSchedule.CUSTOM:
            return list(self.daily_volumes or [])
        return list(STANDARD_SCHEDULE)


class WarmupState(StrEnum):
    IN_PROGRESS = "InProgress"
    DONE = "Done"
    NOT_APPLICABLE = "NotApplicable"


class WarmupStatus(Model):
    status: WarmupState = Field(
        description="InProgress while a daily budget applies; Done after the schedule's last "
        "day (full volume); NotApplicable when spec.warmup is not set."
    )
    percentage: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Days of the schedule completed, in percent (100 when Done).",
    )
    day: int | None = Field(
        default=None, ge=1, description="Today's day of the schedule (1 = the first 24 hours)."
    )
    days: int | None = Field(default=None, ge=1, description="Days in the schedule.")
    started_at: datetime | None = Field(
        default=None,
        description="When the IP was first Ready with warm-up set: day 1 starts here. Recorded "
        "once and never moved; removing spec.warmup clears it, so setting it again starts over.",
    )
    budget: int | None = Field(
        default=None, ge=0, description="Recipients today's budget allows (absent when Done)."
    )
    sent: int | None = Field(
        default=None,
        ge=0,
        description="Recipients the relay handed to delivery today (from its stats report).",
    )
    deferred: int | None = Field(
        default=None,
        ge=0,
        description="Recipients the relay holds in its spool for a later day's budget.",
    )
