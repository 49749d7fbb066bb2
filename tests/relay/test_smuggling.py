"""SMTP smuggling (smtpsmug's endings) and STARTTLS command injection: one DATA, one message."""

from __future__ import annotations

import socket

import pytest

from relay.relaykit import HOSTNAME, RelayEnv, wait_for

ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
]  # b"\r\n\x00.\r\n": NUL bytes are refused (test_hostile_input.py)

SMUGGLED = (
    b"MAIL FROM:<ceo@tenant-b.com>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@tenant-b.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_bare_line_endings_never_split_a_message(env: RelayEnv, ending: bytes) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        smtp.mail("app@example.com")
        smtp.rcpt("user@dest.test")
        smtp.putcmd("DATA")
        assert smtp.getreply()[0] == 354
        smtp.send(
            b"From: app@example.com\r\nSubject: carrier\r\n\r\nfirst part"
            + ending
            + SMUGGLED
            + b"\r\nEND-OF-MESSAGE carrier\r\n.\r\n"
        )
        assert smtp.getreply()[0] == 250
    wait_for(
        lambda: relay.metric(
            "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": "delivered"}
        ),
        what="delivery",
    )
    [captured] = env.sink.messages()
    assert captured.rcpts == ["<user@dest.test>"]
    assert captured.mail_from == "<app@example.com>"
    assert "smuggled body" in captured.content  # carried as text inside the one message
    assert "Subject: carrier" in captured.content


def test_commands_pipelined_behind_starttls_are_discarded(env: RelayEnv) -> None:
    relay = env.start()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220")
        raw.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nNOOP\r\n")  # one segment
        assert reader.readline().startswith(b"220")
        tls = env.tls.client_context().wrap_socket(raw, server_hostname=HOSTNAME)
        tls_reader = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        first = tls_reader.readline()
        assert first == f"250-{HOSTNAME}\r\n".encode(), first  # not a reply to the NOOP
        while not first.startswith(b"250 "):
            first = tls_reader.readline()
        tls.sendall(b"QUIT\r\n")
        assert tls_reader.readline().startswith(b"221")
        tls_reader.close()
        tls.close()
        reader.close()
