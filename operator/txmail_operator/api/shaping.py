"""Per-destination shaping of a DedicatedIP: spec.shaping and status.destinations
(docs/deliverability.md "Per-destination shaping").

The relay rolls recipient domains up into destinations by their MX hosts (``*.google.com``
is ``gmail``) and keeps each destination within its limits: connections open at once,
messages per connection, a message rate. It ships defaults for the big mailbox providers;
``spec.shaping`` overrides them, adds destinations of the user's own, and sets when a
destination that answers 421 or only 4xx is paused. Carried to the relay as
``RelayConfig.shaping``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from txmail_relay.contract import SHAPING_RATE

from .common import Model

SITE_NAME = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"
MxPattern = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9*?.-]+$")]


class ShapingLimits(Model):
    connections: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Connections the relay keeps open to the destination at once, idle ones "
        "included (never more than the relay's share of workers per destination, a quarter "
        "of its concurrency by default). Unset keeps the built-in value.",
    )
    messages_per_connection: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        alias="messagesPerConnection",
        description="Messages one connection carries before the relay closes it and opens "
        "another. Unset keeps the built-in value (the relay's outbound.messagesPerConnection, "
        "100, where there is none).",
    )
    rate: str | None = Field(
        default=None,
        max_length=32,
        pattern=SHAPING_RATE,
        description="Messages per second, minute or hour to the destination, e.g. '10/s', "
        "'300/min', '5000/h'; more than zero. Unset keeps the built-in value (none for "
        "destinations without a built-in one).",
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Messages that may go at once after a quiet spell before the rate spreads "
        "them (a token bucket's size). Unset keeps the built-in value (1 where there is none).",
    )


class ShapingSite(ShapingLimits):
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=SITE_NAME,
        description="The destination's name: a built-in one (gmail, outlook, office365, "
        "yahoo, icloud, comcast, orange) to override its limits, 'smarthost' for the smarthost "
        "in Smarthost mode, or a new one (then mx is required to match anything). Shown in "
        "metrics and status.destinations.",
    )
    mx: list[MxPattern] | None = Field(
        default=None,
        max_length=32,
        description="MX host patterns whose domains make up this destination, e.g. "
        "['*.mx.example.net'] ('*' matches any characters, dots included). Omitted keeps a "
        "built-in destination's patterns. The user's destinations are matched before the "
        "built-in ones.",
    )


class ShapingPause(Model):
    after_failures: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        alias="afterFailures",
        description="Answered attempts in a row to a destination that got only 4xx replies "
        "before it is paused (a 421 to a new connection pauses at once; a connection that "
        "fails, refused or timed out, is no answer and does not count). Default 5.",
    )
    initial_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        alias="initialSeconds",
        description="Length of a destination's first pause; each pause after a failed probe "
        "is twice as long, up to maxSeconds. Default 60.",
    )
    max_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        alias="maxSeconds",
        description="Longest pause. Default 3600.",
    )


class Shaping(Model):
    enabled: bool = Field(
        default=True,
        description="Shape delivery per destination. False: domains are scheduled one by "
        "one with the relay's share per domain only, nothing is paused.",
    )
    default: ShapingLimits | None = Field(
        default=None,
        description="Limits of destinations that match no pattern (each domain's destination "
        "is then its set of MX hosts). Built-in: none beyond the relay's share.",
    )
    sites: list[ShapingSite] | None = Field(
        default=None,
        max_length=100,
        description="Destinations: overrides of the built-in ones (by name) and new ones.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    pause: ShapingPause | None = Field(
        default=None,
        description="When a destination that answers 421 or only 4xx is paused, and how long.",
    )


class PausedDestination(Model):
    name: str = Field(
        description="The destination: a named one, or 'mx ' and its MX hosts (a domain "
        "matching no pattern; past 100 characters the first host, how many more, and a "
        "digest of them all), or 'smarthost'."
    )
    until: datetime = Field(
        description="When the relay tries it again (one probe connection); its mail waits."
    )
    reason: str = Field(description="The reply that paused it.")
