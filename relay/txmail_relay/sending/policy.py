"""Who may send what: the relay's checks on a submission, as pure functions.

Each check returns a :data:`Verdict`: :data:`ACCEPTED`, or :class:`Rejected` with the SMTP
reply (code, enhanced status, text) and the ``txmail_relay_rejections_total`` reason.
Template sends are refused with :class:`SendError`, which carries HubSpot's ``sendResult``
and field for the API and maps to its SMTP reply through :attr:`SendError.rejected`. Lookups
(the live configuration, the suppression list) are the caller's; these functions only decide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from txmail_relay.config.live import DynamicConfig
from txmail_relay.contract import CredentialEntry, SendResult, TemplateEntry
from txmail_relay.mail.addresses import domain_of, is_smtp_address
from txmail_relay.mail.submission import SubmittedHeaders
from txmail_relay.records.model import Suppression


@dataclass(frozen=True)
class Accepted:
    pass


@dataclass(frozen=True)
class Rejected:
    reason: str  # label of txmail_relay_rejections_total
    reply: str  # "550 5.7.1 text": the SMTP reply


ACCEPTED: Final = Accepted()
Verdict = Accepted | Rejected

#: Local parts HubSpot refuses as recipients (``INVALID_TO_ADDRESS``).
ROLE_LOCAL_PARTS = frozenset(
    {
        *("abuse", "no-reply", "noreply", "root", "spam", "security"),
        *("undisclosed-recipients", "unsubscribe", "inoc", "postmaster", "privacy"),
    }
)

#: HubSpot ``sendResult`` of a send refused because its recipient is suppressed.
SUPPRESSED_RESULTS = {
    Suppression.HARD_BOUNCE: SendResult.PREVIOUSLY_BOUNCED,
    Suppression.SPAM_REPORT: SendResult.PREVIOUS_SPAM,
    Suppression.MANUAL: SendResult.BLOCKED_ADDRESS,
}
SUPPRESSED_REASONS = {
    Suppression.HARD_BOUNCE: "earlier mail to it bounced",
    Suppression.SPAM_REPORT: "it reported earlier mail as spam",
    Suppression.MANUAL: "it was added to the suppression list",
}


class SendError(Exception):
    """A send refused before spooling: ``send_result`` (HubSpot enum) and the field."""

    def __init__(
        self, send_result: SendResult, field: str, message: str, *, recipient: str | None = None
    ) -> None:
        super().__init__(message)
        self.send_result = send_result
        self.field = field
        self.message = message
        self.recipient = recipient  # the one refused, when one recipient is the reason

    @property
    def rejected(self) -> Rejected:
        """The SMTP reply of this refusal (a template send over SMTP)."""
        code = "550 5.1.1" if self.send_result == SendResult.INVALID_TO_ADDRESS else "550 5.6.0"
        return Rejected("template", f"{code} {self.send_result} {self.field}: {self.message}")


def is_role_address(address: str) -> bool:
    return address.rpartition("@")[0].lower() in ROLE_LOCAL_PARTS


def suppression_reasons(config: DynamicConfig | None) -> list[Suppression]:
    """The suppression entries enforced: MANUAL ones always, the automatic ones (hard
    bounces, complaints) only when the DedicatedIP opted in (off by default)."""
    if config is None:
        return []
    opted = config.relay.suppression
    return [
        reason
        for reason, on in (
            (Suppression.HARD_BOUNCE, opted.bounces),
            (Suppression.MANUAL, True),
            (Suppression.SPAM_REPORT, opted.complaints),
        )
        if on
    ]


def domain_allowed(config: DynamicConfig, entry: CredentialEntry, domain: str) -> bool:
    """``domain`` (lowercase) is one of the IP's domains and one the token may send from."""
    relay_domains = {d.lower() for d in config.relay.domains}
    token_domains = {d.lower() for d in entry.allowed_from_domains}
    return domain in relay_domains and domain in token_domains


def sender_allowed(config: DynamicConfig, entry: CredentialEntry, address: str) -> bool:
    return domain_allowed(config, entry, domain_of(address))


def check_envelope_address(address: str) -> Verdict:
    """MAIL FROM and RCPT TO: an address the delivery path can send (aiosmtpd accepts some,
    such as ``<">`` or non-ASCII without SMTPUTF8, that aiosmtplib then refuses: the message
    would be retried until it expires). The null sender is left to :func:`check_sender`."""
    if address and not is_smtp_address(address):
        return Rejected("syntax", "553 5.1.3 Not an address this relay can deliver to")
    return ACCEPTED


def check_sender(
    config: DynamicConfig | None, entry: CredentialEntry | None, address: str
) -> Verdict:
    """MAIL FROM: the envelope sender's domain."""
    if config is None or entry is None or not sender_allowed(config, entry, address):
        return Rejected("sender", f"553 5.7.1 Sender domain {domain_of(address)} not allowed")
    return ACCEPTED


