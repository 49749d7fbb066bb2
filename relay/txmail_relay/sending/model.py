"""The values a send is made of: the request, its composed copies, the API's outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from txmail_relay.records.model import SendStatus


@dataclass(frozen=True)
class SendRequest:
    """A template send (the API's JSON, or an SMTP message with ``X-Txmail-Email-Id``)."""

    email_id: int
    to: tuple[str, ...]
    sender: str | None = None  # "Name <a@b>" overriding the template's From
    send_id: str | None = None
    reply_to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    contact_properties: Mapping[str, Any] = field(default_factory=dict)
    custom_properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Copy:
    """One message to spool: its body (without the Received header) and envelope."""

    body: bytes
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str | None
    event_id: bytes | None


@dataclass(frozen=True)
class SendOutcome:
    status: SendStatus
    duplicate: bool  # a repeated sendId: nothing was sent
