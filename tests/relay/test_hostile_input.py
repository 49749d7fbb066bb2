"""Hostile and malformed input (issue 10, items 5-8), through real clients.

SMTP: smtplib over STARTTLS against the relay, Postfix's smtp-sink upstream. HTTP: the API
with http.client. What a client must see: a spoofed or unparseable From is refused (550), NUL
bytes are refused (550), malformed input is refused permanently (5xx, never 451: 451 is for
the relay's own faults) or, for reports sent to the complaints address, consumed (250), and
the HTTP API answers 400 with the field named. Every refusal leaves the session usable.
"""

from __future__ import annotations

import json
import re
import smtplib
from typing import Any

import pytest

from relay.relaykit import (
    HttpReply,
    RelayEnv,
    RelayThread,
    bearer,
    credential,
    http,
    message,
    parsed,
    template_doc,
    tracking_keys_file,
    wait_for,
)
from txmail_relay.http.api import SEND_PATH
from txmail_relay.templates.policy import validate

TEMPLATE = 7
DEEP_PARENS = 3_000
COMPLAINTS = "fbl@relay.test"


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    nested_subject = "{{ " + "(" * DEEP_PARENS + "1" + ")" * DEEP_PARENS + " }}"
    settings = env.settings(
        credentials=[credential(env.username, env.password)],
        overrides={
            "templates": [
                template_doc(TEMPLATE),
                template_doc(TEMPLATE + 1, subject=nested_subject),
            ],
            "complaintsAddress": COMPLAINTS,
        },
    )
    return env.start(settings)


def _reply(smtp: smtplib.SMTP, content: bytes, rcpts: list[str] | None = None) -> tuple[int, str]:
    """The reply to one transaction (MAIL, RCPT, DATA), as (code, text)."""
    try:
        smtp.sendmail("app@example.com", rcpts or ["user@dest.test"], content)
    except smtplib.SMTPDataError as e:
        text = e.smtp_error.decode() if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        return e.smtp_code, text
    except smtplib.SMTPRecipientsRefused as e:
        [(code, reply)] = e.recipients.values()
        return code, reply.decode()
    return 250, ""


def _delivered_marker(env: RelayEnv, smtp: smtplib.SMTP, seq: str, count: int) -> None:
    """Send a good message and wait until the sink has ``count`` messages, the last one it."""
    assert _reply(smtp, message(seq))[0] == 250
    messages = env.sink.wait(count)
    assert len(messages) == count, [m.content[:200] for m in messages]
    assert f"END-OF-MESSAGE {seq}" in messages[-1].content or any(
        f"END-OF-MESSAGE {seq}" in m.content for m in messages
    )


def _refused_everywhere(env: RelayEnv, relay: RelayThread, cases: dict[str, bytes]) -> None:
    """Each case is refused (550 5.7.1 when the From fields do not parse into one reading,
    553 5.7.1 naming a domain the token may not use) and nothing of it reaches the upstream."""
    answers = {}
    with env.client(relay) as smtp:
        for name, content in cases.items():
            answers[name] = _reply(smtp, content)
            assert smtp.noop()[0] == 250, name  # one reply per command: still in step
    wrong = {
        name: got
        for name, got in answers.items()
        if got[0] not in {550, 553} or not got[1].startswith("5.7.1")
    }
    assert not wrong, wrong
    with env.client(relay) as smtp:
        _delivered_marker(env, smtp, "marker", 1)
    [only] = env.sink.messages()
    assert "END-OF-MESSAGE marker" in only.content


# -- 5: the header From policy -----------------------------------------------------------------

BODY = b"To: user@dest.test\r\nSubject: s\r\n\r\nbody\r\nEND-OF-MESSAGE spoof\r\n"

