"""The HubSpot-compatible single-send API, send statuses and contacts (aiohttp routes).

Authentication: ``Authorization: Bearer <password>`` or HTTP Basic ``username:password``
of an SmtpToken, checked against the same digests as SMTP AUTH, in constant time, with the
same per-client-IP failure limiter. Errors use HubSpot's error body
(``status``, ``message``, ``correlationId``, ``category``, ``errors[{message, in, code}]``)
plus the ``sendResult`` that applies. Nothing here logs a header, a password or a body.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from txmail_relay.contract import CredentialEntry, SendResult, SendState
from txmail_relay.delivery.warmup import WarmupGate
from txmail_relay.ingress.auth import Authenticator, FailureLimiter
from txmail_relay.mail.addresses import mailboxes
from txmail_relay.mail.compose import MimeError, address
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.database import RecordsFullError
from txmail_relay.records.model import SendStatus
from txmail_relay.records.records import Records
from txmail_relay.sending.model import SendRequest
from txmail_relay.sending.policy import SendError, parse_email_id, property_refusal
from txmail_relay.sending.service import SendService
from txmail_relay.spool.segments import SpoolError, SpoolFullError

log = logging.getLogger(__name__)

SEND_PATH = "/marketing/v3/transactional/single-email/send"
STATUS_PATH = "/marketing/v3/email/send-statuses/{statusId}"
CONTACTS_PATH = "/txmail/v1/contacts"
MAX_SEND_ID = 256
MAX_CONTACTS_PAGE = 500
# Seconds a client is asked to wait when the relay's volume is full (spool or records) or
# the spool fails: the relay's own fault, so a 503 and never a refusal of the send.
RETRY_AFTER_STORAGE = "30"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_view(status: SendStatus, send_result: SendResult | None = None) -> dict[str, Any]:
    """HubSpot's ``EmailSendStatusView``, with ``bounce`` (txmail's) once a DSN reported the
    recipient's mail undeliverable after it was handed on (``sendResult`` UNDELIVERABLE)."""
    view: dict[str, Any] = {
        "statusId": status.status_id,
        "status": status.status.value,
        "requestedAt": iso(status.requested_at),
        "eventId": {"id": status.status_id, "created": iso(status.requested_at)},
    }
    for key, value in (
        ("startedAt", iso(status.started_at)),
        ("completedAt", iso(status.completed_at)),
        ("sendResult", send_result or status.send_result),
    ):
        if value is not None:
            view[key] = value
    if status.bounce is not None:  # a DSN after delivery: hard, or a final soft one
        bounce = dict(status.bounce)
        view["bounce"] = {
            "bounceType": bounce.get("bounceType"),
            "status": bounce.get("status"),
            "reply": bounce.get("reply"),
            "at": iso(bounce.get("at")),
        }
    return view


