"""The return path (envelope sender) of delivery attempts: VERP per message (pure).

With a return-path domain configured (``RelayConfig.returnPath``), each delivery attempt's
MAIL FROM is ``<localPart>+<spool id>@<domain>``: a DSN that comes back later (RFC 3464, sent to
the reverse path) names the message it is about in its envelope recipient, whatever the far
MTA kept of the original. The recipient it is about comes from the DSN's own fields
(Final-/Original-Recipient), so the tag stays per message and the spool id is all it carries
(an opaque random value, nothing about the app or the recipient). The header From is never
touched. Mail with the null reverse path ``<>`` (a DSN itself) keeps it.

The encoding is this module's alone: the inbound listener decodes what the delivery encodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from txmail_relay.contract import ReturnPathConfig

#: A spool id as the spool makes them (``secrets.token_hex(8)``): 16 lowercase hex digits.
SPOOL_ID = re.compile(r"[0-9a-f]{16}")
#: The tag separator (Postfix's recipient_delimiter default, and what Sendmail, Exim and most
#: hosted mailboxes use).
DELIMITER = "+"
#: The null reverse path as the spool may hold it (aiosmtpd reads ``MAIL FROM:<>`` as "<>").
NULL_SENDERS = frozenset({"", "<>"})


@dataclass(frozen=True)
class ReturnPath:
    """A return-path domain and local part (``ReturnPathConfig`` in a pure form)."""

    domain: str
    local_part: str = "bounces"

    @classmethod
    def of(cls, config: ReturnPathConfig) -> ReturnPath | None:
        """The return path ``config`` asks for; None when no domain is configured."""
        if not config.domain:
            return None
        return cls(config.domain.lower(), config.local_part.lower())

    def encode(self, spool_id: str) -> str:
        """``<localPart>+<spool id>@<domain>``; raises ValueError for an id the spool does not
        make (it would not decode)."""
        if not SPOOL_ID.fullmatch(spool_id):
            raise ValueError("not a spool id")
        return f"{self.local_part}{DELIMITER}{spool_id}@{self.domain}"

    def decode(self, address: str) -> str | None:
        """The spool id ``address`` carries, or None if it is not one of ours.

        Case-insensitive (domains are, and some MTAs fold local parts: RFC 5321 2.4 lets a
        server treat them so); strict otherwise: exactly one tag, a well-formed id, no
        angle brackets, spaces or source routes. Never raises.
        """
        if not isinstance(address, str) or len(address) > 320:
            return None
        local, at, domain = address.strip().lower().rpartition("@")
        if not at or domain.rstrip(".") != self.domain:
            return None
        base, delimiter, tag = local.partition(DELIMITER)
        if not delimiter or base != self.local_part or not SPOOL_ID.fullmatch(tag):
            return None
        return tag

    def is_ours(self, address: str) -> bool:
        return self.decode(address) is not None


def envelope_sender(mail_from: str, spool_id: str, return_path: ReturnPath | None) -> str:
    """The MAIL FROM of a delivery attempt of the message ``spool_id`` sent as ``mail_from``:
    the VERP address when a return path is configured, else ``mail_from``; ``<>`` (empty)
    stays empty, and an id that cannot be encoded keeps the app's sender."""
    if return_path is None or mail_from in NULL_SENDERS:
        return mail_from
    try:
        return return_path.encode(spool_id)
    except ValueError:
        return mail_from
