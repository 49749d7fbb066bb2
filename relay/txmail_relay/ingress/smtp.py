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
import email.policy
import logging
import re
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formatdate
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import CredentialEntry
from txmail_relay.ingress.auth import CredentialChecker, FailureLimiter
from txmail_relay.ingress.complaints import ComplaintHandler
from txmail_relay.logs import install_redaction
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.store import SentCopy, Store
from txmail_relay.sending.service import (
    SUPPRESSED_REASONS,
    SUPPRESSED_RESULTS,
    SendError,
    SendService,
    suppression_reasons,
)
from txmail_relay.sending.smtp_templates import TEMPLATE_HEADER, parse_headers, template_request
from txmail_relay.settings import LimitSettings
from txmail_relay.spool.segments import SpooledMessage, SpoolError, SpoolFullError

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE_HELO = re.compile(r"[^\x21-\x7e]")

REPLY_INTERNAL_ERROR = "451 4.3.0 Internal error, please try again later"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"


class Acceptor(Protocol):
    """Where accepted messages go: the spool."""

    def has_room(self, size: int = 0) -> bool: ...

    async def append(
        self, mail_from: str, recipients: list[str], username: str, body: bytes
    ) -> SpooledMessage: ...


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


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def header_from_domains(content: bytes) -> list[str] | None:
    """Domains of the single From header's addresses, or None if there is no usable one."""
    match = _HEADER_END.search(content)
    head = content[: match.start()] if match else content
    message = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    values = message.get_all("From") or []
    if len(values) != 1:
        return None
    try:
        addresses = values[0].addresses
    except (AttributeError, ValueError, IndexError):
        return None
    domains = [str(a.domain).lower() for a in addresses]
    return domains if domains and all(domains) else None


