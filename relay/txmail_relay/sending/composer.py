"""Compose the copies of a send: render and build a template send, track plain mail.

CPU-bound and synchronous: :class:`~txmail_relay.sending.service.SendService` runs it in a
worker thread (plain mail it will not parse, :meth:`Composer.plain_is_cheap`, on the loop).
Tracking (when the template asks for it, the IP has a tracking base URL and keys are
configured): every ``to`` recipient gets its own copy with its own event id;
``cc`` and ``bcc`` recipients share one untracked copy. A tracking failure sends untracked
(counted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from email import message_from_bytes
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Protocol

from txmail_relay.config.live import DynamicConfig
from txmail_relay.contract import CredentialEntry, SendResult, TemplateEntry
from txmail_relay.mail.addresses import AddressError, domain_of, mailboxes
from txmail_relay.mail.compose import (
    POLICY,
    MimeError,
    Outgoing,
    address,
    build_message,
    to_bytes,
)
from txmail_relay.mail.headers import header_fields
from txmail_relay.mail.submission import ORIGINATOR_FIELDS, Submission
from txmail_relay.metrics import RelayMetrics
from txmail_relay.sending.model import Copy, SendRequest
from txmail_relay.sending.policy import SendError, sender_allowed
from txmail_relay.templates.policy import RenderError, Templates
from txmail_relay.tracking.links import rewrite_message
from txmail_relay.tracking.tokens import TrackingKeys, new_event_id

log = logging.getLogger(__name__)


#: Writes a parsed message's headers back as they came: the email package's refolding of long
#: address headers drops comment parentheses (``a@example.com (x <b@evil.test>)`` came out
#: as ``a@example.com x <b@evil.test>``), so a tracked copy must not refold them.
AS_RECEIVED = POLICY.clone(refold_source="none")


def _originators(content: bytes) -> tuple[tuple[str, str], ...]:
    """The originator fields (From, Sender, Resent-*) as the sender policy reads them."""
    wanted = {name.lower() for name in ORIGINATOR_FIELDS}
    return tuple(
        (name.lower(), value)
        for name, value in header_fields(content).fields
        if name.lower() in wanted
    )


class KeySource(Protocol):
    """Where the tracking keys in force come from (the tracking keys file, reloaded)."""

    @property
    def current(self) -> TrackingKeys | None: ...


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
            # The strict parser the sender policy uses: one mailbox, read one way only.
            try:
                [mailbox] = mailboxes(request.sender)
                sender = address(mailbox.addr_spec, mailbox.display_name)
            except (AddressError, MimeError, ValueError):
                raise SendError(
                    SendResult.INVALID_FROM_ADDRESS,
                    "message.from",
                    "invalid from address: one mailbox is needed, like Name <name@domain>",
                ) from None
        if not sender_allowed(config, entry, sender.addr_spec):
            raise SendError(
                SendResult.INVALID_FROM_ADDRESS,
                "message.from",
                f"sender domain {domain_of(sender.addr_spec)} not allowed",
            )
        try:
            rendered = self._templates.render(
                template, request.contact_properties, request.custom_properties
            )
        except RenderError as e:
            where = "contactProperties" if "contact." in str(e) else "customProperties"
            fld = where if e.send_result == "MISSING_TEMPLATE_PROPERTIES" else "emailId"
            raise SendError(SendResult(e.send_result), fld, str(e)) from e
        if not (rendered.html or rendered.text):
            raise SendError(SendResult.MISSING_CONTENT, "emailId", "the email renders no content")
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
                raise SendError(SendResult.VALIDATION_FAILED, "message", str(e)) from e

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

    def tracks(self, config: DynamicConfig | None) -> bool:
        """Plain mail may be tracked: the IP has a tracking base URL and keys are loaded."""
        return (
            config is not None
            and config.relay.tracking.base_url is not None
            and self._keys.current is not None
        )

    def plain(self, config: DynamicConfig | None, submission: Submission) -> list[Copy]:
        """Plain SMTP mail: as it came, or on a relay with tracking on, a tracked copy per
        To recipient.

        Cc and Bcc recipients share one untracked copy. Mail without an HTML part, mail the
        app signed itself (DKIM: rewriting would break the signature) and mail with
        ``X-Txmail-Track: off`` are left alone. Tracking never fails delivery: on any error
        the mail goes out as it came, and a metric counts it.
        """
        as_is = [
            Copy(
                submission.content,
                submission.mail_from,
                submission.recipients,
                submission.headers.message_id,
                None,
            )
        ]
        base = config.relay.tracking.base_url if config is not None else None
        keys = self._keys.current
        if base is None or keys is None:
            return as_is
        try:
            return self._tracked_copies(base, keys, submission) or as_is
        except Exception as exc:
            self._metrics.tracking_failures.inc()
            log.warning("tracking failed, sending untracked", extra={"reason": type(exc).__name__})
            return as_is

    @staticmethod
    def _to_track(submission: Submission) -> list[str]:
        """The recipients :meth:`plain` would give tracked copies, if the mail has an HTML
        part (only a parse of the body can tell): none when it opted out, is signed, or has
        no Content-Type (text/plain then, RFC 2045 §5.2, so no HTML part; the stdlib parser
        sees no field that :func:`header_fields` does not, in mail the policy accepted)."""
        headers = submission.headers
        if headers.track_off or headers.dkim_signed or headers.content_type is None:
            return []
        to = {a.lower() for a in headers.to}
        return [r for r in submission.recipients if r.lower() in to]

    def plain_is_cheap(self, config: DynamicConfig | None, submission: Submission) -> bool:
        """:meth:`plain` returns the mail as it came without parsing its body (no tracking,
        or nothing to track): cheap enough for the event loop. Otherwise it parses the body
        and may rewrite it, milliseconds for a small HTML mail: a worker thread's job."""
        return not self.tracks(config) or not self._to_track(submission)

    def _tracked_copies(
        self, base: str, keys: TrackingKeys, submission: Submission
    ) -> list[Copy] | None:
        headers, rcpts = submission.headers, submission.recipients
        tracked = self._to_track(submission)
        if not tracked:
            return None
        # The body is parsed only here, where it is rewritten.
        message = message_from_bytes(submission.content, policy=POLICY)
        if not isinstance(message, EmailMessage) or message.get_body(("html",)) is None:
            return None
        copies = []
        original = _originators(submission.content)
        for rcpt in tracked:
            event_id = self._make_event_id()
            result = rewrite_message(message, base, keys, event_id)
            if result.failed:
                raise ValueError(result.error)
            body = to_bytes(result.message, policy=AS_RECEIVED)
            if _originators(body) != original:
                raise ValueError("tracking would change the originator fields")
            copies.append(Copy(body, submission.mail_from, (rcpt,), headers.message_id, event_id))
        others = tuple(r for r in rcpts if r not in tracked)
        if others:
            copies.append(
                Copy(submission.content, submission.mail_from, others, headers.message_id, None)
            )
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
