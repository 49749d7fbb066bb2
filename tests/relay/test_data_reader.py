"""The DATA body reader (SubmissionProtocol._data, in large pieces rather than aiosmtpd's line by
line): where a body ends, however it arrives, and its limits; against the real relay."""

from __future__ import annotations

import smtplib

from relay.relaykit import RelayEnv, message


def _start_data(smtp: smtplib.SMTP) -> None:
    smtp.mail("app@example.com")
    smtp.rcpt("user@dest.test")
    smtp.putcmd("DATA")
    assert smtp.getreply()[0] == 354


def _padded(seq: int, size: int) -> bytes:
    """A test message of ``size`` bytes, its body lines of two dots (one each once read)."""
    rest = size - len(message(seq, body=""))
    return message(seq, body="..\r\n" * (rest // 4) + "x" * (rest % 4))


def test_end_and_the_next_command_in_one_segment(env: RelayEnv) -> None:
    """Bytes after CRLF.CRLF are the client's next command, not body (pipelining)."""
    relay = env.start()
    with env.client(relay) as smtp:
        _start_data(smtp)
        smtp.send(message(1) + b".\r\nNOOP\r\nMAIL FROM:<app@example.com>\r\n")
        assert smtp.getreply()[0] == 250  # the message
        assert smtp.getreply()[0] == 250  # NOOP
        assert smtp.getreply()[0] == 250  # MAIL
        smtp.rcpt("user@dest.test")
        smtp.putcmd("DATA")
        assert smtp.getreply()[0] == 354
        smtp.send(message(2) + b".\r\n")
        assert smtp.getreply()[0] == 250
    [first, second] = sorted(env.sink.wait(2), key=lambda m: "seq 2" in m.content)
    assert "Subject: seq 1" in first.content and "NOOP" not in first.content
    assert "Subject: seq 2" in second.content


def test_body_sent_byte_by_byte(env: RelayEnv) -> None:
    """The end split over segments anywhere (a CR in one, LF.CRLF in the next) still ends it."""
    relay = env.start()
    body = message(1, body="a line\r\n..dot-stuffed\r\nlast") + b".\r\n"
    with env.client(relay) as smtp:
        _start_data(smtp)
        for index in range(len(body)):
            smtp.send(body[index : index + 1])
        assert smtp.getreply()[0] == 250
        assert smtp.noop()[0] == 250
    [captured] = env.sink.wait(1)
    assert "Subject: seq 1" in captured.content
    assert "\n.dot-stuffed" in captured.content  # one dot taken, one left (and re-stuffed upstream)


def test_empty_body_ends_at_once(env: RelayEnv) -> None:
    """ ".\\r\\n" right after the 354 is an empty message (refused by policy: no From)."""
    relay = env.start()
    with env.client(relay) as smtp:
        _start_data(smtp)
        smtp.send(b".\r\nNOOP\r\n")
        code, _ = smtp.getreply()
        assert 500 <= code < 600
        assert smtp.getreply()[0] == 250  # the NOOP: not read as body
        assert smtp.noop()[0] == 250


def test_line_limit(env: RelayEnv) -> None:
    """998 characters and CRLF pass (RFC 5321's 1000); a longer line gets aiosmtpd's 500 after
    the end of DATA, and the session goes on."""
    relay = env.start()
    with env.client(relay) as smtp:
        _start_data(smtp)
        smtp.send(message(1, body="y" * 998) + b".\r\n")
        assert smtp.getreply()[0] == 250
        _start_data(smtp)
        smtp.send(message(2, body="y" * 1000) + b".\r\n")
        code, text = smtp.getreply()
        assert code == 500
        assert b"Line too long" in text
        assert smtp.noop()[0] == 250
    [captured] = env.sink.wait(1)
    assert "Subject: seq 1" in captured.content


def test_size_limit_counts_the_body_as_sent(env: RelayEnv) -> None:
    """data_size_limit counts the body's bytes as sent (CRLFs and stuffed dots included, the
    ending not): one byte over is 552, after the end of DATA."""
    relay = env.start(env.settings(overrides={"limits": {"maxMessageSize": 4000}}))
    with env.client(relay) as smtp:
        _start_data(smtp)
        smtp.send(_padded(1, 4000) + b".\r\n")
        assert smtp.getreply()[0] == 250
        _start_data(smtp)
        smtp.send(_padded(2, 4001) + b".\r\n")
        code, text = smtp.getreply()
        assert code == 552
        assert b"Too much mail data" in text
        assert smtp.noop()[0] == 250
    [captured] = env.sink.wait(1)
    assert "Subject: seq 1" in captured.content
