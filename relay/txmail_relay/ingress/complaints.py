"""Complaints: ARF feedback reports (RFC 5965) tied back to the token and recipient.

A report is a ``multipart/report; report-type=feedback-report`` with a
``message/feedback-report`` part (``Feedback-Type``, ``Original-Rcpt-To``, ...) and the
original message (``message/rfc822``) or its headers (``text/rfc822-headers``). The
original ``Message-ID`` leads to the send in the store; ``Original-Rcpt-To`` (or the
original ``To``) picks the recipient when the message had several. A complaint is recorded
as a complaint and an unsubscribe, once per message and recipient. Transactional mail is
still delivered to that recipient.
"""

from __future__ import annotations

import email.policy
import logging
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser, HeaderParser

from txmail_relay.config.live import LiveConfig
from txmail_relay.mail.addresses import addr_specs
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.model import Recipient
from txmail_relay.records.records import Records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackReport:
    feedback_type: str
    original_message_id: str
    recipients: tuple[str, ...]


class InvalidReportError(ValueError):
    """Not an ARF report, or one without the original Message-ID."""


def _headers_of(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str):
        return HeaderParser(policy=email.policy.default).parsestr(payload)
    return None


def parse_report(data: bytes) -> FeedbackReport:
    """The report ``data`` carries; raises :class:`InvalidReportError` (only).

    The stdlib parser recurses once per nested multipart and can fail in other ways on
    hostile MIME (a report nested 3,000 deep); any such failure makes the report invalid.
    """
    try:
        return _parse_report(data)
    except InvalidReportError:
        raise
    except Exception as e:  # RecursionError, and the parser's own errors on broken input
        raise InvalidReportError(f"the report does not parse ({type(e).__name__})") from None


def _parse_report(data: bytes) -> FeedbackReport:
    msg = BytesParser(policy=email.policy.compat32).parsebytes(data)
    report_type = msg.get_param("report-type")
    if msg.get_content_type() != "multipart/report" or (
        not isinstance(report_type, str) or report_type.lower() != "feedback-report"
    ):
        raise InvalidReportError("not a multipart/report; report-type=feedback-report")
    fields = original = None
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/feedback-report" and fields is None:
            fields = _headers_of(part)
        elif kind in {"message/rfc822", "text/rfc822-headers"} and original is None:
            original = _headers_of(part)
    if fields is None or original is None:
        raise InvalidReportError("the report lacks its feedback fields or original message")
    message_id = str(original.get("Message-ID") or "").strip()
    if not message_id:
        raise InvalidReportError("the original message has no Message-ID")
    rcpts = [str(v) for v in fields.get_all("Original-Rcpt-To") or []]
    rcpts += [str(v) for v in original.get_all("To") or []]
    return FeedbackReport(
        feedback_type=str(fields.get("Feedback-Type") or "abuse").strip().lower(),
        original_message_id=message_id,
        recipients=addr_specs(rcpts),
    )


class ComplaintsAddress:
    """Where ARF reports are taken (submission and the inbound listener alike): the
    DedicatedIP's feedback.complaintsAddress (live), else the settings file's; lower-cased,
    None when neither is set."""

    def __init__(self, config: LiveConfig, static: str | None) -> None:
        self._config = config
        self._static = (static or "").lower() or None

    def current(self) -> str | None:
        config = self._config.current
        live = config.relay.feedback.complaints_address if config is not None else None
        return (live or "").lower() or self._static


class ComplaintHandler:
    def __init__(self, records: Records, metrics: RelayMetrics) -> None:
        self._records = records
        self._metrics = metrics

    async def handle(self, data: bytes, *, level: int = logging.WARNING) -> Recipient | None:
        """Record the complaint a report carries; None if it is not ours or not valid.

        ``level``: of the lines about a report that is refused or ties to nothing (the
        inbound listener, open to anyone, logs those itself at most once a minute)."""
        try:
            report = parse_report(data)
        except InvalidReportError as e:
            self._metrics.complaint_reports.labels("invalid").inc()
            log.log(level, "feedback report refused: %s", e)
            return None
        found = await self._records.events.find_message(
            report.original_message_id, report.recipients
        )
        if found is None:
            self._metrics.complaint_reports.labels("unknown").inc()
            log.log(level, "feedback report about an unknown message")
            return None
        await self._records.events.complaint(found)
        self._metrics.complaint_reports.labels("recorded").inc()
        log.info(
            "complaint recorded",
            extra={
                "token": found.username,
                "msg_id": found.spool_id,
                "feedback_type": report.feedback_type,
            },
        )
        return found
