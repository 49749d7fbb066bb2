"""The Received header the relay puts in front of every spooled body (mail/headers.py)."""

from __future__ import annotations

from email.utils import formatdate

from txmail_relay.mail.headers import Origin, received_header

SMTP = Origin(peer="192.0.2.7", by="relay.test", protocol="ESMTPSA", helo="client.test")


def test_the_date_is_the_second_it_is_asked_for() -> None:
    # Two seconds in a row, and the first again: the date kept for a second is never another's.
    for when in (1_700_000_000.2, 1_700_000_001.9, 1_700_000_000.7):
        header = received_header(SMTP, when=when).decode()
        assert header.endswith(f"\t{formatdate(when, usegmt=True)}\r\n"), header


def test_the_header_names_client_relay_and_protocol() -> None:
    header = received_header(SMTP, when=0).decode()
    assert header.startswith(
        "Received: from client.test ([192.0.2.7])\r\n\tby relay.test (txmail) with ESMTPSA;\r\n\t"
    )
    api = received_header(Origin(peer="192.0.2.8", by="relay.test", protocol="HTTP"), when=0)
    assert api.startswith(b"Received: from [192.0.2.8]\r\n\tby relay.test (txmail) with HTTP;")


def test_an_unsafe_helo_loses_its_unsafe_characters() -> None:
    origin = Origin(peer="192.0.2.7", by="relay.test", protocol="ESMTPSA", helo="a b\r\nX: y")
    assert received_header(origin, when=0).startswith(b"Received: from abX:y ([192.0.2.7])")
