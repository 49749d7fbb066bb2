"""DedicatedIP spec.bounces: what the relay does when it gives up on a recipient.

Bounces coming back (asynchronous DSNs to the return path) are on with
``spec.dns.returnPathDomain`` (api/dns.py); this is about the DSNs the relay itself sends to
the original sender of an SMTP submission (RFC 3464, docs/feedback.md "Configuration").
"""

from __future__ import annotations

from pydantic import Field

from txmail_relay.contract import DsnPolicy

from .common import Model


class Bounces(Model):
    notify_sender: DsnPolicy = Field(
        default=DsnPolicy.ON_REQUEST,
        description="When the relay sends the sender of an SMTP submission a delivery status "
        "notification (RFC 3464, from <>) after giving up on a recipient (a 5xx reply, or the "
        "queue lifetime reached). OnRequest: as the sender asked at RCPT (RFC 3461 "
        "NOTIFY=FAILURE, or no NOTIFY at all; never for NOTIFY=NEVER). Always: for every "
        "failed recipient. Never: none. API and template sends never get one (their send "
        "status and events say what happened), and there is never a DSN about a DSN.",
    )
