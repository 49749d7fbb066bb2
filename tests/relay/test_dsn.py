"""DSNs the relay sends when it gives up (RFC 3461 parameters in, RFC 3464 reports out).

The relay delivers directly, routed by the real DNS server (Knot): ``dest.test`` is an
smtp-sink that refuses every RCPT with a 5xx, ``slow.test`` one that answers 4xx (mail to it
expires), and the senders' domains (``example.com``, ``tenant-b.com``) have their own sinks, so
the report the relay sends back to the original sender arrives at a real server, from ``<>``,
and is read with the stdlib ``email`` package as a mail client would.
"""

from __future__ import annotations

import asyncio
import email
import json
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage, Message
from email.policy import default
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dns_server import DEFAULT_ZONES
from peers import free_port
from relay.relaykit import (
    DOMAINS,
    DnsServer,
    Recorder,
    RelayEnv,
    RelayThread,
    Sink,
    credential,
    message,
    relay_settings,
    template_doc,
    wait_for,
)
from txmail_relay.mail.dsn import (
    MAX_DIAGNOSTIC,
    DsnEnvelope,
    FailedRecipient,
    RecipientParams,
    build_dsn,
)
from txmail_relay.records.model import EventType, Kind

PORT = free_port("127.0.0.2")
T = TypeVar("T")


