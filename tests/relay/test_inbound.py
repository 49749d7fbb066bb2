"""The return path (VERP) and the inbound listener, with a real client and real peers.

Mail is submitted over SMTP and delivered to smtp-sink (tests/peers.py), which shows the
envelope sender each attempt used; DSNs and ARF reports from the fixture corpus
(tests/relay/corpus/, hand-written in the layouts Postfix, Sendmail, Gmail, qmail and Hotmail
use) are sent with smtplib to the relay's inbound listener, and what they did is read back
from the records' events log and the published stats.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import smtplib
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from relay.relaykit import (
    RETURN_PATH_DOMAIN,
    Captured,
    RelayEnv,
    RelayThread,
    bearer,
    http,
    parsed,
    return_path_overrides,
    send_request,
    template_doc,
    verp,
    wait_for,
    wait_token_stats,
)
from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import RelayConfig, ReturnPathConfig
from txmail_relay.http.api import SEND_PATH, STATUS_PATH
from txmail_relay.ingress.inbound import (
    DETECT_BYTES,
    PREVIOUS_RETURN_PATH_GRACE,
    LiveReturnPath,
    read_report,
)
from txmail_relay.mail.return_path import ReturnPath, envelope_sender
from txmail_relay.records.model import Event, EventType

CORPUS = Path(__file__).parent / "corpus"
COMPLAINTS = "fbl@relay.test"
SENDER = "app@example.com"
MAX_SIZE = 1_000_000  # submission's limit
INBOUND_MAX_SIZE = 64 * 1024  # the inbound listener's own, smaller
EMAIL_ID = 21
T = TypeVar("T")


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    overrides = return_path_overrides()
    overrides["relay"]["feedback"] = {"complaintsAddress": COMPLAINTS}
    overrides["relay"]["suppression"] = {"bounces": True}  # hard bounces are enforced
    overrides.update(
        {
            "statsFile": "stats.json",
            "statsInterval": 0.1,
            "limits": {
                "maxMessageSize": MAX_SIZE,
                "maxInboundMessageSize": INBOUND_MAX_SIZE,
                "spoolMinFreeBytes": 0,
            },
            "templates": [template_doc(EMAIL_ID)],
        }
    )
    return env.start(env.settings(overrides=overrides))


# -- helpers -----------------------------------------------------------------------------------


def corpus(name: str, **values: str) -> bytes:
    """A corpus message with its ``$NAME`` placeholders filled in, CRLF line ends."""
    text = (CORPUS / name).read_text()
    for key in sorted(values, key=len, reverse=True):  # $RCPT1 before $RCPT
        text = text.replace(f"${key}", values[key])
    assert "$" not in re.sub(r"\$[^A-Z]", "", text), f"{name}: a placeholder left"
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def submit(env: RelayEnv, relay: RelayThread, rcpts: list[str]) -> tuple[str, str]:
    """Submit one message to ``rcpts``; (its spool id, its Message-ID)."""
    message_id = f"<{secrets.token_hex(8)}@example.com>"
    body = (
        f"From: App <{SENDER}>\r\nTo: {', '.join(rcpts)}\r\nSubject: Your order\r\n"
        f"Message-ID: {message_id}\r\n\r\nYour order shipped.\r\n"
        "END-OF-MESSAGE 1\r\n"  # smtp-sink's dump is complete (tests/peers.py)
    ).encode()
    with env.client(relay) as smtp:
        smtp.mail(SENDER)
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(body)
    assert code == 250, reply
    found = re.search(rb"queued as ([0-9a-f]{16})", reply)
    assert found, reply
    return found.group(1).decode(), message_id


def inbound(
    relay: RelayThread,
    rcpts: list[str],
    body: bytes,
    *,
    mail_from: str = "",
    starttls: ssl.SSLContext | None = None,
) -> tuple[int, str]:
    """One message to the inbound listener, as a far MTA sends a DSN (``MAIL FROM:<>``); the
    reply after the dot, or the first refusal."""
    with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=10) as smtp:
        smtp.ehlo("mx.dest.test")
        if starttls is not None:
            smtp.starttls(context=starttls)
            smtp.ehlo("mx.dest.test")
        code, reply = smtp.mail(mail_from)
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            if code != 250:
                return code, reply.decode()
        code, reply = smtp.data(body)
        return code, reply.decode()


def on_loop(relay: RelayThread, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine of the relay's (its records) on the relay's own loop."""
    assert relay._loop is not None

    async def run() -> T:
        return await make()

    return asyncio.run_coroutine_threadsafe(run(), relay._loop).result(10)


