"""The inbound listener: DSNs and ARF reports from the outside world (port 25 style).

The far MTAs that accepted the relay's mail send what happened later to the message's return
path (``<localPart>+<spool id>@<return-path domain>``, :mod:`txmail_relay.mail.return_path`),
whose MX is this relay; mailbox providers send feedback reports (RFC 5965) to the complaints
address. This listener takes exactly those:

* no AUTH (none is listed, the command gets 502); STARTTLS offered with the relay's
  certificate, not required (RFC 3207: a public MX must not insist); the submission
  listener's connection caps, size, idle, upload and junk-command limits
  (:class:`~txmail_relay.ingress.smtp.SubmissionProtocol`, reused), but a size limit of
  its own (``limits.maxInboundMessageSize``, 1 MiB by default: a report is small, Postfix's
  bounce_size_limit is 50 kB), refused with 552 while the data streams in;
* RCPT only to a return-path address whose tag is a well-formed spool id, or to the
  complaints address (both case-insensitive), everything else ``550 5.7.1``;
* DATA: an ARF report goes to the :class:`ComplaintHandler` when its Feedback-Type is
  ``abuse`` or ``fraud`` (RFC 5965's complaints; the others, ``not-spam``, ``virus``,
  ``auth-failure``, ``other``, are counted and recorded as nothing: this port is open to the
  internet, and a report that is no complaint must not suppress anybody); an RFC 3464 DSN
  (``multipart/report; report-type=delivery-status``) is read with the stdlib ``email``
  package (per recipient ``Action``, ``Status``, ``Diagnostic-Code``, ``Final-`` and
  ``Original-Recipient``); anything else is given to flufl.bounce, which knows the
  non-standard formats (qmail, Exim, Exchange, ...). ``failed`` with a 5.x.x status is a
  hard bounce; ``failed`` with 4.x.x and ``delayed`` are soft; ``delivered``, ``relayed``
  and ``expanded`` are not bounces.

Reading a report is CPU work (the stdlib parser, flufl.bounce's detectors): it runs in a
worker thread, never on the event loop, and the detectors see only the first
:data:`DETECT_BYTES` of a message (a bounce names its recipient near the top).

Each bounce is tied to its message by the spool id in the envelope recipient and to its
recipient by the DSN's fields (``records.events.bounce``, which refuses a recipient the
message never had: a forged bounce cannot touch an address the message was not sent to; a
recipient of the message, who sees its tag, can forge one about a co-recipient: see
docs/feedback.md). The reply after the dot is 250 only once what the message says is
recorded (the records' writes are synced); a failed write is 451, so the far MTA tries
again. A message that ties to nothing (junk, an unknown id, a DSN about nobody) is 250 too,
counted, and logged at most once a minute (WARNING, with how many came since: the port is
open to the internet, a flood of junk must not flood the log; each one is a DEBUG line):
making a far MTA retry it would gain nothing.
"""

from __future__ import annotations

import asyncio
import email.policy
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session
from flufl.bounce import all_failures

from txmail_relay.config.live import LiveConfig
from txmail_relay.ingress.auth import CredentialChecker, FailureLimiter
from txmail_relay.ingress.complaints import (
    ComplaintHandler,
    ComplaintsAddress,
    InvalidReportError,
    parse_report,
)
from txmail_relay.ingress.connections import ConnectionGate, peer_ip
from txmail_relay.ingress.smtp import REPLY_INTERNAL_ERROR, SubmissionProtocol, _help_of
from txmail_relay.mail.addresses import is_smtp_address
from txmail_relay.mail.return_path import ReturnPath, envelope_sender
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.model import Recipient
from txmail_relay.settings import LimitSettings
from txmail_relay.spool.segments import SpooledMessage

log = logging.getLogger(__name__)
# flufl.bounce logs every detector it runs (INFO) and a traceback when one fails on a message
# it cannot read (a bounce without From): such a message is junk here, counted and logged once.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

REPLY_NOT_OURS = "550 5.7.1 This address takes no mail (bounces and complaints only)"
REPLY_NO_AUTH = "502 5.5.1 AUTH is not available on this port"
REPLY_RECORDED = "250 2.6.0 Report recorded"
REPLY_UNTIED = "250 2.6.0 Report received (nothing to record)"
REPLY_NOT_A_COMPLAINT = "250 2.6.0 Report received (not a complaint)"
#: The ARF Feedback-Types that are complaints (RFC 5965 7.3: abuse, fraud).
COMPLAINT_TYPES = frozenset({"abuse", "fraud"})
REPLY_WRITE_FAILED = "451 4.3.0 Could not record the report, please try again later"

