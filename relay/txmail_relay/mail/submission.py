"""A submitted message, parsed once: its envelope, the headers the relay acts on, its body.

:func:`parse_submission` reads the header block a single time and keeps only what the DATA
path needs (the From domains, To and Cc, Message-ID, the tracking and template headers) as
plain strings, so nothing downstream depends on how the headers were parsed. The stdlib
parser does the work today; a cheaper one can replace it here without touching a caller.
The body is kept as received: the relay spools it byte for byte.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser

from txmail_relay.mail.addresses import addr_specs
from txmail_relay.mail.headers import header_block

TEMPLATE_HEADER = "X-Txmail-Email-Id"  # names a TransactionalEmail: a template send
PROPERTIES_HEADER = "X-Txmail-Properties"
SEND_ID_HEADER = "X-Txmail-Send-Id"
TRACK_HEADER = "X-Txmail-Track"  # "off": a plain SMTP message opts out of tracking


@dataclass(frozen=True)
class TemplateFields:
    """The ``X-Txmail-*`` headers of a template send, as submitted (not yet validated)."""

    email_id: str
    properties: str | None  # X-Txmail-Properties, or None: the properties are in the body
    send_id: str | None


@dataclass(frozen=True)
class SubmittedHeaders:
    sender: str | None  # the (first) From header, unfolded
    from_domains: tuple[str, ...] | None  # of the single From header; None: none usable
    to: tuple[str, ...]  # addr-specs of every To header
    cc: tuple[str, ...]
    message_id: str | None
    track_off: bool  # X-Txmail-Track: off
    dkim_signed: bool
    template: TemplateFields | None  # None: relayed as it is


@dataclass(frozen=True)
class Submission:
    mail_from: str
    recipients: tuple[str, ...]  # RCPT TO, as given
    content: bytes  # the message as received (without the relay's Received header)
    headers: SubmittedHeaders


def _text(message: EmailMessage, name: str) -> str:
    return str(message.get(name) or "").strip()


def _from_domains(message: EmailMessage) -> tuple[str, ...] | None:
    values = message.get_all("From") or []
    if len(values) != 1:
        return None
    try:
        addresses = values[0].addresses
    except (AttributeError, ValueError, IndexError):
        return None
    domains = tuple(str(a.domain).lower() for a in addresses)
    return domains if domains and all(domains) else None


def parse_headers(content: bytes) -> SubmittedHeaders:
    message = BytesHeaderParser(policy=email.policy.default).parsebytes(header_block(content))
    template = None
    if TEMPLATE_HEADER in message:
        properties = message.get(PROPERTIES_HEADER)
        template = TemplateFields(
            email_id=_text(message, TEMPLATE_HEADER),
            properties=None if properties is None else str(properties),
            send_id=_text(message, SEND_ID_HEADER) or None,
        )
    return SubmittedHeaders(
        sender=str(message.get("From") or "") or None,
        from_domains=_from_domains(message),
        to=addr_specs(str(v) for v in message.get_all("To") or []),
        cc=addr_specs(str(v) for v in message.get_all("Cc") or []),
        message_id=_text(message, "Message-ID") or None,
        track_off=_text(message, TRACK_HEADER).lower() == "off",
        dkim_signed="DKIM-Signature" in message,
        template=template,
    )


def parse_submission(mail_from: str, recipients: list[str], content: bytes) -> Submission:
    """The submission of one DATA command (pure)."""
    return Submission(mail_from, tuple(recipients), content, parse_headers(content))
