"""A submitted message, parsed once: its envelope, the headers the relay acts on, its body.

:func:`parse_submission` reads the header section a single time (:func:`header_fields`, as
the upstream will receive it) and keeps only what the DATA path needs (the originator
mailboxes, To and Cc, Message-ID, the tracking and template headers) as plain strings, so
nothing downstream depends on how the headers were parsed. The originator fields (From,
Sender, Resent-From, Resent-Sender) are parsed strictly (:func:`mailboxes`): a value that
does not parse cleanly leaves :attr:`SubmittedHeaders.from_problem` set, and the sender
policy refuses the message. Parsing never raises, whatever the bytes. The body is kept as
received: the relay spools it byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from txmail_relay.mail.addresses import AddressError, addr_specs, mailboxes
from txmail_relay.mail.dsn import DsnEnvelope
from txmail_relay.mail.headers import HeaderFields, header_fields

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


#: Fields naming who wrote or sent the message (RFC 5322 §3.6.2, §3.6.6): a reader may show
#: any of them as the author, so every one is held to the token's domains.
ORIGINATOR_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")
_SINGLE = {"from", "sender"}  # at most one field each (RFC 5322 §3.6); From exactly one


@dataclass(frozen=True)
class SubmittedHeaders:
    sender: str | None  # the From field, unfolded, when there is exactly one
    from_domains: tuple[str, ...] | None  # of every originator mailbox; None: see from_problem
    to: tuple[str, ...]  # addr-specs of every To header
    cc: tuple[str, ...]
    message_id: str | None
    track_off: bool  # X-Txmail-Track: off
    dkim_signed: bool
    template: TemplateFields | None  # None: relayed as it is
    content_type: str | None  # the first Content-Type field; None: text/plain (RFC 2045 §5.2)
    from_problem: str | None = None  # why the originator fields are refused (None: usable)


@dataclass(frozen=True)
class Submission:
    mail_from: str
    recipients: tuple[str, ...]  # RCPT TO, as given
    content: bytes  # the message as received (without the relay's Received header)
    headers: SubmittedHeaders
    dsn: DsnEnvelope | None = None  # RFC 3461 parameters (NOTIFY, ORCPT, RET, ENVID)


def _originators(fields: HeaderFields) -> tuple[tuple[str, ...] | None, str | None]:
    """The domains of every originator mailbox, or None and the reason they are refused."""
    if fields.malformed is not None:
        return None, f"Malformed header section: {fields.malformed}"
    if len(fields.get_all("From")) != 1:
        return None, "Exactly one valid From header needed"
    domains: list[str] = []
    for name in ORIGINATOR_FIELDS:
        values = fields.get_all(name)
        if name.lower() in _SINGLE and len(values) > 1:
            return None, f"More than one {name} header"
        for value in values:
            try:
                domains.extend(m.domain for m in mailboxes(value))
            except AddressError as e:
                return None, f"{name} header does not parse cleanly: {e}"
    return tuple(domains), None


def parse_headers(content: bytes) -> SubmittedHeaders:
    fields = header_fields(content)
    template = None
    if TEMPLATE_HEADER in fields:
        template = TemplateFields(
            email_id=fields.get(TEMPLATE_HEADER) or "",
            properties=fields.get(PROPERTIES_HEADER),
            send_id=fields.get(SEND_ID_HEADER) or None,
        )
    from_domains, problem = _originators(fields)
    return SubmittedHeaders(
        sender=fields.get("From") if len(fields.get_all("From")) == 1 else None,
        from_domains=from_domains,
        to=addr_specs(fields.get_all("To")),
        cc=addr_specs(fields.get_all("Cc")),
        message_id=fields.get("Message-ID") or None,
        track_off=(fields.get(TRACK_HEADER) or "").lower() == "off",
        dkim_signed="DKIM-Signature" in fields,
        template=template,
        content_type=fields.get("Content-Type"),
        from_problem=problem,
    )


def parse_submission(mail_from: str, recipients: list[str], content: bytes) -> Submission:
    """The submission of one DATA command (pure)."""
    return Submission(mail_from, tuple(recipients), content, parse_headers(content))
