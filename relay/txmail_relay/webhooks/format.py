"""What one webhook request carries: the body, its Standard Webhooks signature, and the short
description of a failed attempt (what a status and a log line may say).

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
import json
import os
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from txmail_relay.records.model import Event, iso_time

BODY_TYPE = "txmail.events"
EXCERPT_BYTES = 256  # what is read of a failed response's body, at most
EXCERPT_CHARS = 80  # what the last error quotes of it
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


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


def excerpt(data: bytes) -> str:
    """A short, one-line, printable excerpt of a response body."""
    text = _UNPRINTABLE.sub(" ", data.decode("utf-8", "replace")).strip()
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def describe_status(status: int, reason: str | None, data: bytes) -> str:
    """``HTTP 500 Internal Server Error: <excerpt>``; a redirect says it was not followed."""
    text = f"HTTP {status}" + (f" {reason}" if reason else "")
    if 300 <= status < 400:
        return text + ": redirects are not followed"
    quoted = excerpt(data)
    return f"{text}: {quoted}" if quoted else text


def describe_error(error: BaseException, timeout: float) -> str:
    """A failed request as a short reason: never the URL (it may carry a token) nor a body."""
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return f"no response within {timeout:g} s"
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return f"TLS failed ({type(error).__name__})"
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if isinstance(os_error.errno, int) and os_error.errno > 0:
            reason = os.strerror(os_error.errno)  # asyncio's strerror quotes the address
        else:  # a resolver error (gaierror: negative codes) says it in strerror
            reason = os_error.strerror or type(os_error).__name__
        return f"cannot connect: {reason.lower()}"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without a response"
    if isinstance(error, aiohttp.InvalidURL):
        return "invalid URL"
    return f"request failed ({type(error).__name__})"