@pytest.fixture
def sinks() -> Iterator[dict[str, Sink]]:
    made = {
        "refusing": Sink("-f", "RCPT", host="127.0.0.2", port=PORT),  # 5xx to every RCPT
        "senders": Sink(host="127.0.0.3", port=PORT),
        "soft": Sink("-r", "RCPT", host="127.0.0.4", port=PORT),  # 4xx to every RCPT
    }
    yield made
    for sink in made.values():
        sink.stop()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(
        {
            "dest.test": {"MX": ["10 mx.dest.test."]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "slow.test": {"MX": ["10 mx.slow.test."]},
            "mx.slow.test": {"A": ["127.0.0.4"]},
            "ok.test": {"MX": ["10 mx.senders.test."]},
            "example.com": {"MX": ["10 mx.senders.test."]},
            "tenant-b.com": {"MX": ["10 mx.dest.test."]},  # refuses: a DSN that bounces
            "mx.senders.test": {"A": ["127.0.0.3"]},
        },
        zones=(*DEFAULT_ZONES, "tenant-b.com"),
    )
    yield server
    server.stop()


def start(
    env: RelayEnv,
    dns: DnsServer,
    *,
    policy: str | None = None,
    retry: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RelayThread:
    relay: dict[str, Any] = {
        "delivery": {"mode": "Direct", "resolver": [dns.address], "mxPort": PORT, "smarthost": None}
    }
    if policy is not None:
        relay["dsn"] = {"notify": policy}
    overrides: dict[str, Any] = {"relay": relay}
    if retry is not None:
        overrides["retry"] = retry
    overrides.update(extra or {})
    settings = relay_settings(
        env.directory,
        env.tls,
        env.sink.port,
        credentials=[credential(env.username, env.password, domains=DOMAINS)],
        overrides=overrides,
    )
    return env.start(settings, **kwargs)


def reports(sink: Sink) -> list[tuple[str, EmailMessage]]:
    """(MAIL FROM arguments, the report) of every complete DSN smtp-sink took."""
    found = []
    dump = sink.directory / "dump"
    for path in sorted(dump.iterdir()) if dump.exists() else ():
        text = path.read_text(errors="replace")
        if "report-type" not in text or not text.rstrip().endswith("--"):
            continue
        head, _, content = text.partition("\nReceived: from ")
        mail_args = [line[13:] for line in head.splitlines() if line.startswith("X-Mail-Args: ")]
        content = content.partition("\n")[2]  # the rest of smtp-sink's Received line
        while content[:1] in (" ", "\t"):  # its continuation lines
            content = content.partition("\n")[2]
        parsed = email.message_from_string(content, policy=default)
        assert isinstance(parsed, EmailMessage)
        found.append((mail_args[0] if mail_args else "", parsed))
    return found


def status_blocks(report: EmailMessage) -> list[dict[str, str]]:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    blocks = []
    for block in payload:
        assert isinstance(block, Message)
        blocks.append({k: str(v) for k, v in block.items()})
    return blocks


def submit(
    env: RelayEnv,
    relay: RelayThread,
    sender: str,
    rcpts: dict[str, list[str]],
    *,
    mail_options: tuple[str, ...] = (),
    body: bytes | None = None,
) -> None:
    with env.client(relay) as smtp:
        code, _ = smtp.mail(sender, list(mail_options))
        assert code == 250
        for rcpt, options in rcpts.items():
            code, reply = smtp.rcpt(rcpt, options)
            assert code == 250, reply
        code, _ = smtp.data(body or message(1, sender=sender))
        assert code == 250


def drained(relay: RelayThread) -> bool:
    return relay.relay is not None and relay.relay.queue.depth() == 0


def test_ehlo_offers_dsn_and_bad_parameters_are_501(env: RelayEnv, dns: DnsServer) -> None:
    relay = start(env, dns)
    with env.client(relay) as smtp:
        assert smtp.has_extn("dsn")
        cases = [
            ("MAIL FROM:<app@example.com> RET=MAYBE", 501),
            ("MAIL FROM:<app@example.com> ENVID=a=b", 501),  # "=" is not xtext
            ("MAIL FROM:<app@example.com> ENVID=a+0D+0AX:+20y", 501),  # CR LF once decoded
            ("MAIL FROM:<app@example.com> ENVID=a+00b", 501),  # a NUL once decoded
            ("MAIL FROM:<app@example.com> ENVID=a+C3+A9", 501),  # not ASCII once decoded
            ("MAIL FROM:<app@example.com> RET=HDRS RET=FULL", 501),
            ("MAIL FROM:<app@example.com> FOO=1", 555),  # not a parameter the relay knows
        ]
        for command, code in cases:
            assert smtp.docmd(command)[0] == code, command
        assert smtp.docmd("MAIL FROM:<app@example.com> ret=hdrs ENVID=QQ+2B1 SIZE=100")[0] == 250
        for arg in (
            "NOTIFY=SOMETIMES",
            "NOTIFY=NEVER,FAILURE",
            "NOTIFY=",
            "ORCPT=nosemicolon",
            "ORCPT=rfc822;a+ZZ@b",
            "NOTIFY=FAILURE NOTIFY=DELAY",
        ):
            assert smtp.docmd(f"RCPT TO:<u@ok.test> {arg}")[0] == 501, arg
        assert smtp.docmd("RCPT TO:<u@ok.test> XTRA=1")[0] == 555
        reply = smtp.docmd("RCPT TO:<u@ok.test> notify=failure,delay ORCPT=rfc822;U+2B1@ok.test")
        assert reply[0] == 250


def test_a_hard_bounce_sends_one_dsn_to_the_sender_from_the_null_path(
    env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink]
) -> None:
    recorder = Recorder()
    relay = start(env, dns, listeners=[recorder])
    submit(
        env,
        relay,
        "app@example.com",
        {
            "a@dest.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;A+2Btag@Dest.test"],
            "b@dest.test": [],  # no NOTIFY: failures are reported
            "c@dest.test": ["NOTIFY=NEVER"],
            "d@ok.test": ["NOTIFY=FAILURE"],  # delivered: not in the report
        },
        mail_options=("RET=HDRS", "ENVID=env+2B42"),
    )
    wait_for(lambda: drained(relay) and recorder.outcomes("app@example.com"), what="the DSN")
    [(mail_from, report)] = reports(sinks["senders"])
    assert mail_from.startswith("<>")  # the null reverse path: nobody answers a DSN
    assert str(report["To"]) == "app@example.com"
    assert report["Auto-Submitted"] == "auto-replied"
    per_message, *per_rcpt = status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "env+42"
    assert "Arrival-Date" in per_message
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; a@dest.test",
        "rfc822; b@dest.test",
    ]
    first = per_rcpt[0]
    assert first["Original-Recipient"] == "rfc822; A+tag@Dest.test"
    assert first["Action"] == "failed"
    assert first["Status"].startswith("5.")
    assert first["Diagnostic-Code"].startswith("smtp; 5")
    headers = list(report.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: seq 1" in headers.get_payload()
    assert "hello" not in headers.get_payload()  # RET=HDRS: the headers only
    assert recorder.outcomes("d@ok.test") == ["delivered"]
    assert recorder.outcomes("app@example.com") == ["delivered"]  # the DSN itself


def test_ret_full_returns_the_message_and_expiry_is_4_4_7(
    env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink]
) -> None:
    relay = start(env, dns, retry={"minBackoff": 0.1, "maxBackoff": 0.2, "maxLifetime": 1.0})
    submit(env, relay, "app@example.com", {"x@slow.test": []}, mail_options=("RET=FULL",))
    report = wait_for(lambda: r[0][1] if (r := reports(sinks["senders"])) else None, what="DSN")
    _, block = status_blocks(report)
    assert block["Status"] == "4.4.7"
    assert block["Action"] == "failed"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert "END-OF-MESSAGE 1" in returned.as_string()
    wait_for(lambda: drained(relay), what="an empty queue")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # NOTIFY=NEVER wins over Always (RFC 3461 5.1: MUST NOT); no NOTIFY or SUCCESS alone
        # get one under Always only.
        ("Always", ["rfc822; s@dest.test", "rfc822; f@dest.test"]),
        ("Never", []),
        ("OnRequest", ["rfc822; f@dest.test"]),
    ],
)
def test_the_dedicated_ips_policy(
    env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink], policy: str, expected: list[str]
) -> None:
    recorder = Recorder()
    relay = start(env, dns, policy=policy, listeners=[recorder])
    submit(
        env,
        relay,
        "app@example.com",
        {
            "n@dest.test": ["NOTIFY=NEVER"],
            "s@dest.test": ["NOTIFY=SUCCESS"],
            "f@dest.test": ["NOTIFY=SUCCESS,FAILURE"],
        },
    )
    # The DSN is spooled before the bounce is recorded: an empty queue after both bounces
    # means any DSN has been delivered too.
    wait_for(
        lambda: (
            drained(relay)
            and recorder.outcomes("n@dest.test")
            and recorder.outcomes("s@dest.test")
            and recorder.outcomes("f@dest.test")
        ),
        what="both bounces",
    )
    found = reports(sinks["senders"])
    if not expected:
        assert found == []
        return
    [(_, report)] = found
    assert [b["Final-Recipient"] for b in status_blocks(report)[1:]] == expected


