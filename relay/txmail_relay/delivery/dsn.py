"""The DSNs the relay sends when it gives up on recipients (RFC 3461 §5, RFC 3464).

The queue hands over, per attempt, the recipients of one message it bounced or expired
(:meth:`DsnNotifier.notify`); the DedicatedIP's ``RelayConfig.dsn.notify`` policy and each
recipient's NOTIFY decide which of them the sender hears of; one report names them all and
is spooled like any message, from the null reverse path ``<>`` (so no DSN is ever sent about
it) to the original envelope sender, under the reserved username ``""`` (:data:`DSN_USERNAME`):
the relay's own mail is no token's, so the records count nothing and write no event nor
suppression for it (a DSN that bounces must not suppress the app's own sender, nor count
against its token); the metrics still count it. Messages without DSN parameters
(API and template sends: their send status and events say what happened) never get here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import DsnPolicy
from txmail_relay.mail.dsn import FailedRecipient, build_dsn
from txmail_relay.spool.segments import SpooledMessage

log = logging.getLogger(__name__)

#: The username of the mail the relay itself spools (its DSNs): no token's.
DSN_USERNAME = ""


class DsnSpool(Protocol):
    async def append(
        self, mail_from: str, recipients: list[str], username: str, body: bytes
    ) -> SpooledMessage: ...


class DsnNotifier:
    def __init__(
        self, config: LiveConfig, spool: DsnSpool, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config
        self._spool = spool
        self._clock = clock

    async def notify(
        self, msg: SpooledMessage, failed: Sequence[FailedRecipient], original: bytes | None
    ) -> SpooledMessage | None:
        """Spool one DSN about the ``failed`` recipients the policy reports; None: none.
        Raises SpoolError when the spool cannot take it (the queue logs it and goes on)."""
        config = self._config.current
        policy = config.relay.dsn.notify if config is not None else DsnPolicy.ON_REQUEST
        wanted = [f for f in failed if f.params.wants_failure(policy)]
        if not wanted or not msg.mail_from or msg.dsn is None:
            return None
        hostname = config.relay.hostname if config is not None else "localhost"
        report = build_dsn(
            hostname=hostname,
            sender=msg.mail_from,
            failed=wanted,
            original=original,
            arrived=msg.received_at,
            envelope=msg.dsn,
            now=self._clock(),
        )
        spooled = await self._spool.append("", [msg.mail_from], DSN_USERNAME, report)
        log.info(
            "DSN queued",
            extra={
                "msg_id": msg.id,
                "dsn_id": spooled.id,
                "token": msg.username,
                "recipients": len(wanted),
            },
        )
        return spooled