class SubmissionHandler:
    """aiosmtpd handler hooks: sender policy, recipient limit and spooling."""

    def __init__(
        self,
        store: LiveConfig,
        spool: Acceptor,
        limits: LimitSettings,
        metrics: RelayMetrics,
        *,
        sends: SendService | None = None,
        db: Store | None = None,
        complaints: ComplaintHandler | None = None,
        complaints_address: str | None = None,
    ) -> None:
        self._store = store
        self._spool = spool
        self._limits = limits
        self._metrics = metrics
        self._sends = sends
        self._db = db
        self._complaints = complaints
        self._static_complaints_address = (complaints_address or "").lower() or None
        install_redaction()  # aiosmtpd logs DATA lines and bad AUTH responses at DEBUG
        self._in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def _reject(self, reason: str, reply: str) -> str:
        self._metrics.rejections.labels(reason).inc()
        return reply

    def _complaints_address(self) -> str | None:
        """The DedicatedIP's feedback.complaintsAddress (live), else the settings file's."""
        config = self._store.current
        live = config.relay.feedback.complaints_address if config is not None else None
        return (live or "").lower() or self._static_complaints_address

    async def _suppressed(self, address: str) -> str | None:
        """The 550 for a recipient the DedicatedIP suppresses, or None."""
        reasons = suppression_reasons(self._store.current)
        if not reasons or self._db is None or address.lower() == self._complaints_address():
            return None
        found = await self._db.call(self._db.suppressed, [address], reasons)
        reason = found.get(address)
        if reason is None:
            return None
        return (
            f"550 5.7.1 <{address}> suppressed on this relay: {SUPPRESSED_REASONS[reason]} "
            f"({SUPPRESSED_RESULTS[reason]})"
        )

    def _allowed(self, entry: CredentialEntry | None, domain: str) -> bool:
        config = self._store.current
        if entry is None or config is None:
            return False
        relay_domains = {d.lower() for d in config.relay.domains}
        token_domains = {d.lower() for d in entry.allowed_from_domains}
        return domain in relay_domains and domain in token_domains

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        domain = _domain(address)
        if not self._allowed(session.entry, domain):
            return self._reject("sender", f"553 5.7.1 Sender domain {domain} not allowed")
        size = next((o[5:] for o in mail_options if o.startswith("SIZE=")), "0")
        if not self._spool.has_room(int(size)):
            return self._reject("storage", "452 4.3.1 Insufficient system storage")
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
            return self._reject("recipients", "452 4.5.3 Too many recipients")
        refused = await self._suppressed(address)
        if refused is not None:
            return self._reject("suppressed", refused)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: RelaySession, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        entry = session.entry
        content = envelope.original_content
        if entry is None or not isinstance(content, bytes) or not envelope.mail_from:
            return REPLY_INTERNAL_ERROR
        rcpts = [r.lower() for r in envelope.rcpt_tos]
        complaints_address = self._complaints_address()
        if complaints_address is not None and complaints_address in rcpts:
            return await self._complaint(rcpts, content, complaints_address)
        domains = header_from_domains(content)
        if domains is None:
            return self._reject("from-header", "550 5.7.1 Exactly one valid From header needed")
        for domain in domains:
            if not self._allowed(entry, domain):
                return self._reject(
                    "from-header", f"553 5.7.1 From header domain {domain} not allowed"
                )
        headers = parse_headers(content)
        if TEMPLATE_HEADER in headers:
            return await self._template_send(entry, session, envelope, content)
        received = self._received(server, session)
        with self._working():
            try:
                if self._sends is not None:
                    tracked = await asyncio.wait_for(
                        self._sends.track_plain(
                            entry, envelope.mail_from, envelope.rcpt_tos, content, received
                        ),
                        self._limits.data_timeout,
                    )
                    if tracked is not None:
                        return f"250 2.0.0 OK queued as {' '.join(m.id for m in tracked)}"
                msg = await asyncio.wait_for(
                    self._spool.append(
                        envelope.mail_from, envelope.rcpt_tos, entry.username, received + content
                    ),
                    self._limits.data_timeout,
                )
            except (SpoolError, TimeoutError) as exc:
                return self._spool_failure(exc)
        self._metrics.accepted.labels(entry.username).inc()
        self._record_plain(entry, msg, headers)
        log.info(
            "message accepted",
            extra={
                "msg_id": msg.id,
                "token": entry.username,
                "recipients": len(msg.recipients),
                "size": msg.body_length,
            },
        )
        return f"250 2.0.0 OK queued as {msg.id}"

    def _record_plain(
        self, entry: CredentialEntry, msg: SpooledMessage, headers: EmailMessage
    ) -> None:
        db = self._db
        if db is None:
            return
        message_id = str(headers.get("Message-ID") or "").strip() or None
        copies = [SentCopy(msg.id, r, message_id) for r in msg.recipients]
        contacts: dict[str, Any] | None = {} if entry.create_contacts else None
        db.submit(lambda: db.record_sent(entry.username, 0, copies, contacts=contacts))

    async def _complaint(self, rcpts: list[str], content: bytes, complaints_address: str) -> str:
        if self._complaints is None or any(r != complaints_address for r in rcpts):
            return self._reject(
                "recipients", "550 5.5.1 The complaints address must be the only recipient"
            )
        found = await self._complaints.handle(content)
        if found is None:
            return "250 2.6.0 Report received (no matching message)"
        return "250 2.6.0 Complaint recorded"

    async def _template_send(
        self, entry: CredentialEntry, session: RelaySession, envelope: Envelope, content: bytes
    ) -> str:
        if self._sends is None:
            return self._reject("template", "550 5.6.0 Template sends are not enabled")
        try:
            request = template_request(content, list(envelope.rcpt_tos))
        except SendError as e:
            self._metrics.template_sends.labels(entry.username, e.send_result).inc()
            return self._reject("template", f"550 5.6.0 {e.send_result} {e.field}: {e.message}")
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        with self._working():
            try:
                _, copies = await self._sends.compose(entry, request)
                spooled = await asyncio.wait_for(
                    self._sends.send_copies(entry, request, copies, peer=str(peer)),
                    self._limits.data_timeout,
                )
            except SendError as e:
                self._metrics.template_sends.labels(entry.username, e.send_result).inc()
                code = "550 5.1.1" if e.send_result == "INVALID_TO_ADDRESS" else "550 5.6.0"
                return self._reject("template", f"{code} {e.send_result} {e.field}: {e.message}")
            except (SpoolError, TimeoutError) as exc:
                return self._spool_failure(exc)
        self._metrics.template_sends.labels(entry.username, "QUEUED").inc()
        return f"250 2.0.0 OK queued as {' '.join(m.id for m in spooled)}"

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
            return self._reject("storage", "452 4.3.1 Insufficient system storage")
        if isinstance(exc, TimeoutError):
            return self._reject("spool", "451 4.3.0 Queueing timed out, try again")
        return self._reject("spool", "451 4.3.0 Could not queue the message, try again")

    @staticmethod
    def _received(server: SMTP, session: RelaySession) -> bytes:
        helo = _UNSAFE_HELO.sub("", session.host_name or "unknown")[:255]
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        return (
            f"Received: from {helo} ([{peer}])\r\n\tby {server.hostname} (txmail) "
            f"with ESMTPSA;\r\n\t{formatdate(usegmt=True)}\r\n"
        ).encode("ascii", "replace")


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
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

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
