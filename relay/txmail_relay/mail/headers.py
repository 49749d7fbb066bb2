"""The header section of a submitted message, and the Received header the relay adds (pure).

:func:`header_fields` reads the header section the way the upstream will receive it: the
delivery path (aiosmtplib) turns every bare CR and bare LF into CRLF, so lines are split on all
three here too, and the section ends at the first empty line. RFC 5322 §2.2 and §4.5 decide
what a field is: a name of printable ASCII without ``:``, optional white space (obsolete
syntax, ``From :``), then ``:``; a line starting with white space continues the field before
it. The stdlib parser is not used for this: it treats ``From x`` as an mbox envelope line,
ends the section silently at a line that is no field, and cannot say which lines it skipped,
so a second ``From`` could hide from it that a receiver would still read.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # what aiosmtplib rewrites to CRLF on the way out
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.DOTALL)
_UNSAFE_HELO = re.compile(r"[^\x21-\x7e]")
#: A header section past these is refused (read on the event loop: bounded work per DATA).
#: Postfix caps one header at 100 KiB; real mail has tens of fields, signed mail a few KiB.
MAX_HEADER_FIELDS = 1_000
MAX_HEADER_BYTES = 256 * 1024


@dataclass(frozen=True)
class HeaderFields:
    """The fields of a header section, unfolded, names as written; ``malformed`` says why a
    line was neither a field nor a continuation (None: every line was one)."""

    fields: tuple[tuple[str, str], ...]
    malformed: str | None

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.fields if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        found = self.get_all(name)
        return found[0] if found else None

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip(" \t")


def _lines(content: bytes) -> Iterator[bytes]:
    """The lines of ``content``, lazily (the body after the header section is never split)."""
    start = 0
    for match in _LINE_BREAK.finditer(content):
        yield content[start : match.start()]
        start = match.end()
    yield content[start:]


def header_fields(content: bytes) -> HeaderFields:
    """The header section of ``content`` as fields (pure, never raises)."""
    fields: list[tuple[str, str]] = []
    malformed = None
    name: bytes | None = None
    value: list[bytes] = []
    size = 0
    for line in _lines(content):
        if not line:
            break  # the empty line that ends the header section
        size += len(line) + 2
        if size > MAX_HEADER_BYTES or len(fields) >= MAX_HEADER_FIELDS:
            malformed = "the header section is too large"
            break
        if line[:1] in (b" ", b"\t"):
            if name is None:
                malformed = malformed or "the header section starts with a continuation line"
            else:
                value.append(line)
            continue
        if name is not None:
            fields.append((name.decode("ascii"), _text(b"".join(value))))
            name, value = None, []
        match = _FIELD.fullmatch(line)
        if match is None:
            malformed = malformed or "a header line is not a field"
            continue
        name, value = match.group(1), [match.group(2)]
    if name is not None:
        fields.append((name.decode("ascii"), _text(b"".join(value))))
    return HeaderFields(tuple(fields), malformed)


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The RFC 5322 date of one second: formatdate() costs a few microseconds more than the
    rest of the header, and every message of a second has the same one."""
    return formatdate(second, usegmt=True)


@dataclass(frozen=True)
class Origin:
    """Where a message came from, for its Received header.

    ``helo`` is the SMTP client's EHLO name (None for the HTTP API), ``by`` the relay's
    hostname and ``protocol`` the RFC 3848 ``with`` keyword (``ESMTPSA``, ``HTTP``).
    """

    peer: str
    by: str
    protocol: str
    helo: str | None = None


def received_header(origin: Origin, *, when: float | None = None) -> bytes:
    """The trace header (RFC 5321 §4.4) the relay puts in front of every spooled body."""
    source = f"[{origin.peer}]"
    if origin.helo is not None:
        helo = _UNSAFE_HELO.sub("", origin.helo or "unknown")[:255]
        source = f"{helo} ({source})"
    return (
        f"Received: from {source}\r\n\tby {origin.by} (txmail) "
        f"with {origin.protocol};\r\n\t{_rfc5322_date(int(time.time() if when is None else when))}"
        "\r\n"
    ).encode("ascii", "replace")