def error_response(
    status: int,
    category: str,
    message: str,
    *,
    field: str | None = None,
    code: str | None = None,
    send_result: SendResult | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    if field is not None:
        body["errors"] = [{"message": message, "in": field, "code": code or "INVALID"}]
    if send_result is not None:
        body["sendResult"] = send_result
    return web.json_response(body, status=status, headers=headers)


class _Invalid(Exception):  # noqa: N818 - internal signal, not an error class
    def __init__(
        self, field: str, message: str, send_result: SendResult = SendResult.VALIDATION_FAILED
    ):
        super().__init__(message)
        self.field = field
        self.message = message
        self.send_result = send_result


def _addresses(
    value: Any, field: str, send_result: SendResult = SendResult.VALIDATION_FAILED
) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _Invalid(field, f"{field} must be a list of addresses", send_result)
    for v in values:
        _check_address(v, field, send_result)
    return tuple(values)


def _check_address(value: str, field: str, send_result: SendResult) -> None:
    try:
        address(value)
    except MimeError:
        raise _Invalid(field, f"{field}: invalid address", send_result) from None


def _properties(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        found = {str(k): v for k, v in value.items()}
    # HubSpot v1 shape: [{"name": ..., "value": ...}]
    elif isinstance(value, list) and all(
        isinstance(p, dict) and isinstance(p.get("name"), str) for p in value
    ):
        found = {p["name"]: p.get("value") for p in value}
    else:
        raise _Invalid(field, f"{field} must be an object")
    refused = property_refusal(found, field)
    if refused is not None:
        raise _Invalid(refused.field, refused.message)
    return found


def _check_sender(value: str) -> None:
    """``message.from``: one mailbox, read by the sender policy's strict parser."""
    try:
        [_] = mailboxes(value)
    except ValueError:  # AddressError, or not exactly one mailbox
        raise _Invalid(
            "message.from",
            "message.from must be one address, like Name <name@domain>",
            SendResult.INVALID_FROM_ADDRESS,
        ) from None


def parse_send(doc: Any, max_recipients: int) -> SendRequest:
    """A :class:`SendRequest` from HubSpot's JSON; raises :class:`_Invalid` naming the field."""
    if not isinstance(doc, dict):
        raise _Invalid("body", "the body must be a JSON object")
    try:
        email_id = parse_email_id(doc.get("emailId"), "emailId")
    except SendError as e:
        raise _Invalid(e.field, e.message) from None
    message = doc.get("message")
    if not isinstance(message, dict):
        raise _Invalid("message", "message is required and must be an object")
    to = message.get("to")
    if not isinstance(to, str) or not to:
        raise _Invalid("message.to", "message.to is required", SendResult.INVALID_TO_ADDRESS)
    _check_address(to, "message.to", SendResult.INVALID_TO_ADDRESS)
    sender = message.get("from")
    if sender is not None and not isinstance(sender, str):
        raise _Invalid(
            "message.from", "message.from must be a string", SendResult.INVALID_FROM_ADDRESS
        )
    if sender is not None:
        _check_sender(sender)
    send_id = message.get("sendId")
    if send_id is not None and (
        not isinstance(send_id, str)
        or not send_id
        or len(send_id) > MAX_SEND_ID
        or property_refusal(send_id, "message.sendId") is not None
    ):
        raise _Invalid("message.sendId", f"sendId must be a string of 1-{MAX_SEND_ID} characters")
    cc = _addresses(message.get("cc"), "message.cc")
    bcc = _addresses(message.get("bcc"), "message.bcc")
    if 1 + len(cc) + len(bcc) > max_recipients:
        raise _Invalid("message", "too many recipients", SendResult.TOO_MANY_RECIPIENTS)
    return SendRequest(
        email_id=email_id,
        to=(to,),
        sender=sender,
        send_id=send_id,
        reply_to=_addresses(message.get("replyTo"), "message.replyTo"),
        cc=cc,
        bcc=bcc,
        contact_properties=_properties(doc.get("contactProperties"), "contactProperties"),
        custom_properties=_properties(doc.get("customProperties"), "customProperties"),
    )


def _credentials(header: str) -> tuple[str | None, str] | None:
    """(username or None for Bearer, password) from an Authorization header."""
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return None, value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        return (username, password) if sep else None
    return None


def peer_ip(request: web.Request) -> str:
    return request.remote or "unknown"


class TokenAuth:
    """Authenticates API requests like SMTP AUTH (same digests, same limiter)."""

    def __init__(
        self, checker: Authenticator, limiter: FailureLimiter, metrics: RelayMetrics
    ) -> None:
        self._checker = checker
        self._limiter = limiter
        self._metrics = metrics

    def authenticate(self, request: web.Request) -> CredentialEntry | web.Response:
        ip = peer_ip(request)
        if self._limiter.blocked(ip):
            self._metrics.rejections.labels("auth-rate").inc()
            return error_response(
                429,
                "RATE_LIMITS",
                "too many failed authentications, try later",
                send_result=SendResult.THROTTLED,
                headers={"Retry-After": "60"},
            )
        parsed = _credentials(request.headers.get("Authorization", ""))
        entry = None
        if parsed is not None:
            username, password = parsed
            entry = (
                self._checker.check_password(password)
                if username is None
                else self._checker.check(username, password)
            )
        if entry is None:
            self._limiter.record_failure(ip)
            self._metrics.auth_failures.inc()
            log.info("API authentication failed", extra={"peer": ip})
            return error_response(
                401,
                "INVALID_AUTHENTICATION",
                "authentication credentials not found or invalid",
                headers={"WWW-Authenticate": 'Bearer realm="txmail", Basic realm="txmail"'},
            )
        return entry


class SendApi:
    def __init__(
        self,
        auth: TokenAuth,
        service: SendService,
        records: Records,
        metrics: RelayMetrics,
        *,
        max_recipients: int,
        warmup: WarmupGate | None = None,
    ) -> None:
        self._warmup = warmup
        self._auth = auth
        self._service = service
        self._records = records
        self._metrics = metrics
        self._max_recipients = max_recipients

    def install(self, app: web.Application) -> None:
        app.router.add_post(SEND_PATH, self.send)
        app.router.add_get(STATUS_PATH, self.status)
        app.router.add_get(CONTACTS_PATH, self.contacts)

    def _count(self, entry: CredentialEntry, result: str) -> None:
        self._metrics.api_sends.labels(entry.username, result).inc()

    async def send(self, request: web.Request) -> web.Response:
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        try:
            doc = await request.json()
        except (ValueError, RecursionError):  # RecursionError: arrays nested 50,000 deep
            self._count(entry, SendResult.VALIDATION_FAILED)
            return error_response(
                400,
                "VALIDATION_ERROR",
                "the body is not valid JSON",
                field="body",
                code="CORRUPT_INPUT",
                send_result=SendResult.VALIDATION_FAILED,
            )
        try:
            send = parse_send(doc, self._max_recipients)
            outcome = await self._service.send(entry, send, peer_ip(request))
        except _Invalid as e:
            return self._refused(entry, e.send_result, e.field, e.message)
        except SendError as e:
            return self._refused(entry, e.send_result, e.field, e.message)
        except (SpoolFullError, RecordsFullError):
            self._count(entry, SendResult.THROTTLED)
            return error_response(
                503,
                "RATE_LIMITS",
                "insufficient storage, try later",
                send_result=SendResult.THROTTLED,
                headers={"Retry-After": RETRY_AFTER_STORAGE},
            )
        except SpoolError:
            self._count(entry, "SPOOL_ERROR")
            return error_response(
                503,
                "INTERNAL_ERROR",
                "could not queue the message, retry",
                headers={"Retry-After": RETRY_AFTER_STORAGE},
            )
        if outcome.duplicate:
            self._count(entry, SendResult.IDEMPOTENT_IGNORE)
            return web.json_response(status_view(outcome.status, SendResult.IDEMPOTENT_IGNORE))
        self._count(entry, SendResult.QUEUED)
        return web.json_response(await self._view(outcome.status))

    def _refused(
        self, entry: CredentialEntry, send_result: SendResult, field: str, message: str
    ) -> web.Response:
        self._count(entry, send_result)
        return error_response(
            400,
            "VALIDATION_ERROR",
            message,
            field=field,
            code=send_result,
            send_result=send_result,
        )

    async def status(self, request: web.Request) -> web.Response:
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        status_id = request.match_info["statusId"]
        found = await self._records.sends.get(entry.username, status_id)
        if found is None:
            return error_response(404, "OBJECT_NOT_FOUND", "no send status with this id")
        return web.json_response(await self._view(found))

    async def _view(self, status: SendStatus) -> dict[str, Any]:
        """:func:`status_view`, with ``deferred`` while warm-up holds the send's mail (a
        txmail field beside HubSpot's: ``status`` stays PROCESSING, ``sendResult`` QUEUED)."""
        view = status_view(status)
        gate = self._warmup
        if gate is None or status.status is not SendState.PROCESSING or not gate.holding():
            return view  # nothing held: no look-up (the common case, warm-up off or done)
        spooled = await self._records.sends.spool_ids(status.status_id)
        if any(gate.held(spool_id) for spool_id in spooled):
            deferred: dict[str, Any] = {"reason": "WARMUP"}
            upcoming = gate.next_day()
            if upcoming is not None:
                deferred["notBefore"] = iso(upcoming.timestamp())
            view["deferred"] = deferred
        return view

    async def contacts(self, request: web.Request) -> web.Response:
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        after = request.query.get("after", "")
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), MAX_CONTACTS_PAGE))
        except ValueError:
            return error_response(
                400, "VALIDATION_ERROR", "limit must be an integer", field="limit"
            )
        rows = await self._records.contacts.page(entry.username, after=after, limit=limit)
        body: dict[str, Any] = {
            "results": [
                {
                    "email": c.address,
                    "firstSeen": iso(c.first_seen),
                    "lastSent": iso(c.last_sent),
                    "properties": dict(c.properties),
                    "unsubscribed": c.unsubscribed,
                }
                for c in rows
            ]
        }
        if len(rows) == limit:
            body["paging"] = {"next": {"after": rows[-1].address}}
        return web.json_response(body)
