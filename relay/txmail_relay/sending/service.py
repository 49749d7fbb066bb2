"""The send service: compose, spool and record a message, for SMTP and the API alike.

:meth:`SendService.accept` is the one path every accepted message takes: a template send
(the API's JSON, or SMTP mail with ``X-Txmail-Email-Id``) is rendered and built, plain SMTP
mail is tracked or kept as it came (:class:`~txmail_relay.sending.composer.Composer`, in a
worker thread when it parses the body: CPU-bound); the copies go into the durable spool with
the relay's Received header, so delivery, retries and metrics are shared; then the send is
recorded in the :class:`~txmail_relay.records.records.Records` (awaited: a 250 or an API 200
means both).
:meth:`SendService.send` adds what only the API has: the sendId reservation and the
suppressed cc and bcc left out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import CredentialEntry, SendResult, TemplateEntry
from txmail_relay.mail.dsn import DsnEnvelope
from txmail_relay.mail.headers import Origin, received_header
from txmail_relay.mail.submission import Submission
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.database import background
from txmail_relay.records.model import SentCopy
from txmail_relay.records.records import Records
from txmail_relay.sending.composer import Composer
from txmail_relay.sending.model import Copy, SendOutcome, SendRequest
from txmail_relay.sending.policy import (
    ACCEPTED,
    SUPPRESSED_RESULTS,
    SendError,
    Verdict,
    check_suppressed,
    find_template,
    role_refusal,
    suppressed_refusal,
    suppression_reasons,
)
from txmail_relay.sending.smtp_templates import template_request
from txmail_relay.spool.segments import SpooledMessage

log = logging.getLogger(__name__)


class Spooler(Protocol):
    async def append(
        self,
        mail_from: str,
        recipients: list[str],
        username: str,
        body: bytes,
        *,
        dsn: DsnEnvelope | None = None,
    ) -> SpooledMessage: ...


class SendService:
    """Checks, reserves the sendId, composes in a thread, spools durably, records."""

    def __init__(
        self,
        config: LiveConfig,
        composer: Composer,
        spool: Spooler,
        records: Records,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._composer = composer
        self._spool = spool
        self._records = records
        self._metrics = metrics

    def check(self, entry: CredentialEntry, request: SendRequest) -> TemplateEntry:
        """Checks that need no rendering; raises :class:`SendError`."""
        config = self._config.current
        if config is None:
            raise SendError(SendResult.VALIDATION_FAILED, "emailId", "relay is not configured yet")
        refused = role_refusal(request.to)
        if refused is not None:
            raise refused
        return find_template(config, entry, request.email_id)

    async def check_recipient(self, address: str, entry: CredentialEntry | None = None) -> Verdict:
        """RCPT TO: refused when the address is suppressed in the token's namespace (a
        DROPPED event); without a token only relay-wide entries apply."""
        reasons = suppression_reasons(self._config.current)
        if not reasons:
            return ACCEPTED
        namespace = entry.namespace if entry is not None else ""
        found = await self._records.suppressions.find(namespace, [address], reasons)
        verdict = check_suppressed(address, found.get(address))
        reason = found.get(address)
        if entry is not None and reason is not None:
            self._dropped(entry, 0, [address], SUPPRESSED_RESULTS[reason], "suppressed at RCPT")
        return verdict

    def _dropped(
        self,
        entry: CredentialEntry,
        email_id: int,
        recipients: Sequence[str],
        result: SendResult,
        message: str,
    ) -> None:
        """Log a refused send (counted as dropped, a DROPPED event per recipient); not
        awaited: the refusal does not depend on it (a failure is logged)."""
        background(
            self._records.sends.dropped(
                entry.username,
                email_id,
                recipients,
                result.value,
                message,
                namespace=entry.namespace,
                token=entry.token,
            )
        )

    async def send(self, entry: CredentialEntry, request: SendRequest, peer: str) -> SendOutcome:
        """An API send: deduplicated by its sendId; raises :class:`SendError` (and logs the
        refusal as a DROPPED event)."""
        try:
            return await self._send(entry, request, peer)
        except SendError as e:
            refused = [e.recipient] if e.recipient is not None else list(request.to)
            self._dropped(entry, request.email_id, refused, e.send_result, e.message)
            raise

    async def _send(self, entry: CredentialEntry, request: SendRequest, peer: str) -> SendOutcome:
        self.check(entry, request)  # refuse before reserving
        config = self._config.current
        assert config is not None  # noqa: S101 - check() raised otherwise
        status, created = await self._records.sends.reserve(
            entry.username,
            request.send_id,
            request.email_id,
            request.to[0],
        )
        if not created:
            return SendOutcome(status, duplicate=True)
        origin = Origin(peer=peer, by=config.relay.hostname, protocol="HTTP")
        try:
            request = await self._without_suppressed(entry, config, request)
            await self.accept(entry, request, origin, status_id=status.status_id)
        except BaseException:
            await self._records.sends.release(status.status_id)  # finishes if cancelled
            raise
        latest = await self._records.sends.get(entry.username, status.status_id)
        return SendOutcome(latest or status, duplicate=False)

    async def accept(
        self,
        entry: CredentialEntry,
        message: Submission | SendRequest,
        origin: Origin,
        *,
        status_id: str | None = None,
    ) -> list[SpooledMessage]:
        """Compose, spool and record one message (SMTP mail, or a template send).

        Raises :class:`SendError` for a template send refused before spooling and
        :class:`~txmail_relay.spool.segments.SpoolError` when spooling failed. ``status_id``
        is the API's reservation, queued with the send.
        """
        config = self._config.current
        if isinstance(message, Submission) and message.headers.template is not None:
            try:
                request = template_request(message)
                copies = await self._compose(entry, request)
            except SendError as e:  # an SMTP template send refused: logged as dropped
                self._dropped(entry, 0, list(message.recipients), e.send_result, e.message)
                raise
            message = request
        elif isinstance(message, SendRequest):
            copies = await self._compose(entry, message)
        elif self._composer.plain_is_cheap(config, message):
            copies = self._composer.plain(config, message)  # as it came: nothing to compute
        else:  # its body is parsed and maybe rewritten (ms for a small HTML mail): a thread
            copies = await asyncio.to_thread(self._composer.plain, config, message)
        # Plain SMTP mail keeps its DSN parameters (a template send has its send status).
        plain = message if isinstance(message, Submission) else None
        spooled = await self._spool_copies(entry, copies, received_header(origin), plain)
        await self._record(entry, message, copies, spooled, status_id)
        return spooled

    async def _compose(self, entry: CredentialEntry, message: SendRequest) -> Sequence[Copy]:
        template = self.check(entry, message)
        config = self._config.current
        assert config is not None  # noqa: S101 - check() raised otherwise
        return await asyncio.to_thread(self._composer.compose, config, entry, template, message)

    async def _without_suppressed(
        self, entry: CredentialEntry, config: DynamicConfig, request: SendRequest
    ) -> SendRequest:
        """Refuse a suppressed ``to`` (:class:`SendError`); drop suppressed cc and bcc."""
        reasons = suppression_reasons(config)
        if not reasons:
            return request
        everyone = (*request.to, *request.cc, *request.bcc)
        found = await self._records.suppressions.find(entry.namespace, everyone, reasons)
        if not found:
            return request
        refused = suppressed_refusal(request.to, found)
        if refused is not None:
            raise refused
        log.info(
            "suppressed recipients left out",
            extra={"token": entry.username, "recipients": len(found)},
        )
        for rcpt, reason in found.items():
            self._dropped(
                entry, request.email_id, [rcpt], SUPPRESSED_RESULTS[reason], "left out: suppressed"
            )
        return dataclasses.replace(
            request,
            cc=tuple(r for r in request.cc if r not in found),
            bcc=tuple(r for r in request.bcc if r not in found),
        )

    async def _spool_copies(
        self,
        entry: CredentialEntry,
        copies: Sequence[Copy],
        received: bytes,
        plain: Submission | None = None,
    ) -> list[SpooledMessage]:
        """Spool every copy durably (one group commit covers them all), then count them.
        ``plain``: the SMTP submission, whose DSN parameters go with the copies (each copy
        its own recipients')."""
        dsn = plain.dsn if plain is not None else None
        spooled = await asyncio.gather(
            *(
                self._spool.append(
                    c.mail_from,
                    list(c.recipients),
                    entry.username,
                    received + c.body,
                    dsn=dsn.select(plain.recipients, c.recipients) if plain and dsn else None,
                )
                for c in copies
            )
        )
        for _ in spooled:
            self._metrics.accepted.labels(entry.username).inc()
        return list(spooled)

    async def _record(
        self,
        entry: CredentialEntry,
        message: Submission | SendRequest,
        copies: Sequence[Copy],
        spooled: Sequence[SpooledMessage],
        status_id: str | None,
    ) -> None:
        """Record the spooled copies as sent (and the token's contacts, if it keeps them)."""
        first = message.to[0] if isinstance(message, SendRequest) else None
        sent = [
            SentCopy(
                spool_id=msg.id,
                recipient=rcpt,
                message_id=copy.message_id,
                event_id=copy.event_id,
                status_id=status_id if rcpt == first else None,
            )
            for msg, copy in zip(spooled, copies, strict=True)
            for rcpt in copy.recipients
        ]
        if isinstance(message, SendRequest):
            email_id, properties = message.email_id, message.contact_properties
        else:
            email_id, properties = 0, {}
        await self._records.sends.record(
            entry.username,
            email_id,
            sent,
            contacts=properties if entry.create_contacts else None,
            queued_status=status_id,
            namespace=entry.namespace,
            token=entry.token,
        )
        if isinstance(message, SendRequest):
            log.info(
                "template send queued",
                extra={
                    "token": entry.username,
                    "email_id": email_id,
                    "msg_ids": [m.id for m in spooled],
                    "recipients": len(sent),
                },
            )
            return
        for msg in spooled:
            log.info(
                "message accepted",
                extra={
                    "msg_id": msg.id,
                    "token": entry.username,
                    "recipients": len(msg.recipients),
                    "size": msg.body_length,
                },
            )
