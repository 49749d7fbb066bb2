"""SMTP submission: aiosmtpd's protocol with AUTH limits, sender policy and safe errors.

Port 587 style (STARTTLS): before TLS, EHLO lists no AUTH, AUTH gets 538 5.7.11 and MAIL
530 5.7.0 (AUTH is required and only possible over TLS). Port 465 style: TLS from the
first byte. aiosmtpd >= 1.4.6 ends DATA only on CRLF.CRLF and discards what a client
pipelines behind STARTTLS; the body is spooled as received and aiosmtplib normalises bare
CR/LF and dot-stuffs it on the way out, so one DATA is one message upstream.

EHLO offers DSN (RFC 3461). aiosmtpd 1.4 upper-cases every MAIL/RCPT parameter and refuses
any it does not know with 555, so the DSN parameters (ORCPT and ENVID are case-sensitive
xtext) are taken out of the command here, as given, before aiosmtpd parses the rest; a
malformed one gets 501 5.5.4. They are kept on the envelope (:class:`RelayEnvelope`) and
spooled with the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import re
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, AnyStr, Protocol, TypeVar, cast

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import CredentialEntry
from txmail_relay.ingress.auth import CredentialChecker, FailureLimiter
from txmail_relay.ingress.complaints import ComplaintHandler, ComplaintsAddress
from txmail_relay.ingress.connections import ConnectionGate, Refusal, Ticket, peer_ip
from txmail_relay.logs import install_redaction
from txmail_relay.mail.dsn import (
    DsnEnvelope,
    DsnParamError,
    RecipientParams,
    parse_mail_params,
    parse_rcpt_params,
)
from txmail_relay.mail.headers import Origin
from txmail_relay.mail.submission import parse_submission
from txmail_relay.metrics import RelayMetrics
from txmail_relay.sending.policy import (
    Accepted,
    Rejected,
    SendError,
    check_content,
    check_envelope_address,
    check_header_from,
    check_sender,
)
from txmail_relay.sending.service import SendService
from txmail_relay.settings import LimitSettings
from txmail_relay.spool.segments import SpoolError, SpoolFullError

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9-]+"
#: MAIL FROM:/RCPT TO:'s common form, ``<local@domain>`` then nothing or the parameters: a
#: dot-atom local part (not starting ``=?``, which the stdlib tries as an encoded word), a
#: domain of letters, digits and hyphens, then spaces the stdlib eats as folding white space,
#: then parameters that start with neither a comment nor other white space. Anything else
#: goes to aiosmtpd's parser.
_QUICK_PATH = re.compile(
    rf"<((?!=\?){_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*((?:[!-'*-~].*)?)",
    re.DOTALL,
)

REPLY_INTERNAL_ERROR = "451 4.3.0 Internal error, please try again later"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"
# The connection level (docs/relay.md "Limits"): every close the relay decides has its 421.
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down"
REPLY_IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
REPLY_UPLOAD_TOO_LONG = "421 4.4.2 Message transfer took too long, closing connection"
REPLY_NO_PROGRESS = "421 4.7.0 Too many commands without sending a message, closing connection"
REFUSALS = {
    Refusal.ADDRESS: "421 4.7.0 Too many connections from your address, try again later",
    Refusal.FULL: "421 4.3.2 Too many connections, try again later",
}
# Commands that move a session on (their success resets the count of commands without
# progress), and commands that never do (counted, like every command that gets 4xx/5xx).
PROGRESS = {"STARTTLS": 220, "AUTH": 235, "DATA": 250}
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN", "HELO", "EHLO"})
LINGER = 5.0  # seconds a closed connection may take to flush its last reply
TLS_REFUSALS = 32  # refused implicit-TLS connections in their handshake at once, at most
NO_ROOM = Rejected("storage", "452 4.3.1 Insufficient system storage")


class SpoolRoom(Protocol):
    """The spool's free-space check (MAIL FROM's SIZE=)."""

    def has_room(self, size: int = 0) -> bool: ...


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope with the RFC 3461 parameters: ``rcpt_params`` runs along
    ``rcpt_tos``."""

    def __init__(self) -> None:
        super().__init__()
        self.ret: str | None = None
        self.envid: str | None = None
        self.rcpt_params: list[RecipientParams] = []

    def dsn(self) -> DsnEnvelope:
        return DsnEnvelope(self.ret, self.envid, tuple(self.rcpt_params))


