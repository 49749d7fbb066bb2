"""Fuzz targets for the inbound listener's readers (hypothesis): whatever a far MTA sends, the
report reader never raises and names only well-formed addresses, and the return-path decoder
is total and reads back exactly what the encoder wrote.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from txmail_relay.ingress.inbound import Report, read_report
from txmail_relay.mail.addresses import is_smtp_address
from txmail_relay.mail.return_path import SPOOL_ID, ReturnPath

CORPUS = Path(__file__).parents[1] / "relay" / "corpus"
RETURN_PATH = ReturnPath("bounces.example.com")
SEEDS = sorted(p.read_bytes() for p in CORPUS.glob("*.eml"))

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