def events(relay: RelayThread, *types: EventType) -> list[Event]:
    assert relay.relay is not None
    records = relay.relay.records
    return on_loop(relay, lambda: records.events.after(0, types=types, limit=1000))


def bounces(relay: RelayThread) -> list[Event]:
    return events(relay, EventType.BOUNCE)


def delivered(env: RelayEnv, count: int) -> None:
    env.sink.wait(count)


# -- the return path of deliveries --------------------------------------------------------------


def api_send(env: RelayEnv, relay: RelayThread, to: str, expected: int = 200) -> Any:
    """Send template EMAIL_ID to ``to`` through the HTTP API; the reply's JSON body."""
    doc = {**send_request(to), "emailId": EMAIL_ID}
    reply = http(relay.api_port, "POST", SEND_PATH, body=doc, headers=bearer(env.password))
    assert reply.status == expected, reply.body
    return reply.json()


def api_status(env: RelayEnv, relay: RelayThread, status_id: str) -> Any:
    """The HTTP API's send status of ``status_id``."""
    path = STATUS_PATH.format(statusId=status_id)
    return http(relay.api_port, "GET", path, headers=bearer(env.password)).json()


def api_send_delivered(env: RelayEnv, relay: RelayThread, to: str) -> tuple[Any, Captured, str]:
    """api_send, once smtp-sink has the message and its status is SENT: the reply, smtp-sink's
    copy, and the message's spool id (read from the copy's VERP envelope sender)."""
    first = api_send(env, relay, to)
    [captured] = env.sink.wait(1)
    wait_for(lambda: api_status(env, relay, first["statusId"])["sendResult"] == "SENT", what="SENT")
    # What the far MTA has of the message: its envelope sender, the VERP address.
    spool_id = ReturnPath(RETURN_PATH_DOMAIN).decode(captured.mail_from.strip("<>"))
    assert spool_id is not None
    return first, captured, spool_id