def check_header_from(
    config: DynamicConfig | None, entry: CredentialEntry, headers: SubmittedHeaders
) -> Verdict:
    """DATA: exactly one From header; every originator field (From, Sender, Resent-*) parses
    cleanly into mailboxes, each of whose domains is allowed like MAIL FROM's."""
    if headers.from_domains is None:
        problem = headers.from_problem or "Exactly one valid From header needed"
        return Rejected("from-header", f"550 5.7.1 {problem}")
    for domain in headers.from_domains:
        if config is None or not domain_allowed(config, entry, domain):
            return Rejected("from-header", f"553 5.7.1 From header domain {domain} not allowed")
    return ACCEPTED


def check_content(content: bytes) -> Verdict:
    """DATA: no NUL anywhere (RFC 5321 §4.5.2, RFC 5322 §2.1): an upstream that drops NULs
    would read ``CRLF NUL . CRLF`` as the end of the data, and what follows as commands."""
    if b"\x00" in content:
        return Rejected("nul", "550 5.6.0 NUL characters are not allowed in a message")
    return ACCEPTED


def check_suppressed(address: str, reason: Suppression | None) -> Verdict:
    """RCPT TO: a recipient the DedicatedIP suppresses (``reason`` from the records)."""
    if reason is None:
        return ACCEPTED
    return Rejected(
        "suppressed",
        f"550 5.7.1 <{address}> suppressed on this relay: {SUPPRESSED_REASONS[reason]} "
        f"({SUPPRESSED_RESULTS[reason]})",
    )


def role_refusal(to: Iterable[str]) -> SendError | None:
    """Template sends: HubSpot refuses role addresses (``abuse@``, ``noreply@``) as ``to``."""
    for rcpt in to:
        if is_role_address(rcpt):
            return SendError(
                SendResult.INVALID_TO_ADDRESS, "message.to", f"role address {rcpt} not allowed"
            )
    return None


def suppressed_refusal(to: Iterable[str], found: dict[str, Suppression]) -> SendError | None:
    """Template sends: a suppressed ``to`` is refused (suppressed cc and bcc are left out)."""
    for rcpt in to:
        if rcpt in found:
            reason = found[rcpt]
            return SendError(
                SUPPRESSED_RESULTS[reason],
                "message.to",
                f"{rcpt} is suppressed on this relay: {SUPPRESSED_REASONS[reason]}",
                recipient=rcpt,
            )
    return None


#: How deep property values may nest (HubSpot's are flat; lists of objects need 3 levels).
MAX_PROPERTY_DEPTH = 16
#: The largest emailId: records keep it as a signed 64-bit integer.
MAX_EMAIL_ID = 2**63 - 1


def _surrogate_or_nul(text: str) -> bool:
    # A lone surrogate cannot be encoded as UTF-8 (the message, the records); a NUL would
    # reach the upstream inside a 7bit body (see check_content).
    return "\x00" in text or any("\ud800" <= ch <= "\udfff" for ch in text)


def property_refusal(value: object, field: str) -> SendError | None:
    """Properties that cannot be rendered into mail safely: nested past
    :data:`MAX_PROPERTY_DEPTH`, NaN or Infinity, or with a NUL or lone surrogate in a key or
    a string. The
    walk is iterative, so any depth the JSON parser accepted is checked without recursion."""
    stack: list[tuple[object, str, int]] = [(value, field, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_PROPERTY_DEPTH:
            return SendError(
                SendResult.VALIDATION_FAILED,
                where,
                f"{where} nests more than {MAX_PROPERTY_DEPTH} levels deep",
            )
        if isinstance(item, str):
            if _surrogate_or_nul(item):
                return SendError(
                    SendResult.VALIDATION_FAILED,
                    where,
                    f"{where} contains a NUL character or an invalid surrogate",
                )
        elif isinstance(item, float) and not math.isfinite(item):
            return SendError(
                SendResult.VALIDATION_FAILED, where, f"{where} is not a finite number"
            )  # NaN and Infinity: Python's JSON reads them, JSON has neither
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or _surrogate_or_nul(key):
                    return SendError(
                        SendResult.VALIDATION_FAILED, where, f"{where} has an invalid key"
                    )
                stack.append((child, f"{where}.{key}" if depth == 0 else where, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, where, depth + 1) for child in item)
    return None


def parse_email_id(value: object, field: str) -> int:
    """A positive emailId from an int or a string of ASCII digits; raises :class:`SendError`
    (``str.isdigit`` accepts ``²`` and ``٣``; ``int`` refuses the first and 4,300 digits)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_EMAIL_ID:
        raise SendError(
            SendResult.VALIDATION_FAILED,
            field,
            "emailId is required and must be a positive integer",
        )
    return value


def find_template(config: DynamicConfig, entry: CredentialEntry, email_id: int) -> TemplateEntry:
    """The template if it is in the token's namespace (others look exactly like missing).

    The operator's scheduler credential may send any template published to this relay.
    """
    template = config.templates.get(email_id)
    if template is None or (template.namespace != entry.namespace and not entry.scheduler):
        raise SendError(SendResult.MISSING_CONTENT, "emailId", f"no email with id {email_id}")
    return template
