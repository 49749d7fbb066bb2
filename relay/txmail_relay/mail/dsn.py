"""Delivery status notifications: the RFC 3461 parameters a sender gives, and the RFC 3464
report the relay sends back when it gives up on a recipient (pure: no I/O, no clock).

Submission (ingress/smtp.py) reads ``NOTIFY`` and ``ORCPT`` on RCPT TO and ``RET`` and
``ENVID`` on MAIL FROM with :func:`parse_mail_params` / :func:`parse_rcpt_params`; they travel
with the message in the spool (:class:`DsnEnvelope`, JSON in the segment's metadata). When
the queue records a final failure (5xx, or the queue lifetime reached), :func:`build_dsn`
writes the report with the stdlib ``email`` package (its generator knows
``message/delivery-status``): a human-readable part, the machine-readable status (RFC 3464
§2.2 and §2.3, RFC 3463 codes) and the original's header section (or the whole message when
the sender asked ``RET=FULL`` and it is small).

xtext (RFC 3461 §4) is decoded here by hand: the stdlib has no codec for it and it is five
lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.policy import compat32
from email.utils import formatdate, make_msgid
from typing import Any

from txmail_relay.contract import DsnPolicy

NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
RET_VALUES = frozenset({"FULL", "HDRS"})
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2
#: RET=FULL returns the whole original only below this size; above, its headers.
MAX_RETURNED_BYTES = 256 * 1024
#: The RFC 3463 status when the relay gave up because the queue lifetime was reached.
EXPIRED_STATUS = "4.4.7"
#: Characters of a far MTA's reply kept in a report (a multi-line reply can be long; with the
#: field name this stays far below RFC 5322's 998 per line even unfolded).
MAX_DIAGNOSTIC = 900

_XTEXT_CHAR = re.compile(r"[!-*,-<>-~]")  # printable ASCII but "+" and "="
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_ENHANCED = re.compile(r"^[245]\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")
_BASIC = re.compile(r"^([245])\d\d\b")


class DsnParamError(ValueError):
    """A DSN parameter with a malformed value: ``reply`` is the SMTP reply to give."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def xtext_decode(value: str) -> str | None:
    """The text an xtext stands for, or None when ``value`` is not xtext."""
    if _XTEXT.fullmatch(value) is None:
        return None
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    return "".join(c if _XTEXT_CHAR.fullmatch(c) else f"+{ord(c):02X}" for c in value)


@dataclass(frozen=True)
class RecipientParams:
    """RCPT TO's DSN parameters. ``notify`` None: no NOTIFY given."""

    notify: frozenset[str] | None = None
    orcpt: str | None = None  # "<addr-type>;<address>", xtext decoded

    def wants_failure(self, policy: DsnPolicy) -> bool:
        """Whether a failure of this recipient gets a DSN under ``policy``.

        ``OnRequest``: NOTIFY names FAILURE, or there was no NOTIFY (RFC 3461 §5.1 leaves that
        to the MTA, "as if NOTIFY=FAILURE,DELAY"; the relay sends failures only, never delay
        notices); NOTIFY=NEVER or SUCCESS/DELAY without FAILURE: none. ``Always``: every
        failure but NOTIFY=NEVER, which wins over every policy (RFC 3461 §5.1: "MUST NOT"
        send one then)."""
        if policy is DsnPolicy.NEVER or self.notify == frozenset({"NEVER"}):
            return False
        if policy is DsnPolicy.ALWAYS:
            return True
        return self.notify is None or "FAILURE" in self.notify