SPOOFED_FROM = {
    # the three
    "second From with a space before the colon": (
        b"From: app@example.com\r\nFrom : boss@evil.test\r\n"
    ),
    "second From with a tab before the colon": (
        b"From: app@example.com\r\nFrom\t: boss@tenant-b.com\r\n"
    ),
    "semicolon list": b"From: app@example.com; boss@evil.test\r\n",
    "address after an angle-addr": b"From: <app@example.com> boss@evil.test\r\n",
    # siblings: other ways a receiver sees another domain, or a second From
    "second from in lower case": b"From: app@example.com\r\nfrom: boss@tenant-b.com\r\n",
    "second From after a bare CR": b"From: app@example.com\rFrom: boss@tenant-b.com\r\n",
    "second From after a bare LF": b"From: app@example.com\nFrom: boss@tenant-b.com\r\n",
    "second From after a line that is no field": (
        b"From: app@example.com\r\nnot a header line\r\nFrom: boss@tenant-b.com\r\n"
    ),
    "headers starting with a continuation": (
        b" From: boss@tenant-b.com\r\nFrom: app@example.com\r\n"
    ),
    "addr-spec then angle-addr": b"From: app@example.com <boss@evil.test>\r\n",
    "folded second mailbox": b"From: app@example.com,\r\n boss@tenant-b.com\r\n",
    "group": b"From: team: boss@tenant-b.com;\r\n",
    "two at signs": b"From: boss@tenant-b.com@example.com\r\n",
    "source route": b"From: <@tenant-b.com:app@example.com>\r\n",
    "Sender of another tenant": b"From: app@example.com\r\nSender: boss@tenant-b.com\r\n",
    "Resent-From of another tenant": (
        b"From: app@example.com\r\nResent-From: boss@tenant-b.com\r\n"
    ),
    "encoded word as the address": b"From: =?utf-8?q?boss=40tenant-b.com?=\r\n",
    "trailing dot domain": b"From: app@example.com.\r\n",
    "domain literal": b"From: app@[127.0.0.1]\r\n",
}


def test_every_from_field_is_checked_as_receivers_parse_it(
    env: RelayEnv, relay: RelayThread
) -> None:
    _refused_everywhere(env, relay, {k: v + BODY for k, v in SPOOFED_FROM.items()})
    assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "from-header"}) == len(
        SPOOFED_FROM
    )


ALLOWED_FROM = [
    b"From: app@example.com",
    b"From : app@example.com",  # obsolete syntax, one field, allowed domain
    b'From: "Doe, John" <app@example.com>',
    b"From: =?utf-8?q?J=C3=B6hn?= <app@example.com>",
    "From: Jöhn <app@example.com>".encode(),
    b"From: App (the shop) <app@example.com>",
    b"From: app@example.com (App)",
    b"From: app@EXAMPLE.com, ops@example.com",
    b"From: App\r\n <app@example.com>",
    b"From: app@example.com\r\nSender: ops@example.com",
]


def test_ordinary_from_fields_still_pass(env: RelayEnv, relay: RelayThread) -> None:
    with env.client(relay) as smtp:
        for i, head in enumerate(ALLOWED_FROM):
            content = head + b"\r\nTo: user@dest.test\r\nSubject: ok\r\n\r\nbody\r\n"
            assert _reply(smtp, content + f"END-OF-MESSAGE {i}\r\n".encode()) == (250, ""), head
    assert len(env.sink.wait(len(ALLOWED_FROM))) == len(ALLOWED_FROM)


# -- 6: NUL bytes ------------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<ceo@tenant-b.com>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@tenant-b.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


def test_nul_bytes_are_refused_and_never_reach_the_upstream(
    env: RelayEnv, relay: RelayThread
) -> None:
    carrier = b"From: app@example.com\r\nSubject: carrier\r\n\r\nfirst part"
    cases = {
        "NUL dot ending, then a smuggled transaction": (
            carrier + b"\r\n\x00.\r\n" + SMUGGLED + b"\r\nEND-OF-MESSAGE carrier\r\n"
        ),
        "NUL in a header": b"From: app@example.com\r\nSubject: a\x00b\r\n\r\nx\r\n",
        "NUL at the end of the body": carrier + b"\r\n\x00",
        "From: :;NUL": b"From: :;\x00\r\n\r\nx\r\n",
    }
    with env.client(relay) as smtp:
        for name, content in cases.items():
            code, text = _reply(smtp, content)
            assert code == 550 and text.startswith("5.6.0"), (name, code, text)
            assert smtp.noop()[0] == 250
        _delivered_marker(env, smtp, "after-nul", 1)
    assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "nul"}) == len(cases)
    assert b"\x00" not in "".join(m.content for m in env.sink.messages()).encode()