_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_SPACE = re.compile(r"\s+")
MAX_REPLY = 1000  # characters of a Diagnostic-Code kept
#: How long a replaced return path still takes DSNs (far MTAs retry and report for days).
PREVIOUS_RETURN_PATH_GRACE = 7 * 86400.0
UNTIED_LOG_INTERVAL = 60.0  # seconds between WARNING lines about messages tied to nothing
#: flufl.bounce's detectors read at most this much of a message (they run regular expressions
#: over every line: 10 s for a 10 MB message).
DETECT_BYTES = 256 * 1024


# -- the return path, as configured now -------------------------------------------------------


class LiveReturnPath:
    """The DedicatedIP's return path (``RelayConfig.returnPath``) at the moment it is asked,
    and the ones it replaced: a DSN about mail sent before the return-path domain (or local
    part) changed comes to the old address, days later. Those are accepted for
    :data:`PREVIOUS_RETURN_PATH_GRACE` after the change was first seen. Kept in memory: the
    delivery queue and the listener share one instance (every VERP address the relay used was
    made by it, so no change that mattered goes unseen); a restart forgets them
    (docs/feedback.md)."""

    def __init__(self, config: LiveConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._last: ReturnPath | None = None
        self._previous: dict[ReturnPath, float] = {}  # -> when it stopped being current

    def current(self) -> ReturnPath | None:
        config = self._config.current
        found = ReturnPath.of(config.relay.return_path) if config is not None else None
        if found != self._last:
            if self._last is not None:
                self._previous[self._last] = self._clock()
            if found is not None:
                self._previous.pop(found, None)
            self._last = found
        return found

    def accepted(self) -> list[ReturnPath]:
        """The current return path, then the previous ones still in their grace period."""
        current = self.current()
        now = self._clock()
        for old, since in list(self._previous.items()):
            if now - since > PREVIOUS_RETURN_PATH_GRACE:
                del self._previous[old]
        return ([current] if current is not None else []) + list(self._previous)

    def decode(self, address: str) -> str | None:
        """The spool id ``address`` carries under an accepted return path, or None."""
        for return_path in self.accepted():
            found = return_path.decode(address)
            if found is not None:
                return found
        return None

    def envelope_sender(self, msg: SpooledMessage) -> str:
        """The MAIL FROM of a delivery attempt of ``msg`` (the delivery queue asks)."""
        return envelope_sender(msg.mail_from, msg.id, self.current())


# -- reading a report (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One recipient a bounce is about."""

    recipients: tuple[str, ...]  # candidates, best first: Original-, then Final-Recipient
    hard: bool
    status: str  # RFC 3463 "5.1.1"
    reply: str  # the Diagnostic-Code without its type ("550 5.1.1 ..."), or ""
    source: str  # "dsn" (RFC 3464) or "detector" (flufl.bounce)
    # The reporting MTA gave up (Action: failed, whatever the status class): the message will
    # not arrive, so an API send is UNDELIVERABLE even when the bounce is soft (4.x.x).
    final: bool = False


@dataclass(frozen=True)
class Report:
    """What one inbound message is: ``kind`` "arf", "dsn", "bounce" (non-standard) or "junk"
    (none of these, or a DSN that is about no failure), and its failures."""

    kind: str
    failures: tuple[Failure, ...] = ()
    feedback_type: str | None = None  # an ARF report's (lower case); None: it does not parse


def _parse(data: bytes) -> Message:
    # compat32: the parser reads message/delivery-status into one Message per field block.
    return BytesParser(policy=email.policy.compat32).parsebytes(data)


def _report_type(msg: Message) -> str | None:
    if msg.get_content_type() != "multipart/report":
        return None
    value = msg.get_param("report-type")
    return value.lower() if isinstance(value, str) else None


def _unfold(value: object) -> str:
    return _SPACE.sub(" ", str(value or "")).strip()


def _typed_address(value: object) -> str | None:
    """``rfc822; user@example.com`` (RFC 3464 2.3.1, 2.3.2) -> ``user@example.com``."""
    text = _unfold(value)
    kind, semicolon, address = text.partition(";")
    if not semicolon:
        address, kind = text, "rfc822"
    if kind.strip().lower() != "rfc822":
        return None
    address = address.strip().strip("<>").strip()
    return address if is_smtp_address(address) else None


def _diagnostic(value: object) -> str:
    """``smtp; 550 5.1.1 <a@b>: unknown`` -> ``550 5.1.1 <a@b>: unknown``."""
    text = _unfold(value)
    kind, semicolon, rest = text.partition(";")
    if semicolon and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", kind.strip()):
        text = rest.strip()
    return text[:MAX_REPLY]


def _dsn_failures(msg: Message) -> tuple[Failure, ...] | None:
    """The failures of an RFC 3464 DSN; None when it has no delivery-status part."""
    blocks: list[Message] | None = None
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            payload = part.get_payload()
            if isinstance(payload, list):
                blocks = [b for b in payload if isinstance(b, Message)]
            break
    if blocks is None:
        return None
    failures = []
    for block in blocks[1:]:  # the first block is about the message, the others a recipient
        action = _unfold(block.get("Action")).lower()
        if action not in {"failed", "delayed"}:
            continue  # delivered, relayed, expanded: not a bounce
        found = _STATUS.search(_unfold(block.get("Status")))
        status = found.group(0) if found else ("5.0.0" if action == "failed" else "4.0.0")
        candidates = [
            a
            for a in (
                _typed_address(block.get("Original-Recipient")),
                _typed_address(block.get("Final-Recipient")),
            )
            if a is not None
        ]
        if not candidates:
            continue
        failures.append(
            Failure(
                recipients=tuple(dict.fromkeys(candidates)),
                hard=action == "failed" and status.startswith("5"),
                status=status,
                reply=_diagnostic(block.get("Diagnostic-Code")),
                source="dsn",
                final=action == "failed",
            )
        )
    return tuple(failures)


def _detected_failures(msg: Message) -> tuple[Failure, ...]:
    """What flufl.bounce's detectors find in a bounce that is not RFC 3464."""
    temporary, permanent = all_failures(msg)
    failures = []
    for hard, found in ((True, permanent), (False, temporary - permanent)):
        for raw in sorted(found):
            address = raw.decode("ascii", "replace").strip().strip("<>")
            if is_smtp_address(address):
                failures.append(
                    Failure((address,), hard, "5.0.0" if hard else "4.0.0", "", "detector", hard)
                )
    return tuple(failures)


def read_report(data: bytes) -> Report:
    """What ``data`` (one inbound message) reports. Never raises: the stdlib parser and the
    detectors can fail in many ways on hostile MIME (a report nested 3,000 deep), and such a
    message is junk."""
    try:
        msg = _parse(data)
        kind = _report_type(msg)
        if kind == "feedback-report":
            try:
                return Report("arf", feedback_type=parse_report(data).feedback_type)
            except InvalidReportError:
                return Report("arf")  # the complaint handler counts it as invalid
        if kind == "delivery-status":
            failures = _dsn_failures(msg)
            if failures is not None:
                return Report("dsn", failures) if failures else Report("junk")
        if len(data) > DETECT_BYTES:
            msg = _parse(data[:DETECT_BYTES])
        detected = _detected_failures(msg)
    except Exception as e:  # RecursionError, the parser's and the detectors' own errors
        log.debug("inbound message does not parse: %s", type(e).__name__)
        return Report("junk")
    return Report("bounce", detected) if detected else Report("junk")


# -- the SMTP side ----------------------------------------------------------------------------


class BounceRecorder(Protocol):
    """``records.events.bounce`` (H1's): ties a bounce to its message and recipient."""

    def __call__(
        self,
        spool_id: str,
        recipient: str,
        *,
        hard: bool,
        status: str,
        reply: str,
        category: str | None,
        source: str,
        at: float,
        final: bool | None = None,
    ) -> Any: ...


class InboundHandler:
    """aiosmtpd handler hooks of the inbound listener."""

    def __init__(
        self,
        config: LiveConfig,
        limits: LimitSettings,
        metrics: RelayMetrics,
        *,
        bounce: BounceRecorder,
        complaints: ComplaintHandler,
        complaints_address: str | None = None,
        return_path: LiveReturnPath | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        # The delivery queue's (app.py): it sees every return path the relay used.
        self._return_path = return_path or LiveReturnPath(config, clock=clock)
        self._limits = limits
        self._metrics = metrics
        self._bounce = bounce
        self._complaints = complaints
        self._complaints_address = ComplaintsAddress(config, complaints_address).current
        self._clock = clock
        self._untied_logged_at: float | None = None
        self._untied_since = 0  # messages tied to nothing since the last WARNING line

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """No AUTH here: aiosmtpd would list an empty ``AUTH`` after STARTTLS."""
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Any sender: DSNs come from <> (RFC 3464 2), reports from the provider's address.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._limits.max_recipients:
            self._metrics.inbound_refusals.labels("recipients").inc()
            return "452 4.5.3 Too many recipients"
        lowered = address.lower()
        ours = self._return_path.decode(lowered) is not None
        if not ours and lowered != self._complaints_address():
            self._metrics.inbound_refusals.labels("recipient").inc()
            log.debug("inbound recipient refused", extra={"peer": peer_ip(session.peer)})
            return REPLY_NOT_OURS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    def _spool_ids(self, rcpts: list[str]) -> Iterator[str]:
        seen: set[str] = set()
        for rcpt in rcpts:
            spool_id = self._return_path.decode(rcpt)
            if spool_id is not None and spool_id not in seen:
                seen.add(spool_id)
                yield spool_id

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        content = envelope.original_content
        if not isinstance(content, bytes):
            return REPLY_INTERNAL_ERROR
        report = await asyncio.to_thread(read_report, content)  # CPU work: off the loop
        peer = peer_ip(session.peer)
        try:
            if report.kind == "arf":
                if report.feedback_type is not None and (
                    report.feedback_type not in COMPLAINT_TYPES
                ):
                    self._metrics.inbound_messages.labels("arf", "ignored").inc()
                    log.debug("feedback report not a complaint", extra={"peer": peer})
                    return REPLY_NOT_A_COMPLAINT
                found = await self._complaints.handle(content, level=logging.DEBUG)
                return self._done("arf", 1 if found is not None else 0, peer)
            if report.kind == "junk":
                return self._done("junk", 0, peer)
            ids = list(self._spool_ids(envelope.rcpt_tos))
            recorded = 0
            for failure in report.failures:
                if await self._record(ids, failure) is not None:
                    recorded += 1
            return self._done(report.kind, recorded, peer)
        except Exception as e:  # the records could not be written: the far MTA retries
            self._metrics.inbound_messages.labels(report.kind, "failed").inc()
            log.error("inbound report not recorded: %s", type(e).__name__)  # noqa: TRY400
            return REPLY_WRITE_FAILED

    async def _record(self, ids: list[str], failure: Failure) -> Recipient | None:
        """The first (message, recipient) the failure ties to, recorded; None: none."""
        for spool_id in ids:
            for recipient in failure.recipients:
                found: Recipient | None = await self._bounce(
                    spool_id,
                    recipient,
                    hard=failure.hard,
                    status=failure.status,
                    reply=failure.reply,
                    category=None,  # the records' RFC 3463 -> HubSpot category
                    source="DSN",
                    at=self._clock(),
                    final=failure.final,
                )
                if found is not None:
                    self._metrics.inbound_bounces.labels(
                        "HARD" if failure.hard else "SOFT", failure.source
                    ).inc()
                    log.info(
                        "bounce recorded",
                        extra={
                            "msg_id": spool_id,
                            "token": found.username,
                            "hard": failure.hard,
                            "status": failure.status,
                        },
                    )
                    return found
        return None

    def _done(self, kind: str, recorded: int, peer: str) -> str:
        if recorded:
            self._metrics.inbound_messages.labels(kind, "recorded").inc()
            return REPLY_RECORDED
        # Junk, an unknown id, a recipient the message never had: once in the log, counted,
        # and accepted (a refusal would only make the far MTA retry or bounce the bounce).
        self._metrics.inbound_messages.labels(kind, "untied").inc()
        self._untied_since += 1
        now = self._clock()
        last = self._untied_logged_at
        if last is None or not 0 <= now - last < UNTIED_LOG_INTERVAL:
            log.warning(
                "inbound messages tied to nothing",
                extra={"kind": kind, "peer": peer, "count": self._untied_since},
            )
            self._untied_logged_at, self._untied_since = now, 0
        else:
            log.debug("inbound message tied to nothing", extra={"kind": kind, "peer": peer})
        return REPLY_UNTIED


class InboundProtocol(SubmissionProtocol):
    """One inbound connection: the submission protocol's limits, without AUTH."""

    def __init__(
        self,
        handler: InboundHandler,
        *,
        checker: CredentialChecker,
        limiter: FailureLimiter,
        metrics: RelayMetrics,
        limits: LimitSettings,
        hostname: str,
        tls_context: ssl.SSLContext,
        gate: ConnectionGate,
        on_open: Callable[[SubmissionProtocol], None],
        on_close: Callable[[SubmissionProtocol], None],
    ) -> None:
        super().__init__(
            handler,
            checker=checker,
            limiter=limiter,
            metrics=metrics,
            limits=limits,
            hostname=hostname,
            tls_context=tls_context,
            implicit_tls=False,
            gate=gate,
            on_open=on_open,
            on_close=on_close,
        )
        self._auth_required = False  # MAIL and RCPT without AUTH
        # A report is small: the listener's own limit (EHLO's SIZE, MAIL's SIZE=, DATA's 552).
        self.data_size_limit = limits.max_inbound_message_size

    @_help_of(SMTP.smtp_AUTH)
    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's hook name
        await self.push(REPLY_NO_AUTH)