@dataclass(frozen=True)
class DsnEnvelope:
    """The DSN parameters of one spooled message: ``recipients`` in the order of its
    recipients. A message without one (API and template sends, DSNs themselves, mail spooled
    before the relay knew DSNs) never gets a DSN."""

    ret: str | None = None
    envid: str | None = None
    recipients: tuple[RecipientParams, ...] = ()

    def recipient(self, index: int) -> RecipientParams:
        if 0 <= index < len(self.recipients):
            return self.recipients[index]
        return RecipientParams()

    def select(self, every: Sequence[str], chosen: Iterable[str]) -> DsnEnvelope:
        """The envelope of a copy that goes to ``chosen``, some of the message's ``every``
        recipients (the parameters of an address given twice: its first RCPT)."""
        by_address: dict[str, RecipientParams] = {}
        for address, params in zip(every, self.recipients, strict=False):
            by_address.setdefault(address, params)
        return DsnEnvelope(
            self.ret, self.envid, tuple(by_address.get(a, RecipientParams()) for a in chosen)
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "rcpt": [
                {
                    **({"notify": sorted(p.notify)} if p.notify is not None else {}),
                    **({"orcpt": p.orcpt} if p.orcpt is not None else {}),
                }
                for p in self.recipients
            ]
        }
        if self.ret is not None:
            doc["ret"] = self.ret
        if self.envid is not None:
            doc["envid"] = self.envid
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DsnEnvelope:
        return cls(
            ret=doc.get("ret"),
            envid=doc.get("envid"),
            recipients=tuple(
                RecipientParams(
                    notify=frozenset(r["notify"]) if "notify" in r else None,
                    orcpt=r.get("orcpt"),
                )
                for r in doc.get("rcpt", ())
            ),
        )


