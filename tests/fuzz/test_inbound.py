"""Fuzz targets for the inbound listener (hypothesis): whatever a far MTA sends, the report
reader never raises and names only well-formed addresses, the return-path decoder is total and
reads back exactly what the encoder wrote, and over real SMTP every command gets one reply,
never a 4xx for the sender's input, and nothing is recorded against a recipient the message
never had.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuzz.conftest import examples
from relay.relaykit import RelayEnv, return_path_overrides, verp
from txmail_relay.ingress.inbound import Report, read_report
from txmail_relay.mail.addresses import is_smtp_address
from txmail_relay.mail.return_path import SPOOL_ID, ReturnPath
from txmail_relay.records.model import EventType

CORPUS = Path(__file__).parents[1] / "relay" / "corpus"
RETURN_PATH = ReturnPath("bounces.example.com")
# The corpus about the message's own recipient and about one it never had (a forgery).
SEEDS = sorted(
    re.sub(rb"\$RCPT\d?", rcpt, p.read_bytes())
    for p in CORPUS.glob("*.eml")
    for rcpt in (b"ada@dest.test", b"victim@dest.test")
)

# What DSNs are made of: the field names, the values and the MIME around them.
FIELDS = [
    *("Final-Recipient", "Original-Recipient", "Action", "Status", "Diagnostic-Code"),
    *("Reporting-MTA", "Content-Type", "Feedback-Type", "Original-Rcpt-To", "From"),
]
VALUES = [
    *("rfc822; a@dest.test", "rfc822;<a@dest.test>", "x400; a", "rfc822;", "failed", "delayed"),
    *("relayed", "5.1.1", "4.4.7", "9.9.9", "5.1", "smtp; 550 5.1.1 no", ";", "<>", "\x00", "Ö"),
    "multipart/report; report-type=delivery-status; boundary=b",
    "message/delivery-status",
    "multipart/report; report-type=feedback-report; boundary=b",
]
line = st.tuples(
    st.sampled_from(FIELDS), st.sampled_from([": ", ":", " : "]), st.sampled_from(VALUES)
).map("".join)
section = st.lists(
    st.one_of(line, st.sampled_from(["", "--b", "--b--", " folded"])), max_size=24
).map("\r\n".join)
inbound_bytes = st.one_of(
    st.binary(max_size=600),
    section.map(lambda s: s.encode("utf-8", "surrogateescape")),
    st.tuples(st.sampled_from(SEEDS), st.integers(0, 4000), st.binary(max_size=40)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
)


@given(inbound_bytes)
@example(b"")
@example(b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\n")
@example(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 3000)
def test_read_report_never_raises_and_names_only_addresses(data: bytes) -> None:
    report = read_report(data)
    assert isinstance(report, Report)
    assert report.kind in {"arf", "dsn", "bounce", "junk"}
    for failure in report.failures:
        assert failure.recipients
        assert all(is_smtp_address(r) for r in failure.recipients)
        assert failure.status[0] in "45"
        assert failure.hard == failure.status.startswith("5") or not failure.hard


@given(st.text(max_size=80))
@example("bounces+0123456789abcdef@bounces.example.com")
@example("BOUNCES+0123456789ABCDEF@BOUNCES.EXAMPLE.COM.")
def test_return_path_decode_is_total_and_strict(address: str) -> None:
    spool_id = RETURN_PATH.decode(address)
    if spool_id is not None:
        assert SPOOL_ID.fullmatch(spool_id)
        assert RETURN_PATH.decode(RETURN_PATH.encode(spool_id)) == spool_id
        assert address.strip().lower().rstrip(".") == RETURN_PATH.encode(spool_id)


@given(st.from_regex(SPOOL_ID, fullmatch=True))
def test_return_path_round_trips(spool_id: str) -> None:
    encoded = RETURN_PATH.encode(spool_id)
    assert is_smtp_address(encoded)
    assert RETURN_PATH.decode(encoded) == spool_id
    assert RETURN_PATH.decode(encoded.upper()) == spool_id


# -- whole transactions against the real listener ---------------------------------------------

INBOUND_RCPTS = ["$VERP", "$VERP_UPPER", "fbl@relay.test", "bounces@bounces.example.com", '"']
INBOUND_SENDERS = ["", "mailer-daemon@mx.dest.test", "0@[@0", '"']


def _reply(smtp: smtplib.SMTP, line: bytes) -> int:
    smtp.send(line + b"\r\n")
    return smtp.getreply()[0]


def test_inbound_transactions_get_one_reply_each_and_record_only_real_recipients(
    env: RelayEnv,
) -> None:
    overrides = return_path_overrides()
    overrides["relay"]["feedback"] = {"complaintsAddress": "fbl@relay.test"}
    relay = env.start(env.settings(overrides=overrides))
    # One real message to ada@dest.test: its id is what the hostile DSNs are tagged with.
    with env.client(relay) as smtp:
        smtp.mail("app@example.com")
        smtp.rcpt("ada@dest.test")
        code, reply = smtp.data(
            b"From: app@example.com\r\nTo: ada@dest.test\r\nSubject: x\r\n\r\nbody\r\n"
            b"END-OF-MESSAGE 1\r\n"
        )
    assert code == 250, reply
    found = re.search(rb"queued as ([0-9a-f]{16})", reply)
    assert found
    address = verp(found.group(1).decode())
    temporary: list[tuple[str, int]] = []

    @settings(max_examples=examples(30))
    @given(
        st.sampled_from(INBOUND_SENDERS),
        st.lists(st.sampled_from(INBOUND_RCPTS), min_size=1, max_size=3),
        inbound_bytes,
    )
    def run(sender: str, rcpts: list[str], data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=10) as smtp:
            smtp.ehlo("mx.dest.test")
            codes = [("MAIL", _reply(smtp, f"MAIL FROM:<{sender}>".encode()))]
            for template in rcpts:
                rcpt = template.replace("$VERP_UPPER", address.upper()).replace("$VERP", address)
                codes.append(("RCPT", _reply(smtp, f"RCPT TO:<{rcpt}>".encode())))
            code = _reply(smtp, b"DATA")
            codes.append(("DATA", code))
            if code == 354:
                body = re.sub(rb"(?m)^\.", b"..", data.replace(b"\r", b"").replace(b"\n", b"\r\n"))
                smtp.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
                codes.append(("end of data", smtp.getreply()[0]))
            # Still in step: each of these gets its own reply, and only its own.
            assert _reply(smtp, b"RSET") == 250
            assert _reply(smtp, b"NOOP") == 250
            temporary.extend((what, c) for what, c in codes if c // 100 == 4)

    run()
    assert not temporary, temporary
    assert relay.relay is not None and relay._loop is not None
    records = relay.relay.records

    async def recorded() -> list[str]:
        events = await records.events.after(0, types=[EventType.BOUNCE], limit=1000)
        return [e.recipient for e in events]

    found_recipients = asyncio.run_coroutine_threadsafe(recorded(), relay._loop).result(10)
    assert set(found_recipients) <= {"ada@dest.test"}
