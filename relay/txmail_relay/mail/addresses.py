"""Address parsing shared by the submission parser, the sender policy and the API (pure).

Two readings of an address list:

* :func:`mailboxes` is strict, for what the sender policy decides on (From, Sender, the API's
  ``from``): the value must parse cleanly, as RFC 5322 mailboxes and nothing else, and two
  independent parsers must agree on it. Receivers differ in how they read a malformed list
  (``a@example.com; b@evil.test``, ``<a@example.com> b@evil.test``); a value they could read
  in two ways is refused, never guessed at (:class:`AddressError`).
* :func:`addr_specs` is lenient and never raises, for what only picks among recipients the
  envelope already names (To and Cc of a template send or of tracked mail).

Both use the stdlib: :mod:`email.headerregistry` (the RFC 5322 parser behind
``email.policy.default``, which reports every deviation as a defect) and
:func:`email.utils.getaddresses` (the older ``_parseaddr`` reader) as the second opinion.
Both can fail on hostile input with errors that are not ``ValueError`` (an ``IndexError`` on
``"``, a ``RecursionError`` on 3,000 nested comments), so every call is guarded here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.headerregistry import AddressHeader, BaseHeader, HeaderRegistry
from email.utils import getaddresses
from typing import cast

#: The longest header value parsed: a folded From of about 40 mailboxes. Longer is refused
#: before parsing (the stdlib parser is quadratic on some inputs).
MAX_VALUE_LENGTH = 4096
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_LOCAL_PART = re.compile(r"[!-~]{1,64}")
_ATEXT = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: An envelope address the relay can deliver: RFC 5321 Dot-string local part (no quoted
#: strings), a hostname domain, ASCII only (SMTPUTF8 is not offered).
_SMTP_ADDRESS = re.compile(
    rf"(?=[^@]{{1,64}}@.{{1,253}}\Z){_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*",
    re.IGNORECASE,
)
#: The registry's From header class, made once: ``HeaderRegistry()("From", v)`` builds a new
#: class on every call (``type()`` in ``__getitem__``), most of a short value's parse time.
_FROM_HEADER = HeaderRegistry()["From"]
#: Distinct From-like values whose verdict is kept (an app sends from a few addresses).
CACHE_SIZE = 1024


class AddressError(ValueError):
    """An address list that does not parse cleanly into mailboxes; the message says why."""


@dataclass(frozen=True)
class Mailbox:
    display_name: str
    local_part: str
    domain: str  # lowercase hostname (a domain literal is never a Mailbox)

    @property
    def addr_spec(self) -> str:
        return f"{self.local_part}@{self.domain}"


def is_smtp_address(address: str) -> bool:
    """``local@domain`` as the delivery path can send it (a regex: RFC 5321's grammar for
    a Dot-string is small, and the parsers above accept forms aiosmtplib then refuses)."""
    return _SMTP_ADDRESS.fullmatch(address) is not None


def domain_of(address: str) -> str:
    """The lowercased domain of an addr-spec (everything after the last ``@``)."""
    return address.rpartition("@")[2].lower()


def mailboxes(value: str) -> tuple[Mailbox, ...]:
    """The mailboxes of a ``From``-like header value, strictly; raises :class:`AddressError`.

    Refused: anything the parser reports a defect for (invalid or obsolete syntax, a missing
    ``>``, text after an address, a source route, non-printable characters), groups, an empty
    list, a local part outside printable ASCII, a domain that is not a hostname (a domain
    literal, a trailing dot, an encoded word), and a value the second parser reads otherwise.
    """
    if len(value) > MAX_VALUE_LENGTH:  # before the cache: it keeps only values parsed
        raise AddressError("the address list is too long")
    verdict = _verdict(value)
    if isinstance(verdict, str):
        raise AddressError(verdict)
    return verdict


@functools.lru_cache(maxsize=CACHE_SIZE)
def _verdict(value: str) -> tuple[Mailbox, ...] | str:
    """:func:`mailboxes`' answer: the mailboxes, or why they are refused. Cached by value (the
    verdict depends on nothing else; a Mailbox is immutable): every message repeats its app's
    From, and both parsers cost a few hundred microseconds per value. Bounded: CACHE_SIZE
    values of at most MAX_VALUE_LENGTH characters."""
    try:
        return _parse_mailboxes(value)
    except AddressError as e:
        return str(e)


def _parse_mailboxes(value: str) -> tuple[Mailbox, ...]:
    try:
        header = cast(AddressHeader, _FROM_HEADER("From", value))  # an address header
        defects = list(cast(BaseHeader, header).defects)  # an AddressHeader is one
        groups = header.groups
        parsed = [(a.display_name, a.username, a.domain) for a in header.addresses]
    except Exception as e:  # the parser's own failures on hostile input, RecursionError included
        raise AddressError("the address list does not parse") from e
    if defects:
        raise AddressError(f"the address list is malformed ({defects[0]})")
    if any(g.display_name is not None for g in groups):
        raise AddressError("a group is not allowed here")
    if not parsed:
        raise AddressError("no address")
    found = []
    for name, local, domain in parsed:
        lowered = domain.lower()
        if not _LOCAL_PART.fullmatch(local) or not _HOSTNAME.fullmatch(lowered):
            raise AddressError(f"not a usable address: {local}@{domain}")
        found.append(Mailbox(name, local, lowered))
    if _second_opinion(value) != [m.addr_spec.lower() for m in found]:
        raise AddressError("the address list is ambiguous")
    return tuple(found)


def _second_opinion(value: str) -> list[str] | None:
    """The addr-specs :func:`email.utils.getaddresses` reads in ``value`` (None: it failed)."""
    try:
        pairs = getaddresses([value])
    except Exception:  # RecursionError on nested comments, among others
        return None
    return [addr.lower() for _, addr in pairs if addr]


def addr_specs(values: Iterable[str]) -> tuple[str, ...]:
    """The non-empty addr-specs of header values (``Name <a@b>, c@d``), in order; a value
    that does not parse contributes nothing (never raises)."""
    found: list[str] = []
    for value in values:
        if len(value) > MAX_VALUE_LENGTH:
            continue
        try:
            found.extend(addr for _, addr in getaddresses([value]) if addr)
        except Exception:  # noqa: S112 - a value the parser cannot read names nobody
            continue
    return tuple(found)