def test_never_a_dsn_about_a_dsn(env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink]) -> None:
    recorder = Recorder()
    relay = start(env, dns, listeners=[recorder])
    # The sender's own domain refuses mail too: the DSN to it bounces, and that is the end.
    submit(env, relay, "app@tenant-b.com", {"a@dest.test": []})
    wait_for(lambda: drained(relay) and recorder.outcomes("app@tenant-b.com"), what="2 bounces")
    assert recorder.outcomes("a@dest.test") == ["bounced"]
    assert recorder.outcomes("app@tenant-b.com") == ["bounced"]
    assert relay.relay is not None and relay.relay.queue.depth() == 0
    assert reports(sinks["senders"]) == []
    # The DSN is the relay's own mail (username ""): its bounce counts against no token and
    # does not suppress the app's own sender.
    records = relay.relay.records
    loop = relay._loop
    assert loop is not None

    def on_loop(make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    bounced = on_loop(lambda: records.events.after(0, types=[EventType.BOUNCE], limit=100))
    assert [(e.username, e.recipient) for e in bounced] == [(env.username, "a@dest.test")]
    assert not [e for e in on_loop(lambda: records.events.after(0, limit=100)) if not e.username]
    totals = on_loop(records.counters.totals)
    assert set(totals.counts) == {env.username}
    assert totals.counts[env.username].get(Kind.BOUNCED) == 1
    assert on_loop(lambda: records.suppressions.get("apps", "app@tenant-b.com")) == []


def test_dsn_parameters_survive_a_restart_in_the_spool(
    env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink]
) -> None:
    """Spooled while the destination defers, delivered (and bounced) after a restart: the
    parameters come back from the segment."""
    relay = start(env, dns, retry={"minBackoff": 30.0, "maxBackoff": 30.0, "maxLifetime": 60.0})
    submit(
        env,
        relay,
        "app@example.com",
        {"x@slow.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;X@slow.test"]},
        mail_options=("ENVID=again",),
    )
    wait_for(
        lambda: (
            relay.metric(
                "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": "deferred"}
            )
            >= 1
        ),
        what="deferral",
    )
    relay.stop()
    env.threads.remove(relay)
    spool = Path(env.directory / "spool")
    assert any(spool.glob("seg-*.log"))
    # Restarted with a lifetime already over: the next attempt expires it.
    relay = start(env, dns, retry={"minBackoff": 0.1, "maxBackoff": 0.1, "maxLifetime": 0.5})
    report = wait_for(
        lambda: r[0][1] if (r := reports(sinks["senders"])) else None, timeout=40, what="DSN"
    )
    per_message, block = status_blocks(report)
    assert per_message["Original-Envelope-Id"] == "again"
    assert block["Original-Recipient"] == "rfc822; X@slow.test"


