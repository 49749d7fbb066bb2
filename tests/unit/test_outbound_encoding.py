"""The pipelined path's DATA body is byte for byte what aiosmtplib's ``SMTP.data`` sends (its
line-ending normalisation and dot-stuffing, issue 7's single DATA path), fast paths or not."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import example, given
from hypothesis import strategies as st

from txmail_relay.delivery.transport import _encoded

PIECES = [b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"a", b"\x00", b"\xff", b" "]


def _aiosmtplib(body: bytes) -> bytes:
    """What aiosmtplib's SMTPProtocol.execute_data_command writes after DATA's 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


@given(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join))
@example(b"")
@example(b".")
@example(b"Subject: x\r\n\r\nbody\r\n")
@example(b"Subject: x\r\n\r\n.\r\nafter a lone dot\r\n")
@example(b"no line end at all")
@example(b"bare\nlf\rcr\r\n")
def test_the_body_is_encoded_as_aiosmtplib_encodes_it(body: bytes) -> None:
    assert _encoded(body) == _aiosmtplib(body)