_MAIL_DSN = frozenset({"RET", "ENVID"})
_RCPT_DSN = frozenset({"NOTIFY", "ORCPT"})


class _TlsLayer:
    """What aiosmtpd reads of the TLS layer of a session upgraded by STARTTLS: it is there
    (truthy), and its ``_extra`` (the session's ``ssl`` info)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._extra = {
            name: transport.get_extra_info(name)
            for name in ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
        }


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


_F = TypeVar("_F", bound=Callable[..., Any])


def quick_getaddr(arg: str) -> tuple[str, str] | None:
    """What aiosmtpd's ``_getaddr`` returns for ``arg`` (its address and the rest after it)
    when ``arg`` is in the common ``<local@domain> PARAMS`` form; None for anything else.

    By hand because aiosmtpd's parser is the stdlib's RFC 5322 header parser
    (``email._header_value_parser``), which builds a token tree and a class per call: the
    largest cost of MAIL and RCPT. Same answer wherever this one answers (a property test,
    tests/fuzz/test_quick_path.py); aiosmtpd's parser reads the rest.
    """
    match = _QUICK_PATH.fullmatch(arg)
    if match is None:
        return None
    return match.group(1), match.group(2)


def _help_of(replaced: Callable[..., Any]) -> Callable[[_F], _F]:
    """An override keeps the HELP syntax aiosmtpd's @syntax put on the method it replaces
    (without it HELP no longer lists the command)."""

    def copy(method: _F) -> _F:
        for name in ("__smtp_syntax__", "__smtp_syntax_when__", "__smtp_syntax_extended__"):
            if hasattr(replaced, name):
                setattr(method, name, getattr(replaced, name))
        return method

    return copy


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
        self._complaints_address = ComplaintsAddress(config, complaints_address).current
        install_redaction()  # aiosmtpd logs DATA lines and bad AUTH responses at DEBUG
        self._in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def _refuse(self, rejected: Rejected) -> str:
        self._metrics.rejections.labels(rejected.reason).inc()
        return rejected.reply

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: RelaySession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO lines plus DSN (RFC 3461), before its last line."""
        session.host_name = hostname  # aiosmtpd leaves it to a handler with this hook
        return [*responses[:-1], "250-DSN", *responses[-1:]]

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        verdict = check_envelope_address(address)
        if isinstance(verdict, Accepted):
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
        syntax = check_envelope_address(address)
        if isinstance(syntax, Rejected):
            return self._refuse(syntax)
        if address.lower() != self._complaints_address():
            verdict = await self._sends.check_recipient(address, session.entry)
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
        if isinstance(envelope, RelayEnvelope):
            submission = dataclasses.replace(submission, dsn=envelope.dsn())
        verdict = check_header_from(self._config.current, entry, submission.headers)
        if isinstance(verdict, Rejected):
            return self._refuse(verdict)
        origin = Origin(
            peer=peer_ip(session.peer),
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
    """One client connection.

    aiosmtpd (pinned < 1.5) runs the command loop; this subclass adds what it does not do
    (docs/relay.md "Limits"): the connection caps (asked before TLS and before the greeting),
    TLS handshakes bounded by the idle timeout, an idle timer that counts silence, not the
    length of an upload, a bound on the whole DATA transfer, a limit on commands without
    progress, a 421 before every close the relay decides, and a graceful stop.
    """

    def __init__(
        self,
        handler: object,  # a SubmissionHandler, or the inbound listener's (ingress/inbound.py)
        *,
        checker: CredentialChecker,
        limiter: FailureLimiter,
        metrics: RelayMetrics,
        limits: LimitSettings,
        hostname: str,
        tls_context: ssl.SSLContext,
        implicit_tls: bool,
        gate: ConnectionGate,
        on_open: Callable[[SubmissionProtocol], None],
        on_close: Callable[[SubmissionProtocol], None],
    ) -> None:
        self._checker = checker
        self._limiter = limiter
        self._metrics = metrics
        self._max_auth_failures = limits.max_auth_failures
        self._gate = gate
        self._on_open = on_open
        self._on_close = on_close
        self._server_tls = tls_context if implicit_tls else None
        self._handshake_timeout = min(limits.tls_handshake_timeout, limits.idle_timeout)
        self._upload_timeout = limits.data_upload_timeout
        self._hook_timeout = limits.data_timeout + limits.idle_timeout
        self._max_junk = limits.max_junk_commands
        self._ticket: Ticket | None = None
        # The TCP connection. Stream transports, typed as such: uvloop's do not subclass
        # asyncio.Transport, so no isinstance() checks on them.
        self._raw: asyncio.Transport | None = None
        self._tls_pending = False  # implicit TLS: in the handshake
        self._refusal: str | None = None  # the 421 this connection gets instead of a session
        self._started = False  # the SMTP session runs (greeting sent or about to be)
        self._ended = False
        self._busy = False  # a command is being handled (an upload, spooling)
        self._handshaking = False  # STARTTLS: no clear-text reply is possible
        self._in_data = False
        self._upload_deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        self._stopping = False
        self._junk = 0
        self._last_code = 0
        self._idle_deadline = 0.0  # the idle timer's deadline (loop time)
        self._idle_armed: float | None = None  # when the timer is set to fire (None: not set)
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
        # aiosmtpd looks its command methods up in this table (built in __init__): each runs
        # through _command, which counts commands without progress and knows when one is in
        # progress (a graceful stop lets it finish).
        self._smtp_methods = {
            name: self._command(name, method) for name, method in self._smtp_methods.items()
        }

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def _create_envelope(self) -> Envelope:
        return RelayEnvelope()

    def _peer_ip(self) -> str:
        if self.session is not None:
            return peer_ip(self.session.peer)
        return peer_ip(self._raw.get_extra_info("peername")) if self._raw else "unknown"

    # -- the connection: admission, TLS, the end ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw is not None:
            if self._tls_pending:  # implicit TLS: the handshake is done
                self._tls_pending = False
                tls = cast(asyncio.Transport, transport)
                if self._stopping:
                    tls.close()
                elif self._refusal is not None:
                    self._refuse(tls, self._refusal)
                else:
                    self._start(tls)
            else:  # aiosmtpd's STARTTLS: the same session, now over TLS
                super().connection_made(transport)
            return
        self._raw = raw = cast(asyncio.Transport, transport)
        self._on_open(self)
        verdict = self._gate.admit(transport.get_extra_info("peername"))
        if isinstance(verdict, Ticket):
            self._ticket = verdict
            self._metrics.sessions.inc()
        else:
            self._metrics.rejections.labels("connections").inc()
            self._refusal = REFUSALS[verdict]
            log.debug("connection refused", extra={"peer": self._peer_ip(), "why": verdict.value})
        if self._server_tls is not None:
            self._accept_tls(raw, self._server_tls)
        elif self._refusal is not None:
            self._refuse(raw, self._refusal)
        else:
            self._start(raw)

    def _accept_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """TLS from the first byte, set up here rather than by ``create_server(ssl=...)``: the
        handshake gets our deadline, and its end, even a failed one, is ours to see (asyncio
        does not tell the protocol of a failed handshake). The same layering aiosmtpd uses
        for STARTTLS, set up before the first byte is read. A refused client gets its 421
        over TLS, unless a flood of refused clients is in handshakes already."""
        if self._refusal is not None:
            if self._gate.refusing >= TLS_REFUSALS:
                raw.abort()
                return
            self._gate.refusing += 1
        self._tls_pending = True
        handshake = self.loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        layer = sslproto.SSLProtocol(
            self.loop,
            self,
            context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=self._handshake_timeout,  # type: ignore[arg-type] # a float
        )
        raw.set_protocol(layer)
        layer.connection_made(raw)  # calls our connection_made again once the handshake is done

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        if self._refusal is not None:
            self._gate.refusing -= 1
        error = None if handshake.cancelled() else handshake.exception()
        if handshake.cancelled() or error is not None:
            log.info("TLS handshake failed", extra={"peer": self._peer_ip(), "error": str(error)})
            if self._raw is not None:
                self._raw.close()
            self._end()

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self._started = True
        super().connection_made(transport)

    def _refuse(self, transport: asyncio.Transport, reply: str) -> None:
        transport.write(reply.encode() + b"\r\n")
        transport.close()
        self._arm_linger()

    def data_received(self, data: bytes) -> None:
        if not self._started:
            return  # a refused connection: nothing it says is read
        if self._in_data:
            self._reset_timeout()  # an upload times out on silence, not on its length
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if not self._started:
            return False
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        self._end()
        if self._started and self.session is not None:
            super().connection_lost(error)
        else:
            asyncio.StreamReaderProtocol.connection_lost(self, error)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._ticket is not None:
            self._ticket.release()
            self._metrics.sessions.dec()
        for timer in (self._upload_deadline, self._linger):
            if timer is not None:
                timer.cancel()
        self._on_close(self)

    def _arm_linger(self) -> None:
        """A closed connection whose client does not read would keep its descriptor until the
        reply is flushed: abort it after a while."""
        if self._linger is None and self._raw is not None and not self._ended:
            self._linger = self.loop.call_later(LINGER, self._raw.abort)

    def goodbye(self, reply: str) -> None:
        """Send a last reply and close; the command loop ends as after QUIT."""
        if self._closing or self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        transport = cast(asyncio.Transport, self.transport)
        transport.write(reply.encode() + b"\r\n")
        task = self._handler_coroutine  # aiosmtpd's command loop (its QUIT cancels it too)
        if task is not None and not task.done():
            task.cancel()
        transport.close()
        self._arm_linger()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self._arm_linger()

    def shut_down(self) -> None:
        """A graceful stop: an idle session gets 421 now; a command in progress (an upload, its
        spooling) finishes and gets its reply first; a TLS handshake is cut."""
        self._stopping = True
        if not self._started:
            if self._raw is not None:
                self._raw.close()
        elif not self._busy:
            self.goodbye(REPLY_SHUTTING_DOWN)

    def abort(self) -> None:
        """The grace period is over."""
        self.goodbye(REPLY_SHUTTING_DOWN)
        if self._raw is not None:
            self._raw.abort()

    # -- timers ----------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, moved to ``duration`` (default: the idle timeout) from now.

        aiosmtpd cancels it and makes a new one each time, three to four times per command
        with the hook's longer wait (_call_handler_hook): here a later deadline is only noted,
        and the timer, when it fires, waits again for the rest. An earlier one re-arms it."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        if self._idle_armed is not None and self._idle_armed <= deadline:
            return  # the armed timer fires first and waits for the rest then
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._idle_armed = deadline
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        self._idle_armed = None
        if self._idle_deadline > self.loop.time():  # moved later since it was armed
            self._idle_armed = self._idle_deadline
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timer: a 421 before closing, except in a handshake (no reply
        possible in clear text). While the relay itself works it runs longer (see
        _call_handler_hook)."""
        if self.transport is None:
            return
        log.info("idle timeout", extra={"peer": self._peer_ip()})
        if self._handshaking:
            self.transport.close()  # aborts the handshake
            return
        self._metrics.rejections.labels("timeout").inc()
        self.goodbye(REPLY_IDLE_TIMEOUT)

    def _upload_too_long(self) -> None:
        log.info("DATA upload too long", extra={"peer": self._peer_ip()})
        self._metrics.rejections.labels("timeout").inc()
        self.goodbye(REPLY_UPLOAD_TOO_LONG)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """The handler's time is the relay's, not the client's silence: the idle timer waits
        longer then, beyond the spooling bound (dataTimeout), so only a hung relay hits it."""
        if command == "DATA":  # the upload is complete
            self._in_data = False
            if self._upload_deadline is not None:
                self._upload_deadline.cancel()
        self._reset_timeout(self._hook_timeout)
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            if not self._closing:
                self._reset_timeout()

    # -- commands --------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        code = status[:3].decode() if isinstance(status, bytes) else status[:3]
        if code.isdigit():
            self._last_code = int(code)
        await super().push(status)

    def _command(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # HELP reads the syntax aiosmtpd attached to the method
        async def run(arg: str | None) -> None:
            if self._stopping:
                self.goodbye(REPLY_SHUTTING_DOWN)
                return
            if self._junk >= self._max_junk:
                log.info("too many commands without progress", extra={"peer": self._peer_ip()})
                self._metrics.rejections.labels("junk").inc()
                self.goodbye(REPLY_NO_PROGRESS)
                return
            self._busy = True
            self._last_code = 0
            try:
                await method(arg)
            finally:
                self._busy = False
            if PROGRESS.get(name) == self._last_code:
                self._junk = 0
            elif name in JUNK_COMMANDS or self._last_code >= 400:  # a 4xx or 5xx reply
                self._junk += 1
            if self._stopping:
                self.goodbye(REPLY_SHUTTING_DOWN)

        return run

    @_help_of(SMTP.smtp_STARTTLS)
    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's hook name
        """aiosmtpd's STARTTLS, through ``loop.start_tls`` instead of asyncio's pure-Python
        ``sslproto.SSLProtocol`` that aiosmtpd builds itself: under uvloop, start_tls is its
        compiled TLS layer, and TLS was the largest cost of a submission session left (a
        write per reply). The rest is aiosmtpd's: its 501 and 454, its 220, the handshake
        failure it closes on (TLSSetupException), and its connection_made after the
        handshake, which starts a new session and discards what the client pipelined
        behind STARTTLS in clear text (RFC 3207 4.2)."""
        if arg or not self.tls_context or self.transport is None:
            await super().smtp_STARTTLS(arg)
            return
        self._reset_timeout(self._handshake_timeout)
        self._handshaking = True
        try:
            await self.push("220 Ready to start TLS")
            raw = cast(asyncio.Transport, self.transport)
            self._original_transport = raw
            try:
                tls = await self.loop.start_tls(
                    raw,
                    self,
                    self.tls_context,
                    server_side=True,
                    ssl_handshake_timeout=self._handshake_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise TLSSetupException() from error
            if tls is None:  # closed in the handshake
                raise TLSSetupException()
            # aiosmtpd reads its SSL protocol for two things: that TLS is on, and the
            # session's ``ssl`` (the protocol's extra info).
            self._tls_protocol = cast(sslproto.SSLProtocol, _TlsLayer(tls))
            self.connection_made(tls)
        finally:
            self._handshaking = False

    _DATA_END = b"\r\n.\r\n"  # CRLF.CRLF (_data)

    @_help_of(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's hook name
        self._in_data = True
        self._upload_deadline = self.loop.call_later(self._upload_timeout, self._upload_too_long)
        try:
            await self._data(arg)
        finally:
            self._in_data = False
            self._upload_deadline.cancel()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's SMTP.smtp_DATA (pinned < 1.5), with the body read in large pieces.

        Hand-written because aiosmtpd reads the body line by line (a ``readuntil`` and its
        bookkeeping per line, 40 for a 2 KB message): under load that loop was ~12% of the
        relay's CPU (py-spy --gil, bench/relay_accept.py). Here the body is taken up to the
        first CRLF.CRLF in one ``readuntil`` (or in the StreamReader's buffer-sized pieces) and
        unstuffed with one ``bytes.replace``. The rest is aiosmtpd's: the checks and replies
        before the 354, the end only on CRLF.CRLF (a dot after a bare LF or CR is data), one
        leading dot less on every line, the 500 for a line over line_length_limit and the 552
        past data_size_limit (whichever comes first in the stream, replied after the end of
        DATA), the body in envelope.content and .original_content (bytes: this class never
        decodes), then the handler's DATA hook and its reply."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        if envelope is None or not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            body = await self._read_body()
        except asyncio.CancelledError:
            log.info("connection lost during DATA", extra={"peer": self._peer_ip()})
            self._writer.close()
            raise
        if isinstance(body, str):  # a limit broken: the reply, once the body is read
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state()
            await self.push(body)
            return
        # Dot-unstuffing (RFC 5321 4.5.2): each line loses one leading dot. "\r\n." cannot
        # overlap itself, so replace() meets every line start but the first.
        content = body.replace(b"\r\n.", b"\r\n")
        if content[:1] == b".":
            content = content[1:]
        envelope.content = content
        envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_body(self) -> bytes | str:
        """The body without the ".\\r\\n" that ends it, dots still stuffed; or, when it broke a
        limit, aiosmtpd's reply (the body is read to its end all the same)."""
        reader = self._reader
        limit = self.data_size_limit or 0
        pieces: list[bytes] = []
        size = 0  # bytes read, the end included
        reply: str | None = None  # a limit broken: the rest is read, not kept
        # The body follows a CRLF (the 354's), so its end may begin before the first byte
        # read: read exactly the rest of an end begun, never more (what follows it is the
        # client's next command), until what was read ends with no beginning of an end.
        tail = b"\r\n"
        while begun := self._end_begun(tail):
            need = self._DATA_END[begun:]
            got = await reader.readexactly(len(need))
            size += len(got)
            pieces.append(got)
            if got == need:
                return self._checked_body(b"".join(pieces), size)
            tail = (tail + got)[-4:]
        while True:
            try:
                piece = await reader.readuntil(self._DATA_END)
                ended = True
            except asyncio.LimitOverrunError as overrun:
                # The StreamReader holds about its limit (line_length_limit): take what it
                # holds but its last four bytes (readuntil looks for an end begun in them).
                piece = await reader.read(overrun.consumed)
                ended = False
            size += len(piece)
            if reply is None:
                pieces.append(piece)
                if limit and size > limit + 2 * self.line_length_limit + 8:
                    # Enough kept to see the line the size limit falls in: which reply it gets
                    # depends on it. The rest is dropped.
                    reply = self._limit_broken(b"".join(pieces), limit, complete=False)
                    pieces = []
            if ended:
                return reply or self._checked_body(b"".join(pieces), size)

    def _checked_body(self, raw: bytes, size: int) -> bytes | str:
        body = raw[:-3]  # without the ".\r\n" of the end
        line_limit = self.line_length_limit
        if size - 3 <= (self.data_size_limit or math.inf) and (
            len(body) <= line_limit or max(map(len, body.split(b"\r\n"))) + 2 <= line_limit
        ):
            return body
        return self._limit_broken(body, self.data_size_limit or 0, complete=True)

    @staticmethod
    def _end_begun(tail: bytes) -> int:
        """How much of the end of DATA the bytes read so far end with (the most; 0: none)."""
        for length in (4, 3, 2, 1):
            if tail.endswith(SubmissionProtocol._DATA_END[:length]):
                return length
        return 0

    def _limit_broken(self, body: bytes, limit: int, *, complete: bool) -> str:
        """aiosmtpd's reply to a body that broke a limit: for the first broken as it reads
        lines (CRLF-separated in ``body``, the last one cut short unless ``complete``). A line
        its StreamReader cannot hold (longer than line_length_limit without its CRLF) is too
        long before its size counts; a shorter one over the limit after."""
        lines = body.split(b"\r\n")
        if complete:
            lines.pop()  # the empty one after the last CRLF
        line_limit = self.line_length_limit
        last = len(lines) - 1
        size = 0
        for index, line in enumerate(lines):
            length = len(line) + (2 if complete or index < last else 0)
            if len(line) > line_limit:
                return "500 Line too long (see RFC5321 4.5.3.1.6)"
            size += length
            if limit and size > limit:
                return "552 Error: Too much mail data"
            if length > line_limit:
                return "500 Line too long (see RFC5321 4.5.3.1.6)"
        return "552 Error: Too much mail data"

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

    @_help_of(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's hook name
        if await self._refuse_control_chars(arg):
            return
        arg, taken = self._take_params("FROM:", arg, _MAIL_DSN)
        try:
            ret, envid, _ = parse_mail_params(taken)
        except DsnParamError as e:
            if await self._dsn_refused(e):
                return
            ret = envid = None
        envelope = self.envelope
        had_sender = envelope is not None and bool(envelope.mail_from)
        await super().smtp_MAIL(arg)
        envelope = self.envelope
        if isinstance(envelope, RelayEnvelope) and envelope.mail_from and not had_sender:
            envelope.ret, envelope.envid = ret, envid

    @_help_of(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's hook name
        if await self._refuse_control_chars(arg):
            return
        arg, taken = self._take_params("TO:", arg, _RCPT_DSN)
        try:
            params, _ = parse_rcpt_params(taken)
        except DsnParamError as e:
            if await self._dsn_refused(e):
                return
            params = RecipientParams()
        envelope = self.envelope
        before = len(envelope.rcpt_tos) if envelope is not None else 0
        await super().smtp_RCPT(arg)
        envelope = self.envelope
        if isinstance(envelope, RelayEnvelope) and len(envelope.rcpt_tos) > before:
            envelope.rcpt_params.append(params)

    def _take_params(
        self, keyword: str, arg: str | None, names: frozenset[str]
    ) -> tuple[str | None, list[str]]:
        """(``arg`` without its DSN parameters ``names``, those parameters as given). Only in
        an EHLO session and after an address that parses: otherwise aiosmtpd's own reply."""
        session = self.session
        if arg is None or session is None or not session.extended_smtp:
            return arg, []
        after = self._strip_command_keyword(keyword, arg)
        if after is None:
            return arg, []
        address, rest = self._getaddr(after)
        if not address or not rest:
            return arg, []
        tokens = rest.split()
        taken = [t for t in tokens if t.partition("=")[0].upper() in names]
        if not taken:
            return arg, []
        others = [t for t in tokens if t not in taken]
        return " ".join([keyword + after[: len(after) - len(rest)].rstrip(), *others]), taken

    async def _dsn_refused(self, error: DsnParamError) -> bool:
        """Reply to a malformed DSN parameter; False: aiosmtpd replies instead (before AUTH,
        its 530 comes first)."""
        session = self.session
        if session is None or not session.authenticated:
            return False
        self._metrics.rejections.labels("syntax").inc()
        await self.push(error.reply)
        return True

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, which catches only HeaderParseError: the stdlib parser
        raises others on hostile input (AttributeError on ``<0@[@0>``). Any failure is a
        malformed address (aiosmtpd's 553 5.1.3 for MAIL, 501 for RCPT), never a 451. The
        common ``<local@domain>`` form is read by :func:`quick_getaddr` (same answer, faster)."""
        if not self.local_part_limit:
            quick = quick_getaddr(arg)
            if quick is not None:
                return quick
        try:
            return super()._getaddr(arg)
        except Exception:
            return None, None

    @_help_of(SMTP.smtp_AUTH)
    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's hook name
        session = self.session
        if not isinstance(session, RelaySession):
            raise TypeError("unexpected session type")
        if not session.authenticated and self._limiter.blocked(self._peer_ip()):
            self._metrics.rejections.labels("auth-rate").inc()
            seconds = math.ceil(self._limiter.retry_after(self._peer_ip()))
            self.goodbye(
                "421 4.7.0 Too many failed logins from your address: every AUTH is refused, "
                f"even with the right password, for {seconds} s"
            )
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