def test_template_sends_get_no_dsn(env: RelayEnv, dns: DnsServer, sinks: dict[str, Sink]) -> None:
    """An SMTP template send has a send status and events: no DSN, even with Always."""
    recorder = Recorder()
    relay = start(
        env,
        dns,
        policy="Always",
        extra={"templates": [template_doc(7, sender="app@example.com")]},
        listeners=[recorder],
    )
    props = {"contactProperties": {"firstname": "A"}, "customProperties": {"order_id": "1"}}
    body = (
        "From: App <app@example.com>\r\nTo: a@dest.test\r\nSubject: x\r\n"
        f"X-Txmail-Email-Id: 7\r\nX-Txmail-Properties: {json.dumps(props)}\r\n\r\nignored\r\n"
    ).encode()
    submit(env, relay, "app@example.com", {"a@dest.test": ["NOTIFY=FAILURE"]}, body=body)
    wait_for(lambda: drained(relay) and recorder.outcomes("a@dest.test"), what="the bounce")
    assert recorder.outcomes("a@dest.test") == ["bounced"]
    assert recorder.outcomes("app@example.com") == []
    assert reports(sinks["senders"]) == []


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 Benutzer \udcfc\udce9 unbekannt",  # latin-1 bytes (aiosmtplib: surrogates)
        "550 5.1.1 Benutzer üé unbekannt",  # valid UTF-8
        "550-5.7.1 " + "\n550-5.7.1 ".join(["x" * 70] * 40) + "\n550 5.7.1 end",  # multi-line
        "550 5.7.1 " + "y" * 3000,  # one long word
    ],
)
def test_a_far_mtas_reply_is_reported_as_printable_ascii(reply: str) -> None:
    """Whatever the far MTA answered, the report is written (the DSN is not lost), its
    Diagnostic-Code is plain ASCII ``smtp; 550 ...`` (no RFC 2047 word), and no line is longer
    than RFC 5322's 998 characters."""
    failed = FailedRecipient("a@dest.test", reply, False, RecipientParams(), 1e9, "mx.dest.test")
    data = build_dsn(
        hostname="relay.test",
        sender="app@example.com",
        failed=[failed],
        original=b"Subject: hi\r\n\r\nbody\r\n",
        arrived=1e9,
        envelope=DsnEnvelope(),
        now=1e9,
    )
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    report = email.message_from_bytes(data, policy=default)
    assert isinstance(report, EmailMessage)
    _, block = status_blocks(report)
    diagnostic = block["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550")
    assert "=?" not in diagnostic
    assert len(diagnostic) <= 6 + MAX_DIAGNOSTIC
    assert block["Status"] == ("5.7.1" if "5.7.1" in reply else "5.1.1")
    if "Benutzer" in reply:
        assert diagnostic == "smtp; 550 5.1.1 Benutzer ?? unbekannt"
