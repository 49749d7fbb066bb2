"""The header block of a submitted message, and the Received header the relay adds (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE_HELO = re.compile(r"[^\x21-\x7e]")


def header_block(content: bytes) -> bytes:
    """The headers of a message: everything before the first empty line (or all of it)."""
    match = _HEADER_END.search(content)
    return content[: match.start()] if match else content


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
        f"with {origin.protocol};\r\n\t{formatdate(when, usegmt=True)}\r\n"
    ).encode("ascii", "replace")