def test_a_nul_in_api_properties_is_a_400_naming_the_field(
    env: RelayEnv, relay: RelayThread
) -> None:
    doc = {
        "emailId": TEMPLATE,
        "message": {"to": "ada@dest.test"},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "1\n\x00.\n" + SMUGGLED.decode()},
    }
    reply = _api(relay, env, doc)
    assert reply.status == 400, reply.body
    assert reply.json()["errors"][0]["in"] == "customProperties.order_id"


# -- 7: malformed SMTP input is refused permanently -------------------------------------------


def _template(extra: bytes, *, to: bytes = b"To: ada@dest.test") -> bytes:
    return b"From: app@example.com\r\n" + to + b"\r\nSubject: t\r\n" + extra + b"\r\n\r\nbody\r\n"


def test_malformed_messages_get_a_permanent_refusal(env: RelayEnv, relay: RelayThread) -> None:
    deep = b"\r\n ".join([b"(" * 500] * (DEEP_PARENS // 500))  # folded: lines stay short
    cases = {
        'From: "': b'From: "\r\n\r\nx\r\n',
        "From: <": b"From: <\r\n\r\nx\r\n",
        "From: :;": b"From: :;\r\n\r\nx\r\n",
        "From: deeply nested comments": b"From: " + deep + b"app@example.com\r\n\r\nx\r\n",
        "template send with To: 0@": _template(b"X-Txmail-Email-Id: 7", to=b"To: 0@"),
        "template send with To: deep comments": _template(
            b"X-Txmail-Email-Id: 7", to=b"To: " + deep
        ),
        "template send with Cc: quote": _template(b'X-Txmail-Email-Id: 7\r\nCc: "'),
        "emailId superscript two": _template("X-Txmail-Email-Id: ²".encode()),
        "emailId arabic-indic digit": _template("X-Txmail-Email-Id: ٣".encode()),
        "emailId of 5,000 digits": _template(b"X-Txmail-Email-Id: " + b"7" * 5_000),
        "properties nested 50,000 deep": _template(
            b"X-Txmail-Email-Id: 7\r\nX-Txmail-Properties: "
            + b"\r\n ".join([b"[" * 500] * 100)  # folded: JSON reads the folds as spaces
        ),
        "properties with a lone surrogate": _template(
            b'X-Txmail-Email-Id: 7\r\nX-Txmail-Properties: {"customProperties": '
            b'{"order_id": "\\ud800"}}'
        ),
    }
    cases["2,000 header fields"] = b"From: app@example.com\r\n" + b"X-A: b\r\n" * 2_000 + b"\r\nx"
    cases["JSON body nested 50,000 deep"] = (
        b"From: app@example.com\r\nTo: ada@dest.test\r\nX-Txmail-Email-Id: 7\r\n\r\n"
        + b'{"customProperties": '
        + b"\r\n".join([b"[" * 500] * 100)
        + b"\r\n"
    )
    plain = {
        "To: 0@": b"From: app@example.com\r\nTo: 0@\r\n\r\nx\r\n",
        "Message-ID: deep comments": b"From: app@example.com\r\nMessage-ID: "
        + deep
        + b"\r\n\r\nx\r\n",
    }
    answers: dict[str, tuple[int, str]] = {}
    with env.client(relay) as smtp:
        for name, content in cases.items():
            answers[name] = _reply(smtp, content, ["ada@dest.test"])
            assert smtp.noop()[0] == 250, name
        for name, content in plain.items():
            answers[name] = _reply(smtp, content + b"END-OF-MESSAGE " + name.encode() + b"\r\n")
            assert smtp.noop()[0] == 250, name
    temporary = {name: got for name, got in answers.items() if got[0] // 100 != 5 and got[0] != 250}
    assert not temporary, temporary
    refused = {name: got for name, got in answers.items() if name in cases and got[0] // 100 != 5}
    assert not refused, refused
    # Plain mail with an odd To or Message-ID is the recipient's business: relayed as it came.
    assert {name: got[0] for name, got in answers.items() if name in plain} == dict.fromkeys(
        plain, 250
    )
    assert len(env.sink.wait(len(plain))) == len(plain)


def _nested_report(depth: int) -> bytes:
    """A feedback report whose first part nests ``depth`` multiparts."""
    head = (
        b"From: feedback@isp.test\r\nTo: " + COMPLAINTS.encode() + b"\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="top"\r\n\r\n'
    )
    opening = b"".join(
        b"--" + (b"top" if i == 0 else b"b%d" % (i - 1)) + b"\r\n"
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % i
        for i in range(depth)
    )
    closing = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + b"--b%d\r\n\r\ndeep\r\n" % (depth - 1) + closing + b"--top--\r\n"


def test_a_deeply_nested_complaint_report_is_consumed_not_retried(
    env: RelayEnv, relay: RelayThread
) -> None:
    with env.client(relay) as smtp:
        code, text = _reply(smtp, _nested_report(3_000), [COMPLAINTS])
        assert smtp.noop()[0] == 250
    assert code == 250, (code, text)  # a report the relay cannot use is consumed, as others
    assert relay.metric("txmail_relay_complaint_reports_total", {"result": "invalid"}) == 1


# -- 8: the HTTP API answers 400 naming the field ---------------------------------------------


def _api(relay: RelayThread, env: RelayEnv, doc: Any = None, raw: bytes | None = None) -> HttpReply:
    return http(relay.api_port, "POST", SEND_PATH, body=doc, raw=raw, headers=bearer(env.password))


def _doc(**message: Any) -> dict[str, Any]:
    return {
        "emailId": TEMPLATE,
        "message": {"to": "ada@dest.test", **message},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "1"},
    }


def test_bad_api_requests_are_400_naming_the_field(env: RelayEnv, relay: RelayThread) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    cases: dict[str, tuple[Any, bytes | None, str]] = {
        "to 0@[@0": (_doc(to="0@[@0"), None, "message.to"),
        "emailId superscript two": ({**_doc(), "emailId": "²"}, None, "emailId"),
        "50,000 nested arrays": (None, deep.encode(), "body"),
        "50,000 nested arrays in a property": (
            None,
            (
                '{"emailId": 7, "message": {"to": "a@dest.test"}, "customProperties": {"x": '
                + deep
                + "}}"
            ).encode(),
            "body",
        ),
        "template subject nesting 3,000 parentheses": (
            {**_doc(), "emailId": TEMPLATE + 1},
            None,
            "emailId",
        ),
        # siblings
        "cc 0@[@0": (_doc(cc=["0@[@0"]), None, "message.cc"),
        "bcc 0@[@0": (_doc(bcc=["0@[@0"]), None, "message.bcc"),
        "replyTo 0@[@0": (_doc(replyTo=["0@[@0"]), None, "message.replyTo"),
        "from 0@[@0": (_doc(**{"from": "0@[@0"}), None, "message.from"),
        "from of two tenants": (
            _doc(**{"from": "app@example.com; boss@tenant-b.com"}),
            None,
            "message.from",
        ),
        "from with two mailboxes": (
            _doc(**{"from": "app@example.com, boss@tenant-b.com"}),
            None,
            "message.from",
        ),
        "emailId of 5,000 digits": ({**_doc(), "emailId": "7" * 5_000}, None, "emailId"),
        "emailId past 64 bits": ({**_doc(), "emailId": 2**70}, None, "emailId"),
        "sendId with a lone surrogate": (_doc(sendId="\ud800"), None, "message.sendId"),
        "property with a lone surrogate": (
            {**_doc(), "customProperties": {"order_id": "\udfff"}},
            None,
            "customProperties.order_id",
        ),
        "property NaN": (
            {**_doc(), "customProperties": {"order_id": float("nan")}},
            None,
            "customProperties.order_id",
        ),
        "property key with a lone surrogate": (
            {**_doc(), "contactProperties": {"\ud800": "x", "firstname": "Ada"}},
            None,
            "contactProperties",
        ),
        "properties nested 100 deep": (
            {
                **_doc(),
                "customProperties": {"order_id": "1", "x": json.loads("[" * 100 + "]" * 100)},
            },
            None,
            "customProperties.x",
        ),
    }
    wrong = {}
    for name, (doc, raw, field) in cases.items():
        reply = _api(relay, env, doc, raw)
        body = (
            reply.json()
            if reply.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        got = (reply.status, (body.get("errors") or [{}])[0].get("in"))
        if got != (400, field):
            wrong[name] = (got, reply.body[:200])
    assert not wrong, wrong
    assert env.sink.messages() == []


def test_the_template_validator_reports_deep_nesting_instead_of_crashing() -> None:
    deep = DEEP_PARENS
    for subject in (
        "{{ " + "(" * deep + "1" + ")" * deep + " }}",
        "{% if " + "(" * deep + "1" + ")" * deep + " %}x{% endif %}",
        "{{ " + "not " * deep + "1 }}",
        "{{ " + "-" * deep + "1 }}",
        "{{ x" + "|e" * deep + " }}",
        "{{ " + "[" * deep + "]" * deep + " }}",
        "{{ " + "a." * deep + "b }}",
    ):
        errors = validate(subject, None, "text")  # never raises
        if "(" in subject:
            assert errors and errors[0].part == "subject", subject[:40]


def test_the_relay_keeps_serving_after_hostile_requests(env: RelayEnv, relay: RelayThread) -> None:
    """After everything above, a good API send and a good SMTP message still go out."""
    reply = _api(relay, env, None, b"[" * 50_000)
    assert reply.status == 400
    ok = _api(relay, env, _doc())
    assert ok.status == 200, ok.body
    [captured] = env.sink.wait(1)
    assert parsed(captured)["Subject"] == "Order 1"
    wait_for(lambda: relay.metric("txmail_relay_messages_accepted_total", {"token": "app1"}) == 1)


# -- siblings at the command level: every malformed argument gets a 5xx, never a 451 ---------

BAD_COMMANDS = [
    "MAIL FROM:<app@example.com> SIZE=²",
    "MAIL FROM:<app@example.com> SIZE=٣",
    "MAIL FROM:<app@example.com> SIZE=" + "9" * 5_000,
    "MAIL FROM:<app@example.com> SIZE=-1",
    "MAIL FROM:<app@example.com> SIZE=",
    "MAIL FROM:<app@example.com> BODY=JUNK",
    "MAIL FROM:<app@example.com> SMTPUTF8",
    "MAIL FROM:<0@[@0>",
    'MAIL FROM:<">',
    "MAIL FROM:<" + "(" * 900 + ">",
    "MAIL FROM:<app@example.com",
    "MAIL FROM:<>",
    "MAIL FROM:<ä@example.com>",
]

BAD_RECIPIENTS = [
    "RCPT TO:<0@[@0>",
    'RCPT TO:<">',
    "RCPT TO:<" + "(" * 900 + ">",
    "RCPT TO:<ä@dest.test>",
    "RCPT TO:<user@dest.test> NOTIFY=²",
    "RCPT TO:<user@dest.test> ORCPT=rfc822;" + "(" * 500,
]


def _command(smtp: smtplib.SMTP, line: str) -> tuple[int, bytes]:
    smtp.send(line.encode() + b"\r\n")  # raw UTF-8: smtplib would refuse to encode it
    return smtp.getreply()


def test_malformed_command_arguments_get_a_5xx(env: RelayEnv, relay: RelayThread) -> None:
    answers = {}
    with env.client(relay) as smtp:
        for command in BAD_COMMANDS:
            answers[command[:60]] = _command(smtp, command)
            assert smtp.rset()[0] == 250, command
        assert smtp.docmd("MAIL FROM:<app@example.com>")[0] == 250
        for command in BAD_RECIPIENTS:
            answers[command[:60]] = _command(smtp, command)
        assert smtp.noop()[0] == 250
    wrong = {cmd: got for cmd, got in answers.items() if got[0] // 100 == 4}
    assert not wrong, wrong
    # Addresses aiosmtpd parses but the delivery path cannot send are refused up front,
    # instead of accepted and retried until they expire (found by tests/fuzz).
    for command in ('MAIL FROM:<">', 'RCPT TO:<">'):
        assert answers[command][0] == 553, (command, answers[command])
    assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "syntax"}) >= 2


# -- sibling: tracking rewrites plain mail, and must not rewrite who it is from ---------------


def test_tracking_keeps_the_from_fields_as_they_were_checked(env: RelayEnv) -> None:
    keys = tracking_keys_file(env.directory, 1)
    relay = env.start(
        env.settings(
            overrides={
                "relay": {"tracking": {"baseURL": "https://t.example.com"}},
                "trackingKeysFile": str(keys),
            }
        )
    )
    html = (
        b"To: user@dest.test\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        b'\r\n<html><body><p><a href="https://shop.example.com/o/1">order</a></p></body></html>'
        b"\r\nEND-OF-MESSAGE "  # after </body>: the open pixel goes before it
    )
    heads = {
        # a long comment the email package used to refold without its parentheses, which
        # turned it into "app@example.com xxx <boss@evil.test> yyy"
        "comment": b"From: app@example.com ("
        + b"x" * 80
        + b" <boss@evil.test> "
        + b"y" * 80
        + b")",
        # obsolete syntax the email package drops (it reads "From " as an mbox line)
        "obsolete": b"From : App <app@example.com>",
    }
    with env.client(relay) as smtp:
        for name, head in heads.items():
            assert _reply(smtp, head + b"\r\n" + html + name.encode() + b"\r\n") == (250, ""), name
    messages = env.sink.wait(len(heads))
    for captured in messages:
        name = captured.content.rsplit("END-OF-MESSAGE ", 1)[1].split()[0]
        sent = parsed(captured)
        assert [str(v) for v in sent.get_all("From") or []] or name == "obsolete", name
        from_lines = re.findall(r"^From\s*:.*(?:\n[ \t].*)*", captured.content, re.MULTILINE)
        assert len(from_lines) == 1, (name, from_lines)
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", from_lines[0])
        assert unfolded.replace("\r", "") == heads[name].decode(), (name, unfolded)
        if name == "comment":  # tracked: the rewrite ran and kept the field byte for byte
            assert "https://t.example.com/c/" in captured.content.replace("=\n", "")


def test_a_long_from_display_name_cannot_smuggle_an_address(
    env: RelayEnv, relay: RelayThread
) -> None:
    """The email package's folding dropped the quotes of a long display name, so
    ``"x... <boss@tenant-b.com> y..." <app@example.com>`` went out as a From a receiver
    reads as boss@tenant-b.com. Over the API and as an SMTP template send."""
    name = "x" * 80 + " <boss@tenant-b.com> " + "y" * 80
    sender = f'"{name}" <app@example.com>'
    assert _api(relay, env, _doc(**{"from": sender})).status == 200
    with env.client(relay) as smtp:
        head = f"From: {sender}\r\nTo: ada@dest.test\r\nX-Txmail-Email-Id: {TEMPLATE}\r\n"
        props = '{"contactProperties": {"firstname": "A"}, "customProperties": {"order_id": "2"}}'
        content = (head + "X-Txmail-Properties: " + props + "\r\n\r\nx\r\n").encode()
        assert _reply(smtp, content, ["ada@dest.test"]) == (250, "")
    for captured in env.sink.wait(2):
        sent = parsed(captured)
        [from_field] = sent.get_all("From")
        assert [a.addr_spec for a in from_field.addresses] == ["app@example.com"]
        # the name survives (encoded words; a word longer than one is split, and Python's
        # reader joins the pieces with a space)
        assert from_field.addresses[0].display_name.replace(" ", "") == name.replace(" ", "")
        raw = re.search(r"^From:.*(?:\n[ \t].*)*", captured.content, re.MULTILINE)
        assert raw is not None
        assert "tenant-b.com" not in raw.group(0), raw.group(0)
