"""The values the records hold and hand out (no SQL here)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from txmail_relay.contract import SendState, WebhookEventType


class Kind(StrEnum):
    """Event kinds counted per token and per email."""

    SENT = "sent"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    OPENED = "opened"
    CLICKED = "clicked"
    UNIQUE_OPENED = "unique_opened"
    UNIQUE_CLICKED = "unique_clicked"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    SOFT_BOUNCED = "soft_bounced"  # an asynchronous DSN that was not a hard failure
    MACHINE_OPENED = "machine_opened"  # a scanner or a prefetching proxy, not a person
    MACHINE_CLICKED = "machine_clicked"
    DROPPED = "dropped"  # a send refused before spooling (suppressed, say)


class Suppression(StrEnum):
    """Why a recipient is suppressed; the values are the stored reasons and the API's.

    ``HARD_BOUNCE`` (a hard bounce of a bad address, records/events.py ``suppresses``) and
    ``SPAM_REPORT`` are recorded automatically (enforced only when the DedicatedIP opts in);
    ``MANUAL`` entries are added through the API and always enforced.
    """

    HARD_BOUNCE = "HARD_BOUNCE"
    SPAM_REPORT = "SPAM_REPORT"
    MANUAL = "MANUAL"


# What happened to one recipient of one message: HubSpot's email-event type names. The one
# list is the contract's (the lowest layer: a webhook subscription names the same types).
#
# ``SENT``: spooled for the recipient. ``DELIVERED``: the next hop accepted it.
# ``DEFERRED``: one failed attempt that will be retried. ``BOUNCE``: given up on (detail
# ``bounceType`` ``HARD``|``SOFT``, ``source`` ``SMTP``|``DSN``|``EXPIRED``, ``status``,
# ``category``). ``SPAMREPORT``: an ARF complaint. ``OPEN``, ``CLICK`` (detail ``url``,
# ``userAgent``, ``filteredEvent``: a machine did it). ``DROPPED``: a send refused before
# spooling (detail ``dropReason``, a sendResult value).
EventType = WebhookEventType


def iso_time(at: float) -> str:
    """``at`` (seconds since the epoch) as ISO 8601 UTC with milliseconds and a ``Z``."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One row of the events log; ``seq`` (its SQLite rowid) orders it and is the cursor."""

    seq: int
    id: str  # "evt_...", random, stable: a receiver deduplicates on it
    type: EventType
    created: float  # seconds since the epoch
    namespace: str  # the SmtpToken's namespace ("" for mail recorded before issue 12)
    token: str  # the SmtpToken's name ("" likewise)
    username: str  # the token's SMTP username (what the stats are keyed by)
    email_id: int  # 0 for plain SMTP mail
    status_id: str | None  # the API send's statusId
    spool_id: str | None
    recipient: str
    message_id: str | None
    reply: str | None  # the SMTP reply text (delivery, deferral, bounce) if any
    detail: Mapping[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        """THE JSON shape of an event (the events API and the webhooks send exactly this).

        camelCase; ``created`` in milliseconds since the epoch (as HubSpot's) and
        ``createdAt`` ISO 8601; the type's detail (``bounceType``, ``source``, ``status``,
        ``category``, ``url``, ``userAgent``, ``dropReason``) at the top level as HubSpot
        puts them; ``filteredEvent`` on every event (true only for machine opens/clicks);
        ``response`` is the SMTP reply (HubSpot's name for it).
        """
        view: dict[str, Any] = {"filteredEvent": False, **self.detail}
        view.update(
            id=self.id,
            seq=self.seq,
            type=self.type.value,
            created=math.floor(self.created * 1000),  # as the API filters it (ms, floor)
            createdAt=iso_time(self.created),
            namespace=self.namespace,
            token=self.token,
            username=self.username,
            emailId=self.email_id,
            statusId=self.status_id,
            spoolId=self.spool_id,
            recipient=self.recipient,
            messageId=self.message_id,
            response=self.reply,
        )
        return view


@dataclass(frozen=True)
class SendStatus:
    status_id: str
    username: str
    send_id: str | None
    email_id: int
    recipient: str
    status: SendState
    send_result: str | None
    requested_at: float
    started_at: float | None
    completed_at: float | None
    bounce: Mapping[str, Any] | None = None  # an asynchronous hard bounce (bounceType, ...)


@dataclass(frozen=True)
class SentCopy:
    """One recipient of one spooled message."""

    spool_id: str
    recipient: str
    message_id: str | None = None
    event_id: bytes | None = None
    status_id: str | None = None


@dataclass(frozen=True)
class Recipient:
    """What a tracking event id, a Message-ID or a DSN leads back to."""

    spool_id: str
    recipient: str
    username: str
    email_id: int
    namespace: str = ""  # the sending SmtpToken ("" for mail recorded before issue 12)
    token: str = ""
    status_id: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Contact:
    address: str
    first_seen: float
    last_sent: float
    properties: Mapping[str, Any]
    unsubscribed: bool


@dataclass(frozen=True)
class Totals:
    """What the stats are computed from, read at one moment."""

    counts: Mapping[str, Mapping[Kind, int]]  # per token: every kind over all emails
    last_sent: Mapping[str, float]  # per token
    contacts: Mapping[str, int]  # per token (createContacts)
