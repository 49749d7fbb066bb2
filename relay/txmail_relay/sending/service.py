"""Template sends: render a TransactionalEmail, build its MIME, track it, and spool it.

Shared by the HubSpot-compatible API (:mod:`txmail_relay.api`) and SMTP template sends
(:mod:`txmail_relay.smtp`). Rendering, MIME building and tracking are CPU-bound and run in
a worker thread. The copies go into the same durable spool as SMTP mail, so delivery,
retries and metrics are shared; the send is recorded in the :class:`~txmail_relay.store.Store`.

Tracking (when the template asks for it, the IP has a tracking base URL and keys are
configured): every ``to`` recipient gets its own copy with its own event id; ``cc`` and
``bcc`` recipients share one untracked copy. A tracking failure sends untracked (counted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, parseaddr
from typing import Any, Protocol

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import CredentialEntry, TemplateEntry
from txmail_relay.mail.compose import POLICY, MimeError, Outgoing, build_message, to_bytes
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.store import SendStatus, SentCopy, Store, Suppression
from txmail_relay.spool.segments import SpooledMessage, SpoolError
from txmail_relay.templates.policy import RenderError, Templates
from txmail_relay.tracking.tokens import TrackingKeys, new_event_id, rewrite_message

log = logging.getLogger(__name__)

#: Local parts HubSpot refuses as recipients (``INVALID_TO_ADDRESS``).
ROLE_LOCAL_PARTS = frozenset(
    {
        *("abuse", "no-reply", "noreply", "root", "spam", "security"),
        *("undisclosed-recipients", "unsubscribe", "inoc", "postmaster", "privacy"),
    }
)


#: HubSpot ``sendResult`` of a send refused because its recipient is suppressed.
SUPPRESSED_RESULTS = {
    Suppression.BOUNCED: "PREVIOUSLY_BOUNCED",
    Suppression.COMPLAINED: "PREVIOUS_SPAM",
}
SUPPRESSED_REASONS = {
    Suppression.BOUNCED: "earlier mail to it bounced",
    Suppression.COMPLAINED: "it reported earlier mail as spam",
}


def suppression_reasons(config: DynamicConfig | None) -> list[Suppression]:
    """What the DedicatedIP opted into suppressing (nothing by default)."""
    if config is None:
        return []
    opted = config.relay.suppression
    return [
        reason
        for reason, on in (
            (Suppression.BOUNCED, opted.bounces),
            (Suppression.COMPLAINED, opted.complaints),
        )
        if on
    ]


class Spooler(Protocol):
    async def append(
        self, mail_from: str, recipients: list[str], username: str, body: bytes
    ) -> SpooledMessage: ...


class KeySource(Protocol):
    """Where the tracking keys in force come from (:class:`txmail_relay.engagement.KeyFile`)."""

    @property
    def current(self) -> TrackingKeys | None: ...


class SendError(Exception):
    """A send refused before spooling: ``send_result`` (HubSpot enum) and the field."""

    def __init__(self, send_result: str, field: str, message: str) -> None:
        super().__init__(message)
        self.send_result = send_result
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SendRequest:
    email_id: int
    to: tuple[str, ...]
    sender: str | None = None  # "Name <a@b>" overriding the template's From
    send_id: str | None = None
    reply_to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    contact_properties: Mapping[str, Any] = field(default_factory=dict)
    custom_properties: Mapping[str, Any] = field(default_factory=dict)


TRACK_HEADER = "X-Txmail-Track"  # "off": a plain SMTP message opts out of tracking


@dataclass(frozen=True)
class Copy:
    body: bytes
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    event_id: bytes | None


@dataclass(frozen=True)
class SendOutcome:
    status: SendStatus
    duplicate: bool  # a repeated sendId: nothing was sent


def is_role_address(address: str) -> bool:
    return address.rpartition("@")[0].lower() in ROLE_LOCAL_PARTS


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def sender_allowed(config: DynamicConfig, entry: CredentialEntry, address: str) -> bool:
    domain = _domain(address)
    relay_domains = {d.lower() for d in config.relay.domains}
    token_domains = {d.lower() for d in entry.allowed_from_domains}
    return domain in relay_domains and domain in token_domains


def find_template(config: DynamicConfig, entry: CredentialEntry, email_id: int) -> TemplateEntry:
    """The template if it is in the token's namespace (others look exactly like missing).

    The operator's scheduler credential may send any template published to this relay.
    """
    template = config.templates.get(email_id)
    if template is None or (template.namespace != entry.namespace and not entry.scheduler):
        raise SendError("MISSING_CONTENT", "emailId", f"no email with id {email_id}")
    return template


class Composer:
    """Renders and builds the copies of one send (synchronous: run it in a thread)."""

    def __init__(
        self,
        templates: Templates,
        keys: KeySource,
        metrics: RelayMetrics,
        *,
        make_event_id: Callable[[], bytes] = new_event_id,
    ) -> None:
        self._templates = templates
        self._keys = keys
        self._metrics = metrics
        self._make_event_id = make_event_id

    def compose(
        self,
        config: DynamicConfig,
        entry: CredentialEntry,
        template: TemplateEntry,
        request: SendRequest,
    ) -> list[Copy]:
        sender = Address(display_name=template.sender.name or "", addr_spec=template.sender.address)
        if request.sender is not None:
            name, addr = parseaddr(request.sender)
            if not addr or "@" not in addr:
                raise SendError("INVALID_FROM_ADDRESS", "message.from", "invalid from address")
            sender = Address(display_name=name, addr_spec=addr)
        if not sender_allowed(config, entry, sender.addr_spec):
            raise SendError(
                "INVALID_FROM_ADDRESS",
                "message.from",
                f"sender domain {_domain(sender.addr_spec)} not allowed",
            )
        try:
            rendered = self._templates.render(
                template, request.contact_properties, request.custom_properties
            )
        except RenderError as e:
            where = "contactProperties" if "contact." in str(e) else "customProperties"
            fld = where if e.send_result == "MISSING_TEMPLATE_PROPERTIES" else "emailId"
            raise SendError(e.send_result, fld, str(e)) from e
        if not (rendered.html or rendered.text):
            raise SendError("MISSING_CONTENT", "emailId", "the email renders no content")
        reply_to = list(request.reply_to) or template.reply_to
        base = config.relay.tracking.base_url
        keys = self._keys.current  # one key ring for the whole send, even during a reload
        track = (
            keys is not None
            and base is not None
            and (template.track_opens or template.track_clicks)
        )

        def build(to: Sequence[str], cc: Sequence[str], bcc: Sequence[str]) -> Outgoing:
            try:
                return build_message(
                    rendered,
                    from_address=sender.addr_spec,
                    from_name=sender.display_name or None,
                    to=to,
                    cc=cc,
                    bcc=bcc,
                    reply_to=reply_to,
                )
            except MimeError as e:
                raise SendError("VALIDATION_FAILED", "message", str(e)) from e

        if not track:
            out = build(request.to, request.cc, request.bcc)
            return [self._copy(out, sender.addr_spec, None)]
        copies = []
        for rcpt in request.to:
            out = build([rcpt], request.cc, ())
            event_id = self._make_event_id()
            assert keys is not None and base is not None  # noqa: S101 - narrowed above
            result = rewrite_message(
                out.message,
                base,
                keys,
                event_id,
                clicks=template.track_clicks,
                opens=template.track_opens,
            )
            if result.failed:
                self._metrics.tracking_failures.inc()
                log.warning("tracking failed, sending untracked", extra={"reason": result.error})
                copies.append(self._copy(out, sender.addr_spec, None, recipients=(rcpt,)))
            else:
                tracked = Outgoing(result.message, (rcpt,), out.message_id)
                copies.append(self._copy(tracked, sender.addr_spec, event_id))
        others = [r for r in (*request.cc, *request.bcc) if r not in request.to]
        if others:
            out = build(request.to, request.cc, request.bcc)
            copies.append(
                self._copy(out, sender.addr_spec, None, recipients=tuple(dict.fromkeys(others)))
            )
        return copies

    def track_plain(
        self, config: DynamicConfig, content: bytes, mail_from: str, rcpts: Sequence[str]
    ) -> list[Copy] | None:
        """Plain SMTP mail on a relay with tracking on: a tracked copy per To recipient.

        Cc and Bcc recipients share one untracked copy. Mail without an HTML part, mail the
        app signed itself (DKIM: rewriting would break the signature) and mail with
        ``X-Txmail-Track: off`` are left alone (None). Tracking never fails delivery: on any
        error the mail goes out as it came, and a metric counts it.
        """
        base = config.relay.tracking.base_url
        keys = self._keys.current
        if base is None or keys is None:
            return None
        try:
            return self._plain_copies(base, keys, content, mail_from, rcpts)
        except Exception as exc:
            self._metrics.tracking_failures.inc()
            log.warning("tracking failed, sending untracked", extra={"reason": type(exc).__name__})
            return None

    def _plain_copies(
        self, base: str, keys: TrackingKeys, content: bytes, mail_from: str, rcpts: Sequence[str]
    ) -> list[Copy] | None:
        message = message_from_bytes(content, policy=POLICY)
        if not isinstance(message, EmailMessage):
            return None
        opted_out = str(message.get(TRACK_HEADER, "")).strip().lower() == "off"
        if opted_out or "DKIM-Signature" in message or message.get_body(("html",)) is None:
            return None
        to = {a.lower() for _, a in getaddresses([str(v) for v in message.get_all("To", [])])}
        tracked = [r for r in rcpts if r.lower() in to]
        if not tracked:
            return None
        message_id = str(message.get("Message-ID") or "").strip()
        copies = []
        for rcpt in tracked:
            event_id = self._make_event_id()
            result = rewrite_message(message, base, keys, event_id)
            if result.failed:
                raise ValueError(result.error)
            body = to_bytes(result.message)
            copies.append(Copy(body, mail_from, (rcpt,), message_id, event_id))
        others = tuple(r for r in rcpts if r not in tracked)
        if others:
            copies.append(Copy(content, mail_from, others, message_id, None))
        return copies

    @staticmethod
    def _copy(
        out: Outgoing,
        mail_from: str,
        event_id: bytes | None,
        *,
        recipients: tuple[str, ...] | None = None,
    ) -> Copy:
        return Copy(
            body=to_bytes(out.message),
            mail_from=mail_from,
            recipients=recipients if recipients is not None else out.recipients,
            message_id=out.message_id,
            event_id=event_id,
        )


class SendService:
    """Checks, reserves the sendId, composes in a thread, spools durably, records."""

    def __init__(
        self,
        config: LiveConfig,
        composer: Composer,
        spool: Spooler,
        store: Store,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._composer = composer
        self._spool = spool
        self._store = store
        self._metrics = metrics

    def check(self, entry: CredentialEntry, request: SendRequest) -> TemplateEntry:
        """Checks that need no rendering; raises :class:`SendError`."""
        config = self._config.current
        if config is None:
            raise SendError("VALIDATION_FAILED", "emailId", "relay is not configured yet")
        for rcpt in request.to:
            if is_role_address(rcpt):
                raise SendError(
                    "INVALID_TO_ADDRESS", "message.to", f"role address {rcpt} not allowed"
                )
        return find_template(config, entry, request.email_id)

    async def send(self, entry: CredentialEntry, request: SendRequest, peer: str) -> SendOutcome:
        template = self.check(entry, request)
        config = self._config.current
        assert config is not None  # noqa: S101 - check() raised otherwise
        status, created = await self._store.call(
            self._store.reserve,
            entry.username,
            request.send_id,
            request.email_id,
            request.to[0],
        )
        if not created:
            return SendOutcome(status, duplicate=True)
        try:
            request = await self._without_suppressed(entry, config, request)
            copies = await asyncio.to_thread(
                self._composer.compose, config, entry, template, request
            )
            await self._spool_copies(entry, request, copies, status.status_id, config, peer)
        except BaseException:
            await asyncio.shield(self._store.call(self._store.release, status.status_id))
            raise
        latest = await self._store.call(self._store.status, entry.username, status.status_id)
        return SendOutcome(latest or status, duplicate=False)

    async def _without_suppressed(
        self, entry: CredentialEntry, config: DynamicConfig, request: SendRequest
    ) -> SendRequest:
        """Refuse a suppressed ``to`` (:class:`SendError`); drop suppressed cc and bcc."""
        reasons = suppression_reasons(config)
        if not reasons:
            return request
        everyone = (*request.to, *request.cc, *request.bcc)
        found = await self._store.call(self._store.suppressed, everyone, reasons)
        if not found:
            return request
        for rcpt in request.to:
            if rcpt in found:
                reason = found[rcpt]
                raise SendError(
                    SUPPRESSED_RESULTS[reason],
                    "message.to",
                    f"{rcpt} is suppressed on this relay: {SUPPRESSED_REASONS[reason]}",
                )
        log.info(
            "suppressed recipients left out",
            extra={"token": entry.username, "recipients": len(found)},
        )
        return dataclasses.replace(
            request,
            cc=tuple(r for r in request.cc if r not in found),
            bcc=tuple(r for r in request.bcc if r not in found),
        )

    async def send_copies(
        self,
        entry: CredentialEntry,
        request: SendRequest,
        copies: Sequence[Copy],
        *,
        peer: str,
    ) -> list[SpooledMessage]:
        """Spool already composed copies (SMTP template sends) and record them."""
        config = self._config.current
        if config is None:
            raise SpoolError("relay is not configured yet")
        return await self._spool_copies(entry, request, copies, None, config, peer)

    async def track_plain(
        self,
        entry: CredentialEntry,
        mail_from: str,
        rcpts: Sequence[str],
        content: bytes,
        received: bytes,
    ) -> list[SpooledMessage] | None:
        """Spool and record tracked copies of plain SMTP mail; None when it is not tracked."""
        config = self._config.current
        if config is None:
            return None
        copies = await asyncio.to_thread(
            self._composer.track_plain, config, content, mail_from, rcpts
        )
        if copies is None:
            return None
        spooled = await self._store_copies(entry, copies, received)
        sent = [
            SentCopy(msg.id, rcpt, copy.message_id or None, copy.event_id)
            for msg, copy in zip(spooled, copies, strict=True)
            for rcpt in copy.recipients
        ]
        contacts: dict[str, Any] | None = {} if entry.create_contacts else None
        await self._store.call(
            lambda: self._store.record_sent(entry.username, 0, sent, contacts=contacts)
        )
        return spooled

    async def _store_copies(
        self, entry: CredentialEntry, copies: Sequence[Copy], received: bytes
    ) -> list[SpooledMessage]:
        """Spool every copy durably (one group commit covers them all), then count them."""
        spooled = await asyncio.gather(
            *(
                self._spool.append(
                    c.mail_from, list(c.recipients), entry.username, received + c.body
                )
                for c in copies
            )
        )
        for _ in spooled:
            self._metrics.accepted.labels(entry.username).inc()
        return list(spooled)

    async def compose(
        self, entry: CredentialEntry, request: SendRequest
    ) -> tuple[TemplateEntry, list[Copy]]:
        template = self.check(entry, request)
        config = self._config.current
        assert config is not None  # noqa: S101 - check() raised otherwise
        copies = await asyncio.to_thread(self._composer.compose, config, entry, template, request)
        return template, copies

    async def _spool_copies(
        self,
        entry: CredentialEntry,
        request: SendRequest,
        copies: Sequence[Copy],
        status_id: str | None,
        config: DynamicConfig,
        peer: str,
    ) -> list[SpooledMessage]:
        received = (
            f"Received: from [{peer}]\r\n\tby {config.relay.hostname} (txmail) "
            f"with HTTP;\r\n\t{formatdate(usegmt=True)}\r\n"
        ).encode("ascii", "replace")
        spooled = await self._store_copies(entry, copies, received)
        sent = [
            SentCopy(
                spool_id=msg.id,
                recipient=rcpt,
                message_id=copy.message_id,
                event_id=copy.event_id if rcpt in request.to else None,
                status_id=status_id if rcpt == request.to[0] else None,
            )
            for msg, copy in zip(spooled, copies, strict=True)
            for rcpt in copy.recipients
        ]
        await self._store.call(
            lambda: self._store.record_sent(
                entry.username,
                request.email_id,
                sent,
                contacts=request.contact_properties if entry.create_contacts else None,
                queued_status=status_id,
            )
        )
        log.info(
            "template send queued",
            extra={
                "token": entry.username,
                "email_id": request.email_id,
                "msg_ids": [m.id for m in spooled],
                "recipients": len(sent),
            },
        )
        return list(spooled)


def split_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """Addr-specs of header values (``Name <a@b>, c@d``)."""
    return tuple(addr for _, addr in getaddresses(list(values)) if addr)
