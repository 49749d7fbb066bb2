"""Fuzz target: whole SMTP transactions against a real relay (smtplib over STARTTLS, Postfix's
smtp-sink upstream). The invariant: every command gets exactly one reply, never a 4xx for
the client's input, and every DATA answered 250 reaches the upstream as exactly one message.
"""

from __future__ import annotations

import re
import smtplib
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.conftest import examples
from fuzz.test_parsers import BREAKS, header_section
from relay.relaykit import RelayEnv, credential, message, template_doc, wait_for

SENDERS = ["app@example.com", "App@Example.COM", "boss@tenant-b.com", "0@[@0", '"', "", "a@b"]
MAIL_PARAMS = ["", " SIZE=10", " SIZE=²", " SIZE=-1", " BODY=8BITMIME", " BODY=JUNK", " SMTPUTF8"]
RECIPIENTS = ["user@dest.test", "ada@dest.test", "0@[@0", '"', "ä@dest.test", "x@dest.test"]
EMAIL_IDS = ["7", "²", "0", "99999999999999999999999", "", "7 "]


@dataclass
class Transaction:
    sender: str
    params: str
    recipients: list[str]
    content: bytes


@dataclass
class Tally:
    accepted: int = 0
    replies: list[tuple[str, int]] = field(default_factory=list)


body = st.one_of(
    st.text(max_size=60),
    st.sampled_from(['{"customProperties": {"order_id": "1"}}', "\r\n.\r\n", "\n.\n", "."]),
)
GOOD_FIELDS = [
    "From: App <app@example.com>\r\n",
    "To: user@dest.test\r\n",
    "Cc: ada@dest.test\r\n",
    "Subject: hello\r\n",
    "Message-ID: <m@example.com>\r\n",
    'X-Txmail-Properties: {"contactProperties": {"firstname": "A"}, '
    '"customProperties": {"order_id": "1"}}\r\n',
]
# Mostly ordinary headers with one hostile field among them, or a wholly generated section.
mixed_section = st.tuples(
    st.lists(st.sampled_from(GOOD_FIELDS), max_size=5),
    st.one_of(st.just(""), header_section),
    st.integers(min_value=0, max_value=5),
).map(lambda t: "".join(t[0][: t[2]]) + t[1] + "".join(t[0][t[2] :]))
content = st.builds(
    lambda head, template, brk, text: (
        "From: app@example.com\r\n" + head + template + brk + text
    ).encode("utf-8", "surrogateescape"),
    st.one_of(mixed_section, header_section),
    st.one_of(
        st.just(""),
        st.sampled_from(EMAIL_IDS).map(lambda i: f"X-Txmail-Email-Id: {i}\r\n"),
    ),
    st.sampled_from(BREAKS),
    body,
)


def _mostly(usual: str, others: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.just(usual), st.sampled_from(others))


transaction = st.builds(
    Transaction,
    _mostly("app@example.com", SENDERS),
    _mostly("", MAIL_PARAMS),
    st.lists(_mostly("user@dest.test", RECIPIENTS), min_size=1, max_size=3),
    st.one_of(content, st.just(b"From: app@example.com\r\nTo: user@dest.test\r\n\r\nplain")),
)


def _command(smtp: smtplib.SMTP, line: str, tally: Tally) -> int:
    smtp.send(line.encode() + b"\r\n")
    code, _ = smtp.getreply()
    tally.replies.append((line[:40], code))
    return code


def _run(smtp: smtplib.SMTP, case: Transaction, tally: Tally, seq: int) -> None:
    _command(smtp, f"MAIL FROM:<{case.sender}>{case.params}", tally)
    for rcpt in case.recipients:
        _command(smtp, f"RCPT TO:<{rcpt}>", tally)
    smtp.send(b"DATA\r\n")
    code, _ = smtp.getreply()
    tally.replies.append(("DATA", code))
    if code == 354:
        data = case.content + f"\r\nEND-OF-MESSAGE fuzz-{seq}\r\n".encode()
        smtp.send(re.sub(rb"(?m)^\.", b"..", data) + b".\r\n")
        code, _ = smtp.getreply()
        tally.replies.append(("end of data", code))
        if code == 250:
            tally.accepted += 1
    # Still in step: each of these gets its own reply, and only its own.
    assert _command(smtp, "RSET", tally) == 250
    assert _command(smtp, "RCPT TO:<probe@dest.test>", tally) == 503  # no MAIL after RSET
    assert _command(smtp, "NOOP", tally) == 250


def test_smtp_transactions_get_one_reply_each_and_one_message_per_250(env: RelayEnv) -> None:
    relay = env.start(
        env.settings(
            credentials=[credential(env.username, env.password)],
            overrides={"templates": [template_doc(7)]},
        )
    )
    tally = Tally()
    seq = iter(range(1_000_000))

    @settings(max_examples=examples(40))
    @given(transaction)
    def run(case: Transaction) -> None:
        with env.client(relay) as smtp:
            _run(smtp, case, tally, next(seq))
            # A control message in the same session: the session is still usable.
            smtp.sendmail("app@example.com", ["user@dest.test"], message(f"control-{next(seq)}"))
            tally.accepted += 1

    run()
    temporary = [(line, code) for line, code in tally.replies if code // 100 == 4]
    assert not temporary, temporary
    messages = wait_for(
        lambda: m if len(m := env.sink.messages()) >= tally.accepted else None,
        30,
        f"{tally.accepted} messages at smtp-sink",
    )
    assert len(messages) == tally.accepted
    for captured in messages:
        assert len(re.findall(r"^END-OF-MESSAGE ", captured.content, re.MULTILINE)) == 1