def test_delivery_envelope_sender_is_the_verp_address_and_header_from_the_apps(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, message_id = submit(env, relay, ["ada@dest.test"])
    [captured] = env.sink.wait(1)
    assert captured.mail_from == f"<bounces+{spool_id}@{RETURN_PATH_DOMAIN}>"
    assert captured.mail_from == f"<{verp(spool_id)}>"
    message = parsed(captured)
    assert message["From"] == f"App <{SENDER}>"
    assert message["Message-ID"] == message_id


def test_without_a_return_path_domain_the_envelope_sender_is_the_apps(env: RelayEnv) -> None:
    relay = env.start()
    submit(env, relay, ["ada@dest.test"])
    [captured] = env.sink.wait(1)
    assert captured.mail_from == f"<{SENDER}>"


def test_return_path_encoding_is_strict_and_case_insensitive() -> None:
    rp = ReturnPath("bounces.example.com")
    address = rp.encode("0123456789abcdef")
    assert address == "bounces+0123456789abcdef@bounces.example.com"
    assert rp.decode(address) == "0123456789abcdef"
    assert rp.decode("BOUNCES+0123456789ABCDEF@Bounces.Example.COM") == "0123456789abcdef"
    assert rp.decode("bounces+0123456789abcdef@bounces.example.com.") == "0123456789abcdef"
    for other in (
        "bounces@bounces.example.com",  # no tag
        "bounces+0123456789abcde@bounces.example.com",  # too short
        "bounces+0123456789abcdefg@bounces.example.com",  # too long
        "bounces+0123456789abcdeg@bounces.example.com",  # not hex
        "bounces+0123456789abcdef+x@bounces.example.com",  # two tags
        "other+0123456789abcdef@bounces.example.com",  # another local part
        "bounces+0123456789abcdef@example.com",  # another domain
        "bounces+0123456789abcdef@evil.bounces.example.com",
        "<bounces+0123456789abcdef@bounces.example.com>",
        "",
        "@",
    ):
        assert rp.decode(other) is None, other
    with pytest.raises(ValueError, match="spool id"):
        rp.encode("../../etc")
    # The null reverse path (a DSN) keeps it; no domain keeps the app's sender.
    assert envelope_sender("<>", "0123456789abcdef", rp) == "<>"
    assert envelope_sender("", "0123456789abcdef", rp) == ""
    assert envelope_sender(SENDER, "0123456789abcdef", None) == SENDER
    assert envelope_sender(SENDER, "0123456789abcdef", rp) == address


# -- DSNs recorded ----------------------------------------------------------------------------


def test_hard_dsn_is_recorded_against_its_message_and_recipient(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, message_id = submit(env, relay, ["ada@dest.test"])
    delivered(env, 1)
    wait_token_stats(env, delivered=1)
    dsn = corpus(
        "dsn-hard-5.1.1.eml", VERP=verp(spool_id), RCPT="ada@dest.test", MESSAGE_ID=message_id
    )
    # STARTTLS is offered (and works), not required: this one uses it.
    code, reply = inbound(relay, [verp(spool_id)], dsn, starttls=env.tls.client_context())
    assert (code, reply) == (250, "2.6.0 Report recorded")
    [event] = bounces(relay)
    assert event.spool_id == spool_id
    assert event.recipient == "ada@dest.test"
    assert event.username == env.username
    view = event.view()
    assert view["bounceType"] == "HARD"
    assert view["source"] == "DSN"
    assert view["status"] == "5.1.1"
    assert view["category"] == "UNKNOWN_USER"
    assert "User unknown" in (event.reply or "")
    wait_token_stats(env, bounced=1, softBounces=0)
    assert relay.metric("txmail_relay_inbound_bounces_total", {"type": "HARD", "source": "dsn"})
    assert (
        relay.metric("txmail_relay_inbound_messages_total", {"kind": "dsn", "result": "recorded"})
        == 1
    )


def test_api_send_bounced_later_shows_it_in_its_send_status_and_is_suppressed(
    env: RelayEnv, relay: RelayThread
) -> None:
    first, captured, spool_id = api_send_delivered(env, relay, "gone@dest.test")
    dsn = corpus(
        "dsn-hard-5.1.1.eml",
        VERP=verp(spool_id),
        RCPT="gone@dest.test",
        MESSAGE_ID=parsed(captured)["Message-ID"],
    )
    assert inbound(relay, [verp(spool_id)], dsn) == (250, "2.6.0 Report recorded")
    view = api_status(env, relay, first["statusId"])
    assert (view["status"], view["sendResult"]) == ("COMPLETE", "UNDELIVERABLE")
    assert (view["bounce"]["bounceType"], view["bounce"]["status"]) == ("HARD", "5.1.1")
    [event] = bounces(relay)
    assert (event.status_id, event.email_id) == (first["statusId"], EMAIL_ID)
    # The DedicatedIP enforces hard-bounce suppression: the next send is refused.
    assert api_send(env, relay, "gone@dest.test", 400)["sendResult"] == "PREVIOUSLY_BOUNCED"


def test_a_failed_dsn_with_a_temporary_status_ends_an_api_send_soft_and_unsuppressed(
    env: RelayEnv, relay: RelayThread
) -> None:
    """Postfix giving up on deferred mail says ``Action: failed`` with a 4.x.x status: the
    message will never arrive (UNDELIVERABLE), but the address is not known to be bad."""

    first, captured, spool_id = api_send_delivered(env, relay, "later@dest.test")
    dsn = corpus(
        "dsn-hard-5.1.1.eml",
        VERP=verp(spool_id),
        RCPT="later@dest.test",
        MESSAGE_ID=parsed(captured)["Message-ID"],
    ).replace(b"Status: 5.1.1", b"Status: 4.4.1")
    assert inbound(relay, [verp(spool_id)], dsn) == (250, "2.6.0 Report recorded")
    view = api_status(env, relay, first["statusId"])
    assert (view["status"], view["sendResult"]) == ("COMPLETE", "UNDELIVERABLE")
    assert (view["bounce"]["bounceType"], view["bounce"]["status"]) == ("SOFT", "4.4.1")
    [event] = bounces(relay)
    assert event.view()["bounceType"] == "SOFT"
    # Not suppressed: the next send to the address goes out.
    assert api_send(env, relay, "later@dest.test")["statusId"] != first["statusId"]


def test_delayed_dsn_is_a_soft_bounce(env: RelayEnv, relay: RelayThread) -> None:
    spool_id, message_id = submit(env, relay, ["slow@slow.test"])
    delivered(env, 1)
    dsn = corpus(
        "dsn-delayed-4.4.7.eml", VERP=verp(spool_id), RCPT="Slow@SLOW.test", MESSAGE_ID=message_id
    )  # the far side may write the recipient in another case
    # Case does not matter: some MTAs fold the local part.
    assert inbound(relay, [verp(spool_id).upper()], dsn)[0] == 250
    [event] = bounces(relay)
    assert (event.spool_id, event.recipient) == (spool_id, "slow@slow.test")
    assert event.view()["bounceType"] == "SOFT"
    assert event.view()["status"] == "4.4.7"
    wait_token_stats(env, bounced=0, softBounces=1)


def test_dsn_about_several_recipients_records_each_failure(
    env: RelayEnv, relay: RelayThread
) -> None:
    rcpts = ["a@dest.test", "b@dest.test", "c@dest.test"]
    spool_id, message_id = submit(env, relay, rcpts)
    delivered(env, 1)
    dsn = corpus(
        "dsn-multiple.eml",
        VERP=verp(spool_id),
        RCPT1=rcpts[0],
        RCPT2=rcpts[1],
        RCPT3=rcpts[2],
        MESSAGE_ID=message_id,
    )
    assert inbound(relay, [verp(spool_id)], dsn)[0] == 250
    found = {e.recipient: e.view() for e in bounces(relay)}
    assert set(found) == {"a@dest.test", "b@dest.test"}  # c was relayed: not a bounce
    assert (found["a@dest.test"]["bounceType"], found["a@dest.test"]["status"]) == ("HARD", "5.2.1")
    assert (found["b@dest.test"]["bounceType"], found["b@dest.test"]["status"]) == ("SOFT", "4.2.2")
    wait_token_stats(env, bounced=1, softBounces=1)


def test_non_standard_bounce_is_read_by_flufl_bounce(env: RelayEnv, relay: RelayThread) -> None:
    spool_id, message_id = submit(env, relay, ["gone@qmail.test"])
    delivered(env, 1)
    bounce = corpus(
        "qmail-bounce.eml", VERP=verp(spool_id), RCPT="gone@qmail.test", MESSAGE_ID=message_id
    )
    assert inbound(relay, [verp(spool_id)], bounce) == (250, "2.6.0 Report recorded")
    [event] = bounces(relay)
    assert (event.spool_id, event.recipient) == (spool_id, "gone@qmail.test")
    assert event.view()["bounceType"] == "HARD"
    assert relay.metric(
        "txmail_relay_inbound_bounces_total", {"type": "HARD", "source": "detector"}
    )
    wait_token_stats(env, bounced=1)


def test_arf_report_to_the_complaints_address_is_a_complaint(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, _ = submit(env, relay, ["ada@dest.test"])
    [captured] = env.sink.wait(1)
    message_id = parsed(captured)["Message-ID"]
    report = corpus(
        "arf-abuse.eml",
        TO=COMPLAINTS,
        VERP=verp(spool_id),
        RCPT="ada@dest.test",
        MESSAGE_ID=message_id,
    )
    # No AUTH: a mailbox provider's feedback loop sends it from its own address.
    assert inbound(relay, [COMPLAINTS.upper()], report, mail_from="staff@hotmail.example") == (
        250,
        "2.6.0 Report recorded",
    )
    wait_token_stats(env, complaints=1)
    [event] = events(relay, EventType.SPAMREPORT)
    assert (event.spool_id, event.recipient) == (spool_id, "ada@dest.test")
    assert not bounces(relay)


def test_only_abuse_and_fraud_reports_are_complaints(env: RelayEnv, relay: RelayThread) -> None:
    """RFC 5965's other Feedback-Types (not-spam, virus, auth-failure, other) come from the
    internet unauthenticated too: accepted, counted, and they record nothing."""
    spool_id, _ = submit(env, relay, ["ada@dest.test", "bea@dest.test"])
    message_id = parsed(env.sink.wait(1)[0])["Message-ID"]

    def report(feedback_type: str, rcpt: str) -> bytes:
        data = corpus(
            "arf-abuse.eml", TO=COMPLAINTS, VERP=verp(spool_id), RCPT=rcpt, MESSAGE_ID=message_id
        )
        return data.replace(b"Feedback-Type: abuse", b"Feedback-Type: " + feedback_type.encode())

    for feedback_type in ("not-spam", "virus", "auth-failure", "other", "Not-Spam"):
        assert inbound(relay, [COMPLAINTS], report(feedback_type, "ada@dest.test")) == (
            250,
            "2.6.0 Report received (not a complaint)",
        ), feedback_type
    assert (
        relay.metric("txmail_relay_inbound_messages_total", {"kind": "arf", "result": "ignored"})
        == 5
    )
    assert not events(relay, EventType.SPAMREPORT)
    assert inbound(relay, [COMPLAINTS], report("fraud", "bea@dest.test")) == (
        250,
        "2.6.0 Report recorded",
    )
    [event] = wait_for(lambda: events(relay, EventType.SPAMREPORT), what="the complaint")
    assert event.recipient == "bea@dest.test"
    wait_token_stats(env, complaints=1)


# -- what is refused, and what changes nothing --------------------------------------------------


def test_only_return_path_and_complaints_addresses_are_accepted(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, _ = submit(env, relay, ["ada@dest.test"])
    with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=10) as smtp:
        code, _ = smtp.ehlo("mx.dest.test")
        assert code == 250
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN AGFwcDEAeA==")[0] == 502
        assert smtp.mail("")[0] == 250
        for other in (
            "postmaster@bounces.example.com",
            f"bounces@{RETURN_PATH_DOMAIN}",
            f"bounces+{'0' * 15}@{RETURN_PATH_DOMAIN}",
            f"bounces+{spool_id}@example.com",
            f"other+{spool_id}@{RETURN_PATH_DOMAIN}",
            "ada@dest.test",
            "app@example.com",
        ):
            code, reply = smtp.rcpt(other)
            assert (code, reply[:5]) == (550, b"5.7.1"), other
        assert smtp.rcpt(verp(spool_id))[0] == 250
        assert smtp.rcpt(COMPLAINTS)[0] == 250
    after_tls = smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=10)
    with after_tls:
        after_tls.ehlo("mx.dest.test")
        after_tls.starttls(context=env.tls.client_context())
        after_tls.ehlo("mx.dest.test")
        assert not after_tls.has_extn("auth")
    assert relay.metric("txmail_relay_inbound_refusals_total", {"reason": "recipient"}) == 7


def test_unknown_ids_forged_recipients_and_junk_are_accepted_and_change_nothing(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, message_id = submit(env, relay, ["ada@dest.test"])
    delivered(env, 1)
    wait_token_stats(env, delivered=1)
    # A well-formed id that is no message of ours.
    unknown = secrets.token_hex(8)
    dsn = corpus("dsn-hard-5.1.1.eml", VERP=verp(unknown), RCPT="ada@dest.test", MESSAGE_ID="<x@y>")
    assert inbound(relay, [verp(unknown)], dsn) == (
        250,
        "2.6.0 Report received (nothing to record)",
    )
    # A forged bounce: the right id, a recipient the message never had.
    forged = corpus(
        "dsn-hard-5.1.1.eml", VERP=verp(spool_id), RCPT="victim@dest.test", MESSAGE_ID=message_id
    )
    assert inbound(relay, [verp(spool_id)], forged)[0] == 250
    # Not a bounce at all.
    junk = b"From: someone@else.test\r\nSubject: hi\r\n\r\nhello\r\n"
    assert inbound(relay, [verp(spool_id)], junk)[0] == 250
    # A DSN to the complaints address names no message.
    tied_to_nothing = corpus(
        "dsn-hard-5.1.1.eml", VERP=COMPLAINTS, RCPT="ada@dest.test", MESSAGE_ID=message_id
    )
    assert inbound(relay, [COMPLAINTS], tied_to_nothing)[0] == 250
    assert not bounces(relay)
    untied = sum(
        relay.metric("txmail_relay_inbound_messages_total", {"kind": kind, "result": "untied"})
        for kind in ("dsn", "junk")
    )
    assert untied == 4
    found = wait_token_stats(env, delivered=1)
    assert found["bounced"] == 0
    assert found.get("softBounces", 0) == 0


def test_junk_is_logged_once_a_minute_not_once_a_message(
    env: RelayEnv, relay: RelayThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The port is open to the internet: a flood of junk makes one WARNING line a minute."""
    junk = b"From: someone@else.test\r\nSubject: hi\r\n\r\nhello\r\n"
    unknown = verp(secrets.token_hex(8))
    # ARF reports about messages this relay never sent, to the complaints address.
    report = corpus(
        "arf-abuse.eml",
        TO=COMPLAINTS,
        VERP=unknown,
        RCPT="nobody@dest.test",
        MESSAGE_ID=f"<{secrets.token_hex(8)}@example.com>",
    )
    with caplog.at_level("WARNING"):
        for _ in range(5):
            assert inbound(relay, [unknown], junk)[0] == 250
            assert inbound(relay, [COMPLAINTS], report)[0] == 250
    lines = [
        r
        for r in caplog.records
        if r.name.startswith("txmail_relay.ingress") and r.levelname == "WARNING"
    ]
    assert [r.message for r in lines] == ["inbound messages tied to nothing"]  # within a minute
    assert (
        relay.metric("txmail_relay_inbound_messages_total", {"kind": "junk", "result": "untied"})
        == 5
    )


def test_oversized_message_is_refused(env: RelayEnv, relay: RelayThread) -> None:
    """The inbound listener has its own, small size limit (a report is small; reading a big
    message is CPU time any host on the internet could spend): far below submission's."""
    spool_id, message_id = submit(env, relay, ["ada@dest.test"])
    dsn = corpus(
        "dsn-hard-5.1.1.eml", VERP=verp(spool_id), RCPT="ada@dest.test", MESSAGE_ID=message_id
    )
    line = b"x" * 78 + b"\r\n"
    padded = dsn.replace(b"\r\n\r\nThis is a MIME", b"\r\n\r\n" + line, 1)
    padded = padded.replace(line, line * (INBOUND_MAX_SIZE // 80 + 1), 1)
    assert INBOUND_MAX_SIZE < len(padded) < MAX_SIZE
    with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=10) as smtp:
        smtp.ehlo("mx.dest.test")
        assert smtp.esmtp_features["size"] == str(INBOUND_MAX_SIZE)
        code, _ = smtp.docmd(f"MAIL FROM:<> SIZE={INBOUND_MAX_SIZE + 1}")
        assert code == 552
    code, _ = inbound(relay, [verp(spool_id)], padded)
    assert code == 552
    assert not bounces(relay)


def test_a_non_standard_bounce_is_read_from_its_first_part_only() -> None:
    """flufl.bounce's detectors read the first 256 KB: a bounce padded beyond is still read,
    and what the padding holds is not."""
    bounce = corpus("qmail-bounce.eml", VERP="x@y.test", RCPT="gone@qmail.test", MESSAGE_ID="<m@x>")
    padding = b"".join(b"x%06d\r\n" % i for i in range(DETECT_BYTES // 8))
    late = bounce.replace(b"gone@qmail.test", b"late@qmail.test")
    report = read_report(bounce + padding + late.partition(b"\r\n\r\n")[2])
    assert report.kind == "bounce"
    assert [f.recipients for f in report.failures] == [("gone@qmail.test",)]


def test_a_bounce_that_cannot_be_written_gets_451_and_is_recorded_when_sent_again(
    env: RelayEnv, relay: RelayThread
) -> None:
    spool_id, message_id = submit(env, relay, ["ada@dest.test"])
    delivered(env, 1)
    dsn = corpus(
        "dsn-hard-5.1.1.eml", VERP=verp(spool_id), RCPT="ada@dest.test", MESSAGE_ID=message_id
    )
    assert relay.relay is not None
    # A real SQLite failure: a second connection to the relay's records adds a trigger that
    # aborts every new event row (the bounce's transaction then rolls back).
    with sqlite3.connect(relay.relay.records.path, timeout=10) as db:
        db.execute(
            "CREATE TRIGGER refuse_events BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    code, reply = inbound(relay, [verp(spool_id)], dsn)
    assert (code, reply) == (451, "4.3.0 Could not record the report, please try again later")
    assert not bounces(relay)
    assert relay.metric("txmail_relay_inbound_messages_total", {"kind": "dsn", "result": "failed"})
    with sqlite3.connect(relay.relay.records.path, timeout=10) as db:
        db.execute("DROP TRIGGER refuse_events")
    # The far MTA tries again later: now it is recorded, once.
    assert inbound(relay, [verp(spool_id)], dsn) == (250, "2.6.0 Report recorded")
    assert [e.recipient for e in bounces(relay)] == ["ada@dest.test"]
    wait_token_stats(env, bounced=1)


def test_dsns_to_the_previous_return_path_domain_are_still_taken(
    env: RelayEnv, relay: RelayThread
) -> None:
    """The return-path domain changes while mail sent with the old one is out there: its DSNs
    still tie (for a week), new mail uses the new domain, other domains stay refused."""
    old_id, old_message_id = submit(env, relay, ["ada@dest.test"])
    delivered(env, 1)
    assert relay.relay is not None
    store = relay.relay.store
    new_domain = "rp2.example.com"
    # The settings file changes, as a person or the operator changes it; the relay reloads it.
    path = env.directory / "relay.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["relay"]["returnPath"]["domain"] = new_domain
    path.write_text(yaml.safe_dump(doc))
    wait_for(
        lambda: (c := store.current) is not None and c.relay.return_path.domain == new_domain,
        what="the new return path",
    )
    new_id, new_message_id = submit(env, relay, ["bea@dest.test"])
    senders = {parsed(c)["Message-ID"]: c.mail_from for c in env.sink.wait(2)}
    assert senders == {
        old_message_id: f"<{verp(old_id)}>",
        new_message_id: f"<{verp(new_id, new_domain)}>",  # new mail: the new domain
    }
    old_dsn = corpus(
        "dsn-hard-5.1.1.eml", VERP=verp(old_id), RCPT="ada@dest.test", MESSAGE_ID=old_message_id
    )
    assert inbound(relay, [verp(old_id)], old_dsn) == (250, "2.6.0 Report recorded")
    new_dsn = corpus(
        "dsn-hard-5.1.1.eml",
        VERP=verp(new_id, new_domain),
        RCPT="bea@dest.test",
        MESSAGE_ID=new_message_id,
    )
    assert inbound(relay, [verp(new_id, new_domain)], new_dsn) == (250, "2.6.0 Report recorded")
    assert sorted(e.recipient for e in bounces(relay)) == ["ada@dest.test", "bea@dest.test"]
    assert inbound(relay, [verp(old_id, "other.example.com")], old_dsn)[0] == 550


def test_a_replaced_return_path_is_taken_for_a_week_only() -> None:
    now = [1000.0]
    store = LiveConfig()
    base = RelayConfig.model_validate(
        {
            "hostname": "relay.test",
            "address": "127.0.0.1",
            "dedicatedIP": "ip1",
            "domains": [],
            "returnPath": {"domain": RETURN_PATH_DOMAIN},
        }
    )
    store.publish(DynamicConfig(relay=base))
    live = LiveReturnPath(store, clock=lambda: now[0])
    spool_id = "0123456789abcdef"
    assert live.decode(verp(spool_id)) == spool_id
    moved = base.model_copy(update={"return_path": ReturnPathConfig(domain="rp2.example.com")})
    store.publish(DynamicConfig(relay=moved))
    assert live.decode(verp(spool_id, "rp2.example.com")) == spool_id
    now[0] += PREVIOUS_RETURN_PATH_GRACE - 1
    assert live.decode(verp(spool_id)) == spool_id
    now[0] += 2
    assert live.decode(verp(spool_id)) is None
    assert live.decode(verp(spool_id, "rp2.example.com")) == spool_id