def _split(params: Sequence[str], names: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """The DSN parameters among ``params`` (keyword upper-cased, value as given) and the
    others, in order. A DSN keyword twice, or without a value, is a syntax error."""
    found: dict[str, str] = {}
    others: list[str] = []
    for param in params:
        key, eq, value = param.partition("=")
        name = key.upper()
        if name not in names:
            others.append(param)
            continue
        if name in found:
            raise DsnParamError(f"501 5.5.4 Duplicate {name} parameter")
        if not eq or not value:
            raise DsnParamError(f"501 5.5.4 {name} needs a value")
        found[name] = value
    return found, others


def parse_mail_params(params: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """(RET, ENVID, the other parameters) of MAIL FROM; raises :class:`DsnParamError`."""
    found, others = _split(params, frozenset({"RET", "ENVID"}))
    ret = found.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in RET_VALUES:
            raise DsnParamError("501 5.5.4 RET must be FULL or HDRS")
    envid = found.get("ENVID")
    if envid is not None:
        decoded = xtext_decode(envid)
        if decoded is None or len(envid) > MAX_ENVID:
            raise DsnParamError("501 5.5.4 ENVID must be xtext of at most 100 characters")
        if any(not " " <= c <= "~" for c in decoded):  # RFC 3461 4.4: printable US-ASCII
            raise DsnParamError("501 5.5.4 ENVID must decode to printable ASCII")
        envid = decoded
    return ret, envid, others


def parse_rcpt_params(params: Sequence[str]) -> tuple[RecipientParams, list[str]]:
    """(NOTIFY and ORCPT, the other parameters) of RCPT TO; raises :class:`DsnParamError`."""
    found, others = _split(params, frozenset({"NOTIFY", "ORCPT"}))
    notify = None
    if "NOTIFY" in found:
        values = found["NOTIFY"].upper().split(",")
        if values == ["NEVER"]:
            notify = frozenset(values)
        elif len(set(values)) != len(values) or not set(values) <= NOTIFY_VALUES:
            raise DsnParamError(
                "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
            )
        else:
            notify = frozenset(values)
    orcpt = None
    if "ORCPT" in found:
        raw = found["ORCPT"]
        kind, semicolon, address = raw.partition(";")
        decoded = xtext_decode(address) if semicolon else None
        if (
            decoded is None
            or not decoded
            or _ATOM.fullmatch(kind) is None
            or len(raw) > MAX_ORCPT
            or any(not " " <= c <= "~" for c in decoded)
        ):
            raise DsnParamError("501 5.5.4 ORCPT must be <addr-type>;<xtext address>")
        orcpt = f"{kind.lower()};{decoded}"
    return RecipientParams(notify, orcpt), others


# -- the report --------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedRecipient:
    recipient: str
    reply: str  # the last SMTP reply (the remote's, or the relay's own)
    expired: bool  # the queue lifetime was reached (else a permanent failure)
    params: RecipientParams
    at: float  # the last attempt
    remote_mta: str | None = None


def status_of(reply: str, *, expired: bool) -> str:
    """The RFC 3463 status of a failure: the reply's enhanced code, else from its class."""
    if expired:
        return EXPIRED_STATUS
    found = _ENHANCED.match(reply)
    if found is not None and found.group(1) == reply[0]:
        return ".".join(found.groups())
    basic = _BASIC.match(reply)
    return f"{basic.group(1)}.0.0" if basic is not None and basic.group(1) != "2" else "5.0.0"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def printable(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """A far MTA's reply as a report may carry it: one line of printable ASCII (RFC 3464
    §2.3.6: Diagnostic-Code is US-ASCII; RFC 2047 words are not allowed in it), every other
    character "?" as Postfix's printable() does (aiosmtplib hands 8-bit bytes over as
    surrogate escapes, which no codec writes), at most ``limit`` characters (ending "...")."""
    cleaned = _one_line("".join(c if " " <= c <= "~" else "?" for c in _one_line(text)))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3].rstrip() + "..."


def header_section(original: bytes) -> bytes:
    """The original's header section, up to its first empty line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = original.find(sep)
        if end != -1:
            return original[: end + len(sep) // 2]
    return original


def _field_block(fields: Sequence[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def build_dsn(
    *,
    hostname: str,
    sender: str,
    failed: Sequence[FailedRecipient],
    original: bytes | None,
    arrived: float,
    envelope: DsnEnvelope,
    now: float,
) -> bytes:
    """An RFC 3464 report of ``failed`` recipients of one message, to ``sender``."""
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    expired = all(f.expired for f in failed)
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients."
        + (" The relay tried for as long as it keeps mail and gave up." if expired else ""),
        "",
    ]
    for f in failed:
        lines.append(f"<{printable(f.recipient)}>: {printable(f.reply)}")
    text = "\r\n".join(lines) + "\r\n"
    human = MIMEText(text, "plain", "us-ascii")
    human["Content-Description"] = "Notification"

    per_message = [("Reporting-MTA", f"dns; {hostname}")]
    if envelope.envid is not None:
        # printable(): an ENVID spooled before it was checked must not lose the report.
        per_message.append(("Original-Envelope-Id", printable(envelope.envid, MAX_ENVID)))
    per_message.append(("Arrival-Date", formatdate(arrived)))
    blocks = [_field_block(per_message)]
    for f in failed:
        fields = []
        if f.params.orcpt is not None:
            kind, _, address = f.params.orcpt.partition(";")
            fields.append(("Original-Recipient", f"{kind}; {address}"))
        fields += [
            ("Final-Recipient", f"rfc822; {f.recipient}"),
            ("Action", "failed"),
            ("Status", status_of(f.reply, expired=f.expired)),
        ]
        if f.remote_mta is not None:
            fields.append(("Remote-MTA", f"dns; {f.remote_mta}"))
        if f.reply:
            fields.append(("Diagnostic-Code", f"smtp; {printable(f.reply)}"))
        fields.append(("Last-Attempt-Date", formatdate(f.at)))
        blocks.append(_field_block(fields))
    status = MIMEBase("message", "delivery-status")
    del status["MIME-Version"]
    status.set_payload(blocks)  # type: ignore[arg-type] # the generator writes each block
    status["Content-Description"] = "Delivery report"

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{sender}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(now)
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answered automatically
    report.attach(human)
    report.attach(status)
    if original is not None:
        if envelope.ret == "FULL" and len(original) <= MAX_RETURNED_BYTES:
            whole = BytesParser(policy=compat32).parsebytes(original)
            returned: Message = MIMEMessage(whole)
            del returned["MIME-Version"]
        else:
            returned = MIMEBase("text", "rfc822-headers")
            del returned["MIME-Version"]
            # 8-bit bytes in the headers go back as they came (the generator writes them).
            returned.set_payload(header_section(original).decode("ascii", "surrogateescape"))
        returned["Content-Description"] = "Undelivered message headers"
        report.attach(returned)
    return report.as_bytes(policy=compat32.clone(linesep="\r\n"))
