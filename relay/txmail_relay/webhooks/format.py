"""What one webhook request carries: the body, its Standard Webhooks signature, and the short
description of a failed attempt (what a status and a log line may say: a status code or a
fixed phrase, never what the receiver sent).

The body (docs/feedback.md "Webhooks")::

    {"type": "txmail.events", "timestamp": "<ISO 8601, the batch's first attempt>",
     "data": {"events": [<Event.view()>, ...]}}

The same batch always has the same body and ``webhook-id``; ``webhook-timestamp`` is the
attempt's, so each attempt is signed again (receivers refuse stale timestamps). Signing is the
``standardwebhooks`` library's: HMAC-SHA256 over ``<id>.<timestamp>.<body>``, header
``webhook-signature: v1,<base64>``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from txmail_relay.records.model import Event, iso_time

BODY_TYPE = "txmail.events"


def new_webhook_id() -> str:
    """A batch's ``webhook-id``: random, stable across its retries (receivers dedupe on it)."""
    return "msg_" + secrets.token_urlsafe(16)


def body(events: Sequence[Event], formed: float) -> bytes:
    doc = {
        "type": BODY_TYPE,
        "timestamp": iso_time(formed),
        "data": {"events": [event.view() for event in events]},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def signed_headers(webhook_id: str, key: bytes, payload: bytes, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt at ``now`` (seconds since the epoch)."""
    timestamp = int(now)
    signature = Webhook(key).sign(
        webhook_id, datetime.fromtimestamp(timestamp, UTC), payload.decode()
    )
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def describe_status(status: int) -> str:
    """``HTTP 500``: the status code only. The receiver's body and reason phrase are never
    quoted: the last error lands in the SmtpToken's status and a Kubernetes Event, and quoting
    what a URL answers would let a token's author read internal services through the relay."""
    text = f"HTTP {status}"
    if 300 <= status < 400:
        return text + ": redirects are not followed"
    return text


def describe_error(error: BaseException, timeout: float) -> str:
    """A failed request as a fixed phrase: never the URL (it may carry a token), an address,
    a resolver's answer nor anything the far end sent."""
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return f"no response within {timeout:g} s"
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return "TLS failed"
    if isinstance(error, aiohttp.ClientConnectorError):
        if error.os_error.errno == errno.ECONNREFUSED:
            return "cannot connect: connection refused"
        return "cannot connect"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without a response"
    if isinstance(error, aiohttp.InvalidURL):
        return "invalid URL"
    return "request failed"
