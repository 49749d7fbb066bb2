"""SMTP submission: aiosmtpd's protocol with AUTH limits, sender policy and safe errors.

Port 587 style (STARTTLS): before TLS, EHLO lists no AUTH, AUTH gets 538 5.7.11 and MAIL
530 5.7.0 (AUTH is required and only possible over TLS). Port 465 style: TLS from the
first byte. aiosmtpd >= 1.4.6 ends DATA only on CRLF.CRLF and discards what a client
pipelines behind STARTTLS; the body is spooled as received and aiosmtplib normalises bare
CR/LF and dot-stuffs it on the way out, so one DATA is one message upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import CredentialEntry
from txmail_relay.ingress.auth import CredentialChecker, FailureLimiter
from txmail_relay.ingress.complaints import ComplaintHandler
from txmail_relay.logs import install_redaction
from txmail_relay.mail.headers import Origin
from txmail_relay.mail.submission import parse_submission
from txmail_relay.metrics import RelayMetrics
from txmail_relay.sending.policy import (
    Rejected,
    SendError,
    check_content,
    check_header_from,
    check_sender,
)
from txmail_relay.sending.service import SendService
from txmail_relay.settings import LimitSettings
from txmail_relay.spool.segments import SpoolError, SpoolFullError

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

REPLY_INTERNAL_ERROR = "451 4.3.0 Internal error, please try again later"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"
NO_ROOM = Rejected("storage", "452 4.3.1 Insufficient system storage")


class SpoolRoom(Protocol):
    """The spool's free-space check (MAIL FROM's SIZE=)."""

    def has_room(self, size: int = 0) -> bool: ...


class RelaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.entry: CredentialEntry | None = None
        self.auth_failures = 0

    # aiosmtpd still sets this deprecated attribute and logs a warning each time.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def _peer(session: Session) -> str:
    return str(session.peer[0]) if isinstance(session.peer, tuple) else "unknown"


class SubmissionHandler:
    """aiosmtpd handler hooks: each asks the policy or the send service, and maps what it
    decides to a reply (5xx for the client's mistakes, 4xx only for our faults)."""

    def __init__(
        self,
        config: LiveConfig,
        spool: SpoolRoom,
        limits: LimitSettings,
        metrics: RelayMetrics,
        *,
        sends: SendService,
        complaints: ComplaintHandler,
        complaints_address: str | None = None,
    ) -> None:
        self._config = config
        self._spool = spool
        self._limits = limits
        self._metrics = metrics
        self._sends = sends
        self._complaints = complaints
        self._static_complaints_address = (complaints_address or "").lower() or None
        install_redaction()  # aiosmtpd logs DATA lines and bad AUTH responses at DEBUG
        self._in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def _refuse(self, rejected: Rejected) -> str:
        self._metrics.rejections.labels(rejected.reason).inc()
        return rejected.reply

    def _complaints_address(self) -> str | None:
        """The DedicatedIP's feedback.complaintsAddress (live), else the settings file's."""
        config = self._config.current
        live = config.relay.feedback.complaints_address if config is not None else None
        return (live or "").lower() or self._static_complaints_address

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        verdict = check_sender(self._config.current, session.entry, address)
        if isinstance(verdict, Rejected):
            return self._refuse(verdict)
        size = next((o[5:] for o in mail_options if o.startswith("SIZE=")), "0")
        if not self._spool.has_room(int(size)):
            return self._refuse(NO_ROOM)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._limits.max_recipients:
            return self._refuse(Rejected("recipients", "452 4.5.3 Too many recipients"))
        if address.lower() != self._complaints_address():
            verdict = await self._sends.check_recipient(address)
            if isinstance(verdict, Rejected):
                return self._refuse(verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: RelaySession, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        entry = session.entry
        content = envelope.original_content
        if entry is None or not isinstance(content, bytes) or not envelope.mail_from:
            return REPLY_INTERNAL_ERROR
        verdict = check_content(content)  # NUL bytes: refused before anything reads the data
        if isinstance(verdict, Rejected):
            return self._refuse(verdict)
        rcpts = [r.lower() for r in envelope.rcpt_tos]
        complaints_address = self._complaints_address()
        if complaints_address is not None and complaints_address in rcpts:
            return await self._complaint(rcpts, content, complaints_address)
        submission = parse_submission(envelope.mail_from, envelope.rcpt_tos, content)
        verdict = check_header_from(self._config.current, entry, submission.headers)
        if isinstance(verdict, Rejected):
            return self._refuse(verdict)
        origin = Origin(
            peer=_peer(session),
            by=server.hostname,
            protocol="ESMTPSA",
            helo=session.host_name or "unknown",
        )
        template = submission.headers.template is not None
        with self._working():
            try:
                spooled = await asyncio.wait_for(
                    self._sends.accept(entry, submission, origin), self._limits.data_timeout
                )
            except SendError as e:
                self._metrics.template_sends.labels(entry.username, e.send_result).inc()
                return self._refuse(e.rejected)
            except (SpoolError, TimeoutError) as exc:
                return self._spool_failure(exc)
        if template:
            self._metrics.template_sends.labels(entry.username, "QUEUED").inc()
        return f"250 2.0.0 OK queued as {' '.join(m.id for m in spooled)}"

    async def _complaint(self, rcpts: list[str], content: bytes, complaints_address: str) -> str:
        if any(r != complaints_address for r in rcpts):
            return self._refuse(
                Rejected(
                    "recipients", "550 5.5.1 The complaints address must be the only recipient"
                )
            )
        found = await self._complaints.handle(content)
        if found is None:
            return "250 2.6.0 Report received (no matching message)"
        return "250 2.6.0 Complaint recorded"

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Count a message being spooled, so a graceful stop can wait for it."""
        self._in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self.idle.set()

    def _spool_failure(self, exc: Exception) -> str:
        """The reply when spooling failed: never 250, always a temporary error."""
        if isinstance(exc, SpoolFullError):
            return self._refuse(NO_ROOM)
        if isinstance(exc, TimeoutError):
            return self._refuse(Rejected("spool", "451 4.3.0 Queueing timed out, try again"))
        return self._refuse(Rejected("spool", "451 4.3.0 Could not queue the message, try again"))


class SubmissionProtocol(SMTP):
    """One client connection."""

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        checker: CredentialChecker,
        limiter: FailureLimiter,
        metrics: RelayMetrics,
        limits: LimitSettings,
        hostname: str,
        tls_context: ssl.SSLContext,
        implicit_tls: bool,
        on_open: Callable[[SubmissionProtocol], None],
        on_close: Callable[[SubmissionProtocol], None],
    ) -> None:
        self._checker = checker
        self._limiter = limiter
        self._metrics = metrics
        self._max_auth_failures = limits.max_auth_failures
        self._on_open = on_open
        self._on_close = on_close
        super().__init__(
            handler,
            data_size_limit=limits.max_message_size,
            hostname=hostname,
            ident="ESMTP txmail",
            tls_context=None if implicit_tls else tls_context,
            timeout=limits.idle_timeout,
            # With implicit TLS the whole connection is encrypted already.
            auth_require_tls=not implicit_tls,
            authenticator=self._check_credentials,
            command_call_limit={"AUTH": limits.max_auth_failures, "*": 1_000_000},
            loop=asyncio.get_running_loop(),
        )
        # Set afterwards: aiosmtpd warns when AUTH is required without auth_require_tls, which
        # does not know that a port 465 connection is TLS from the start.
        self._auth_required = True

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def _peer_ip(self) -> str:
        return _peer(self.session) if self.session is not None else "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._on_open(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._on_close(self)
        super().connection_lost(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        log.error(
            "internal error in an SMTP session: %s",
            type(error).__name__,
            exc_info=(type(error), error, error.__traceback__),
        )
        return REPLY_INTERNAL_ERROR

    async def _refuse_control_chars(self, arg: str | None) -> bool:
        if arg is not None and _CONTROL.search(arg):
            self._metrics.rejections.labels("syntax").inc()
            await self.push("501 5.5.2 Control characters are not allowed in addresses")
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's hook name
        if not await self._refuse_control_chars(arg):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's hook name
        if not await self._refuse_control_chars(arg):
            await super().smtp_RCPT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, which catches only HeaderParseError: the stdlib parser
        raises others on hostile input (AttributeError on ``<0@[@0>``). Any failure is a
        malformed address (aiosmtpd's 553 5.1.3 for MAIL, 501 for RCPT), never a 451."""
        try:
            return super()._getaddr(arg)
        except Exception:
            return None, None

    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's hook name
        session = self.session
        if not isinstance(session, RelaySession):
            raise TypeError("unexpected session type")
        if not session.authenticated and self._limiter.blocked(self._peer_ip()):
            self._metrics.rejections.labels("auth-rate").inc()
            await self.push("421 4.7.0 Too many failed authentications, try later")
            self.close()
            return
        await super().smtp_AUTH(arg)
        if session.auth_failures >= self._max_auth_failures:
            self.close()

    def _check_credentials(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if not isinstance(session, RelaySession):
            raise TypeError("unexpected session type")
        entry = None
        if isinstance(auth_data, LoginPassword):
            try:
                username = auth_data.login.decode()
                password = auth_data.password.decode()
            except UnicodeDecodeError:
                pass
            else:
                entry = self._checker.check(username, password)
        if entry is not None:
            session.entry = entry
            log.info("authenticated", extra={"token": entry.username, "peer": self._peer_ip()})
            return AuthResult(success=True, auth_data=entry.username)
        session.auth_failures += 1
        self._limiter.record_failure(self._peer_ip())
        self._metrics.auth_failures.inc()
        log.info(
            "authentication failed",
            extra={"peer": self._peer_ip(), "failures": session.auth_failures},
        )
        if session.auth_failures >= self._max_auth_failures:
            return AuthResult(success=False, handled=False, message=REPLY_TOO_MANY_FAILURES)
        return AuthResult(success=False, handled=False)
