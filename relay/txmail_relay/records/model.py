"""The values the records hold and hand out (no SQL here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from txmail_relay.contract import SendState


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


class Suppression(StrEnum):
    """Why a recipient may be suppressed; the values are also the stored reasons."""

    BOUNCED = "bounced"
    COMPLAINED = "complained"


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
    """What a tracking event id or a Message-ID leads back to."""

    spool_id: str
    recipient: str
    username: str
    email_id: int


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
