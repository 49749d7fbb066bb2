"""Build the MIME message of one send from its :class:`~txmail_relay.templating.Rendered` parts.

Only the stdlib ``email`` package writes MIME here. The message is ``multipart/alternative``
(text, then HTML) or a single part when only one exists. Bodies are UTF-8 and, through a
``7bit`` policy, ASCII-only on the wire: 7bit when already ASCII with short lines, otherwise
quoted-printable or base64, whichever the ``email`` package finds shorter. No line exceeds
998 octets (RFC 5322 §2.1.1): :func:`to_bytes` checks it.

Header injection (S8): values are stripped of line breaks (:func:`header_safe`), the
``email`` package refuses CR/LF in values, and :data:`POLICY` re-checks every folded header
the way CPython's ``verify_generated_headers`` does (CVE-2024-6923; this runtime may predate
it), so no value can produce a header of its own.

Bcc addresses never appear in the message: they are only in :attr:`Outgoing.recipients`.
Addresses are ASCII addr-specs (``user@example.com``); SMTPUTF8 is not supported.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime
from typing import Any

from txmail_relay.mail.addresses import AddressError, is_smtp_address, mailboxes
from txmail_relay.templates.policy import Rendered, header_safe

MAX_LINE_OCTETS = 998
_NEWLINE_WITHOUT_FWSP = re.compile(r"\r\n[^ \t]|\r[^ \n\t]|\n[^ \t]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_ID_TOKEN = re.compile(r"[A-Za-z0-9._-]{8,128}")
_FOLD_AT = 78  # RFC 5322 §2.1.1's recommended line length
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]{1,64}")  # atoms and spaces
_MANAGED = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version"}
)


class MimeError(ValueError):
    """The message cannot be built or serialised safely."""


class HeaderInjectionError(MimeError):
    """A header value would have produced a line that is not its own continuation."""


def _verify_folded(name: str, folded: str, linesep: str) -> None:
    if not folded.endswith(linesep) or _NEWLINE_WITHOUT_FWSP.search(folded[: -len(linesep)]):
        raise HeaderInjectionError(f"header {name!r} would contain a line break")


class _SafePolicy(EmailPolicy):
    """``email.policy.SMTP`` (CRLF) with 7bit bodies and a check of every folded header."""

    def fold(self, name: str, value: str) -> str:
        folded: str = super().fold(name, value)
        _verify_folded(name, folded, self.linesep)
        return folded

    def fold_binary(self, name: str, value: str) -> bytes:
        folded: bytes = super().fold_binary(name, value)
        _verify_folded(name, folded.decode("ascii", "surrogateescape"), self.linesep)
        return folded


#: Policy of every message built here (immutable, like all ``email`` policies).
POLICY: EmailPolicy = _SafePolicy(linesep="\r\n", cte_type="7bit")


@dataclass(frozen=True)
class Outgoing:
    message: EmailMessage
    recipients: tuple[str, ...]  # envelope RCPT TO: to + cc + bcc, deduplicated
    message_id: str


def random_id_token() -> str:
    return secrets.token_hex(16)


def address(addr_spec: str, display_name: str | None = None) -> Address:
    """A validated ASCII address; raises :class:`MimeError`."""
    if not is_smtp_address(addr_spec):
        raise MimeError(f"invalid address {addr_spec!r}")
    try:
        [mailbox] = mailboxes(addr_spec)  # the strict reading the sender policy uses
        parsed = Address(display_name=header_safe(display_name or ""), addr_spec=addr_spec)
    except (AddressError, HeaderParseError, ValueError, IndexError, AttributeError) as e:
        # AttributeError: Address() on ``0@[@0`` (a defect where a token was expected)
        raise MimeError(f"invalid address {addr_spec!r}") from e
    if parsed.addr_spec != addr_spec or mailbox.addr_spec.lower() != addr_spec.lower():
        raise MimeError(f"invalid address {addr_spec!r}")
    return parsed


def from_value(sender: Address) -> str:
    """The From field's value, folded here rather than by the email package.

    The email package's folding of a long address header drops the quotes and parentheses
    of a display name (CPython: ``"x... <b@evil.test> y..." <a@example.com>`` came out as
    ``x... <b@evil.test> y... <a@example.com>``, which a receiver can read as b@evil.test).
    So a display name of atoms and spaces is written as it is, any other as RFC 2047 encoded
    words (which contain no specials), each fold at white space between whole words; the
    result is checked with the sender policy's parser. Raises :class:`MimeError`.
    """
    name, addr = sender.display_name, sender.addr_spec
    if not name:
        value = addr
    else:
        if _PLAIN_NAME.fullmatch(name):
            words = " ".join(name.split())
        else:
            words = Header(name, "utf-8", maxlinelen=76, header_name="From").encode(linesep="\r\n")
        last = words.rpartition("\r\n")[2]
        fits = len("From: ") + len(last) + len(addr) + 3 <= _FOLD_AT
        value = words + (" <" if fits else "\r\n <") + addr + ">"
    try:
        [mailbox] = mailboxes(re.sub(r"\r\n(?=[ \t])", "", value))
    except (AddressError, ValueError) as e:
        raise MimeError(f"the From display name cannot be written safely: {e}") from e
    if mailbox.addr_spec.lower() != addr.lower():
        raise MimeError("the From display name cannot be written safely")
    return value


def _addresses(values: Sequence[str]) -> list[Address]:
    return [address(v) for v in values]


def build_message(
    rendered: Rendered,
    *,
    from_address: str,
    from_name: str | None = None,
    to: Sequence[str],
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    reply_to: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    id_token: str | None = None,
    make_id_token: Callable[[], str] = random_id_token,
    now: datetime | None = None,
) -> Outgoing:
    """Build the message. ``id_token`` (or ``make_id_token()``) is the random part of the
    Message-ID, whose domain is the sender's. Raises :class:`MimeError`."""
    sender = address(from_address, from_name)
    if not to:
        raise MimeError("at least one 'to' address is required")
    to_addrs, cc_addrs, bcc_addrs = _addresses(to), _addresses(cc), _addresses(bcc)
    token = id_token if id_token is not None else make_id_token()
    if not _ID_TOKEN.fullmatch(token):
        raise MimeError("invalid Message-ID token")
    message_id = f"<{token}@{sender.domain}>"
    when = now or datetime.now(UTC)
    if when.tzinfo is None:
        raise MimeError("'now' must be timezone-aware")

    msg = EmailMessage(policy=POLICY)
    msg.set_raw("From", from_value(sender))  # written as computed, never refolded
    msg["To"] = to_addrs
    if cc_addrs:
        msg["Cc"] = cc_addrs
    if reply_to:
        msg["Reply-To"] = _addresses(reply_to)
    msg["Subject"] = header_safe(rendered.subject)
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        if (
            not _HEADER_NAME.fullmatch(name)
            or name.lower() in _MANAGED
            or name.lower().startswith("content-")
        ):
            raise MimeError(f"header {name!r} cannot be set")
        if value != header_safe(value):
            raise HeaderInjectionError(
                f"header {name!r} contains a line break or control character"
            )
        msg[name] = value

    text, html = rendered.text or None, rendered.html or None
    if text is not None and html is not None:
        msg.set_content(text, subtype="plain", charset="utf-8")
        msg.add_alternative(html, subtype="html", charset="utf-8")
    elif html is not None:
        msg.set_content(html, subtype="html", charset="utf-8")
    elif text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8")
    else:
        raise MimeError("the message has neither a text nor an HTML part")
    for part in msg.iter_parts():
        del part["MIME-Version"]  # add_alternative puts it on the subpart too

    recipients = tuple(dict.fromkeys(a.addr_spec for a in (*to_addrs, *cc_addrs, *bcc_addrs)))
    to_bytes(msg)  # fail now, not at delivery, if it cannot be written safely
    return Outgoing(msg, recipients, message_id)


def to_bytes(msg: EmailMessage, policy: Any = POLICY) -> bytes:
    """Wire form (CRLF). Raises :class:`MimeError` on an unsafe header or a line over 998."""
    try:
        data = msg.as_bytes(policy=policy)
    except HeaderInjectionError:
        raise
    except (ValueError, TypeError, LookupError) as e:
        raise MimeError(f"cannot serialise message: {e}") from e
    if b"\x00" in data:  # never in mail: see sending.policy.check_content
        raise MimeError("the message would contain a NUL character")
    for line in data.split(b"\r\n"):
        if len(line) > MAX_LINE_OCTETS:
            raise MimeError(f"a line of {len(line)} octets exceeds {MAX_LINE_OCTETS}")
    return data
